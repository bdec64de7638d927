"""The report's training figures, drawn from train-lora's DVCLive folder (stages/common/train_log.py):
the loss curves and the validation strip."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from stages.common.errors import StageError
from stages.common.figures import TILE_INCHES
from stages.common.io import load_rgb
from stages.common.train_log import read_heldout, read_history, validation_images

STRIP_COLUMNS = 12  # validated steps the report's strip shows at most


def loss_figure(folder: str | Path) -> Figure:
    """The training loss per optimiser step and, where the run validated, the held-out loss: the
    one curve of the two that only the weights move."""
    history, heldout = read_history(folder), read_heldout(folder)
    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.subplots()
    ax.plot(history["step"], history["loss"], color="#1f77b4", linewidth=1, label="training loss (each step's batch)")
    if heldout is not None:
        ax.plot(heldout["step"], heldout["heldout_loss"], color="#d62728", marker="o", linewidth=1.5,
                label="held-out loss (fixed eval images, noise and timesteps)")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("denoising loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def validation_strip(folder: str | Path, prompts: dict[int, str]) -> Figure | None:
    """One row per validation condition (its eval index and prompt), one column per validated
    step; None when the run drew no validation images."""
    images = validation_images(folder)
    if not images:
        return None
    steps = sorted({step for per_step in images.values() for step in per_step})
    if len(steps) > STRIP_COLUMNS:  # evenly spaced, the first (the base) and the last (the LoRA that ships) kept
        steps = [steps[round(i * (len(steps) - 1) / (STRIP_COLUMNS - 1))] for i in range(STRIP_COLUMNS)]
    missing = [f"{index:06d}/{step}" for index, per_step in images.items() for step in steps if step not in per_step]
    if missing:
        raise StageError(f"{folder}: validation images missing ({', '.join(missing[:3])}); "
                         "rerun `dvc repro train-lora`")
    scale = TILE_INCHES / 2  # half-size tiles: a strip of many steps still fits the page
    fig = Figure(figsize=(scale * len(steps) + 1.6, scale * len(images) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(images), len(steps), squeeze=False))
    for row, (index, per_step) in enumerate(images.items()):
        for col, step in enumerate(steps):
            ax = axes[row, col]
            ax.imshow(load_rgb(per_step[step]))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"step {step}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"#{index}\n" + textwrap.shorten(prompts.get(index, ""), 40, placeholder="..."),
                              fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig

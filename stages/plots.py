"""plots: the training-loss curve and a qualitative grid (edges | ground truth | baseline | LoRA).

    python -m stages.plots

Writes plots/train_loss.png and plots/samples_grid.png. The loss CSV itself is also declared
as a DVC plot in dvc.yaml, so `dvc plots show` / `dvc plots diff` draw it interactively.
"""

import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

from stages.common import dataset
from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.io import atomic_dir, check_images, load_rgb
from stages.common.params import load_params

LOSS_PNG = "train_loss.png"
GRID_PNG = "samples_grid.png"


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def loss_figure(loss_log: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(loss_log["step"], loss_log["loss"], alpha=0.35, label="loss per step")
    window = max(5, len(loss_log) // 20)
    ax.plot(loss_log["step"], loss_log["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax.set(xlabel="optimiser step", ylabel="MSE (epsilon)", title="train-lora loss")
    ax.legend()
    return fig


def grid_columns(paths) -> list[tuple[str, str, object]]:
    """(title, the stage that writes it, index -> image path) for each column of the grid."""
    return [("edges", "canny-edges", lambda i: dataset.edge_path(paths.edges, i)),
            ("ground truth", "extract", lambda i: dataset.gt_path(paths.eval_data, i)),
            *[(v, f"generate-{v}", lambda i, v=v: dataset.generated_path(paths, v, i)) for v in dataset.VARIANTS]]


def check_inputs(rows: list[dict], paths) -> None:
    """Every file the plots read, checked before drawing anything."""
    if not Path(paths.loss_log).is_file():
        raise StageError(f"{paths.loss_log}: not found; run `dvc repro train-lora`")
    for _, stage, path_of in grid_columns(paths):
        check_images([path_of(c["index"]) for c in rows], stage)


def grid_figure(rows: list[dict], paths) -> Figure:
    columns = [(title, path_of) for title, _, path_of in grid_columns(paths)]
    fig = Figure(figsize=(2.2 * len(columns), 2.4 * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, config in enumerate(rows):
        for c, (title, path_of) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(load_rgb(path_of(config["index"])))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(config["prompt"], 22)[:3]), fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    setup_logging()
    params = load_params()
    paths = params.paths
    out = Path(paths.plots)
    rows = dataset.load_eval_configs(paths.eval_data)[:params.plots.grid_samples]
    check_inputs(rows, paths)
    with atomic_dir(out) as tmp:  # both plots or neither
        save_figure(loss_figure(pd.read_csv(paths.loss_log)), tmp / LOSS_PNG)
        save_figure(grid_figure(rows, paths), tmp / GRID_PNG)
    log.info("plots: wrote %s and %s", out / LOSS_PNG, out / GRID_PNG)


if __name__ == "__main__":
    run_cli(main)

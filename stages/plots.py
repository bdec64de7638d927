"""plots: a qualitative grid (edges | ground truth | baseline | LoRA) for the first eval samples.

    python -m stages.plots

Writes `paths.samples_grid` (DVC-cached) and copies train-lora's loss log to `paths.loss_curve`
(in git), which DVC draws (`dvc plots show`, `dvc plots diff`): each plot is drawn once.
"""

import shutil
import textwrap
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

from stages.common import dataset
from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.io import atomic_file, check_images, load_rgb
from stages.common.params import load_params

def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def grid_columns(paths) -> list[tuple[str, str, object]]:
    """(title, the stage that writes it, index -> image path) for each column of the grid."""
    return [("edges", "canny-edges", lambda i: dataset.edge_path(paths.edges, i)),
            ("ground truth", "extract", lambda i: dataset.gt_path(paths.eval_data, i)),
            *[(v, f"generate-{v}", lambda i, v=v: dataset.generated_path(paths, v, i)) for v in dataset.VARIANTS]]


def check_inputs(rows: list[dict], paths) -> None:
    """Every file the stage reads, checked before drawing anything."""
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
    rows = dataset.load_eval_configs(paths.eval_data)[:params.plots.grid_samples]
    check_inputs(rows, paths)
    with atomic_file(paths.samples_grid) as tmp:
        save_figure(grid_figure(rows, paths), tmp)
    with atomic_file(paths.loss_curve) as tmp:
        shutil.copyfile(paths.loss_log, tmp)
    log.info("plots: wrote %s and %s (`dvc plots show` draws it)", paths.samples_grid, paths.loss_curve)


if __name__ == "__main__":
    run_cli(main)

"""plots: a loss curve and a qualitative grid, as real PNGs."""

from PIL import Image

from stages import plots
from stages.common import dataset
from tests.conftest import fill_generated


def test_plots_are_written(trained_project):
    p = trained_project
    fill_generated(p, lambda i: dataset.gt_path(p.path("eval_data"), i))  # any images do for the grid
    p.run("plots")
    for name in (plots.LOSS_PNG, plots.GRID_PNG):
        with Image.open(p.path("plots") / name) as img:
            assert img.format == "PNG" and img.width > 200
    with Image.open(p.path("plots") / plots.GRID_PNG) as grid:
        assert grid.height > grid.width * 0.4  # two sample rows of four columns

"""plots: a qualitative grid, as a real PNG; the loss curve is DVC's to draw."""

from PIL import Image

from stages.common import dataset
from tests.conftest import fill_generated


def test_plots_are_written(trained_project):
    p = trained_project
    fill_generated(p, lambda i: dataset.gt_path(p.path("eval_data"), i))  # any images do for the grid
    p.run("plots")
    assert p.path("loss_curve").read_bytes() == p.path("loss_log").read_bytes()
    with Image.open(p.path("samples_grid")) as grid:
        assert grid.format == "PNG" and grid.width > 200
        assert grid.height > grid.width * 0.4  # two sample rows of four columns

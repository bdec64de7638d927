"""plots: every figure is a real PNG of the right shape; rows and overlays are chosen and coloured
as documented; the loss curve is DVC's to draw."""

import numpy as np
import pandas as pd
from PIL import Image

from stages import plots
from stages.common.figures import read_scores
from stages.common.io import read_json
from stages.common.params import Plots


def test_plots_are_written(finished_project):
    p = finished_project
    for key in ("samples_grid", "metrics_chart", "deltas_chart", "edge_overlays"):
        p.path(key).unlink()
    p.run("plots")
    n = p.params["extract"]["eval_products"]
    rows = len(plots.choose_rows(read_scores(p.typed().paths.per_sample, list(range(n))), p.typed().plots))
    sizes = {}
    for key in ("samples_grid", "metrics_chart", "deltas_chart", "edge_overlays"):
        with Image.open(p.path(key)) as image:
            assert image.format == "PNG", key
            sizes[key] = image.size
            assert np.asarray(image.convert("L")).std() > 10, f"{key} is not blank"
    width, height = sizes["samples_grid"]
    assert width > 4 * 230 and height > rows * 230, "four columns of about 256-px tiles, one row per sample"
    assert sizes["metrics_chart"][0] > 2 * sizes["metrics_chart"][1], "one panel per metric, in two rows"


def test_rows_are_seeded_and_include_the_best_and_worst():
    table = pd.DataFrame({"index": range(20), "lpips_delta": np.linspace(-0.02, 0.01, 20)[::-1]})
    table = table.set_index(table["index"].rename(None))
    cfg = Plots(grid_samples=4, extreme_samples=2, overlay_samples=2, seed=0)
    rows = plots.choose_rows(table, cfg)
    assert [i for i, why in rows if why == "LoRA's best"] == [19, 18], "most negative LPIPS delta first"
    assert [i for i, why in rows if why == "LoRA's worst"] == [0, 1]
    random = [i for i, why in rows if why == "random"]
    assert len(random) == 4 and not set(random) & {0, 1, 18, 19}
    assert rows == plots.choose_rows(table, cfg)
    assert random != [i for i, why in plots.choose_rows(table, Plots(4, 2, 2, seed=1)) if why == "random"]
    # a set too small for every kind of row still gives each sample once
    small = table.head(3)
    assert sorted(i for i, _ in plots.choose_rows(small, cfg)) == [0, 1, 2]


def test_overlay_colours():
    given = np.zeros((4, 4, 3), np.uint8)
    made = np.zeros((4, 4, 3), np.uint8)
    given[0, 0] = given[1, 1] = 255
    made[1, 1] = made[2, 2] = 255
    image = plots.overlay(given, made)
    assert tuple(image[0, 0]) == plots.INPUT_EDGE and tuple(image[2, 2]) == plots.GENERATED_EDGE
    assert tuple(image[1, 1]) == plots.BOTH_EDGES and tuple(image[3, 3]) == (0, 0, 0)


def test_what_was_not_measured_is_drawn_and_reported_as_such(finished_project):
    """metrics.fid_bootstrap_resamples: 0 gives FID delta intervals of null, and every eval sample
    alone in its category gives no edge control: the charts skip them and the page says so (n/a
    and a warning), rather than inventing a number."""
    from stages.common import dataset
    from stages.common.io import write_json

    p = finished_project
    configs = dataset.load_eval_configs(p.path("eval_data"))
    for i, config in enumerate(configs):
        config["category"] = f"KIND {i}"
    write_json(p.path("eval_data") / dataset.EVAL_CONFIGS, configs)
    p.run("metrics", metrics__fid_bootstrap_resamples=0)
    metrics = read_json(p.path("metrics_detail"))["headline"]
    assert metrics["lora"]["fid_ci95_low"] is None and metrics["lora_minus_baseline"]["fid_ci95_high"] is None
    assert metrics["lora"]["kid_ci95_low"] is not None and metrics["lora"]["edge_control"] is None
    p.run("plots")
    p.run("report")
    page = p.path("report").read_text()
    assert "no interval" in page and "metrics.fid_bootstrap_resamples is 0" in page
    row = page.split("<th>edge control <span", 1)[1].split("</tr>", 1)[0]
    assert row.count("<span>n/a</span>") == 9 and "data-key" not in row, "three blocks, each value and interval"
    assert "no eval sample shares its category with another" in page

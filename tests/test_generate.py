"""generate-baseline / generate-lora: seeded, batch-independent, resumable, and the LoRA acts."""

import os

import numpy as np
import pytest

from stages.common import dataset
from stages.common.cli import StageError
from stages.common.generation import CONFIG_FILE
from stages.common.io import load_rgb, read_json
from tests.conftest import image_diff


def generated(p, variant):
    configs = dataset.load_eval_configs(p.path("eval_data"))
    paths = p.typed().paths
    return {c["index"]: load_rgb(dataset.generated_path(paths, variant, c["index"])) for c in configs}


def test_one_image_per_eval_config_named_by_index(trained_project):
    p = trained_project
    p.run("generate_baseline")
    configs = dataset.load_eval_configs(p.path("eval_data"))
    folder = p.path("generated_baseline")
    assert sorted(f.name for f in folder.glob("*.png")) == [f"{c['index']:06d}.png" for c in configs]
    res = p.params["extract"]["resolution"]
    assert all(img.shape == (res, res, 3) for img in generated(p, "baseline").values())
    assert read_json(folder / CONFIG_FILE)["generate"]["steps"] == p.params["generate"]["steps"]


def test_seeded_and_independent_of_batch_size(trained_project):
    p = trained_project
    p.run("generate_baseline", generate__batch_size=4)
    batched = generated(p, "baseline")
    for png in p.path("generated_baseline").glob("*.png"):
        png.unlink()
    p.run("generate_baseline", generate__batch_size=1)
    single = generated(p, "baseline")
    # batching is not bit-exact on CPU (about 3e-6 in float), so allow +-2 on uint8
    assert all(image_diff(batched[i], single[i]) <= 2 for i in batched)
    assert image_diff(single[0], single[1]) > 20, "different prompts and seeds give different images"


def test_resume_skips_finished_images_and_restarts_on_new_params(trained_project):
    p = trained_project
    p.run("generate_baseline")
    folder = p.path("generated_baseline")
    first = generated(p, "baseline")
    (folder / "000001.png").unlink()
    mtimes = {f.name: f.stat().st_mtime_ns for f in folder.glob("*.png")}
    p.run("generate_baseline")
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.png") if f.name in mtimes} == mtimes
    assert image_diff(generated(p, "baseline")[1], first[1]) <= 2  # made alone now, in a batch before
    # a different step count invalidates every image already there
    os.utime(folder / "000000.png", ns=(0, 0))
    p.run("generate_baseline", generate__steps=2)
    assert (folder / "000000.png").stat().st_mtime_ns != 0
    assert image_diff(generated(p, "baseline")[0], first[0]) > 0


def test_a_half_written_image_of_a_killed_run_is_removed(trained_project):
    p = trained_project
    p.run("generate_baseline")
    folder = p.path("generated_baseline")
    (folder / "000001.png").unlink()
    half = folder / ".000001.png.0a1b2c3d.tmp.png"  # what a kill inside save_png leaves
    half.write_bytes(b"\x89PNG half")
    p.run("generate_baseline")
    assert (folder / "000001.png").is_file() and not half.exists()


def test_missing_edges_are_named_before_loading_models(trained_project):
    p = trained_project
    dataset.edge_path(p.path("edges"), 1).unlink()
    with pytest.raises(StageError, match=r"000001.png: not found \(1 missing\); run `dvc repro canny-edges`"):
        p.run("generate_baseline")


def test_lora_changes_images_and_scale_zero_is_baseline(trained_project):
    p = trained_project
    p.run("generate_baseline")
    p.run("generate_lora")
    baseline, lora = generated(p, "baseline"), generated(p, "lora")
    assert max(image_diff(baseline[i], lora[i]) for i in baseline) > 0, "the trained LoRA changes the images"
    p.run("generate_lora", generate__lora_scale=0.0)
    off = generated(p, "lora")
    assert all(image_diff(baseline[i], off[i]) <= 1 for i in baseline)
    assert np.mean([image_diff(baseline[i], lora[i]) for i in baseline]) > np.mean(
        [image_diff(baseline[i], off[i]) for i in baseline])

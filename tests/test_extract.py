"""extract splits by product, decodes latin-1, and refuses bad inputs with a clear message."""

import h5py
import numpy as np
import pytest

from stages import extract
from stages.common import dataset, demo_garments
from stages.common.cli import StageError
from stages.common.io import load_rgb, read_json


def test_split_by_product_without_leaks(extracted):
    p = extracted
    captions = read_json(p.path("train_data") / dataset.TRAIN_CAPTIONS)
    configs = dataset.load_eval_configs(p.path("eval_data"))
    train_ids, eval_ids = set(captions["product_ids"]), {c["product_id"] for c in configs}
    assert len(train_ids) == p.params["extract"]["train_products"]
    assert len(eval_ids) == len(configs) == p.params["extract"]["eval_products"]
    assert not train_ids & eval_ids
    with h5py.File(p.path("demo_h5")) as f:
        ids = f["input_productID"][:, 0]
        poses = f["input_pose"][:, 0]
    # training keeps every pose of its products; eval keeps the first pose of each
    assert sorted(captions["rows"]) == sorted(np.flatnonzero(np.isin(ids, list(train_ids))).tolist())
    assert all(poses[c["row"]] == b"id_gridfs_1" for c in configs)


def test_outputs_at_resolution_with_decoded_prompts(extracted):
    p = extracted
    res = p.params["extract"]["resolution"]
    images, prompts = dataset.load_train_set(p.path("train_data"))
    assert images.shape[1:] == (res, res, 3) and images.dtype == np.uint8
    demo = p.params["demo"]
    garments = {g.product_id: g for g in demo_garments.make_garments(demo["seed"], demo["products"])}
    captions = read_json(p.path("train_data") / dataset.TRAIN_CAPTIONS)
    for pid, prompt in zip(captions["product_ids"], prompts, strict=True):
        assert prompt == garments[pid].describe_look()  # first clause, no "[b'...'" artefacts
    for c in dataset.load_eval_configs(p.path("eval_data")):
        assert load_rgb(dataset.gt_path(p.path("eval_data"), c["index"])).shape == (res, res, 3)
        assert c["image"] == f"gt/{c['index']:06d}.png"


def test_prompt_styles_keep_latin1():
    cell = np.array(["Robe en lin écru, col rond. Tencel®".encode("latin-1")], dtype="S400")
    text = extract.decode(cell)
    assert text == "Robe en lin écru, col rond. Tencel®"
    assert extract.make_prompt(text, "Écru Dress", "first_clause") == "Robe en lin écru"
    assert extract.make_prompt(text, "Écru Dress", "description") == text
    assert extract.make_prompt(text, "Écru Dress", "name") == "Écru Dress"
    assert extract.make_prompt("", "Écru Dress", "first_clause") == "Écru Dress"


def test_too_many_products_names_both_numbers(project):
    project.run("demo_data")
    project.set({"extract.train_products": 15, "extract.eval_products": 4})
    with pytest.raises(StageError, match=r"asked for 15 train \+ 4 eval = 19 products, but .* has only 16"):
        project.run("extract")


def test_missing_h5_names_the_path_and_param(project):
    project.set({"extract.h5": "data/raw/missing.h5"})
    with pytest.raises(StageError, match=r"extract.h5: data/raw/missing.h5 not found; set extract.h5"):
        project.run("extract")


def test_h5_without_fashiongen_keys(project, tmp_path):
    bad = tmp_path / "other.h5"
    with h5py.File(bad, "w") as f:
        f["input_image"] = np.zeros((2, 8, 8, 3), np.uint8)
    project.set({"extract.h5": str(bad)})
    with pytest.raises(StageError, match="key 'input_productID' missing"):
        project.run("extract")
    assert not project.path("train_data").exists(), "nothing half-written"

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


def test_split_summary_counts_each_side(project):
    project.run("demo_data")
    project.run("extract", extract__prompt="description")
    summary = read_json(project.path("split_summary"))
    configs = dataset.load_eval_configs(project.path("eval_data"))
    captions = read_json(project.path("train_data") / dataset.TRAIN_CAPTIONS)
    assert summary["eval"]["products"] == summary["eval"]["images"] == len(configs) == 4
    assert summary["train"]["products"] == 10 and summary["train"]["images"] == len(captions["rows"])
    assert summary["eval"]["categories"] == len({c["category"] for c in configs})
    with h5py.File(project.path("demo_h5")) as f:
        train_categories = {extract.decode(f["input_category"][r]) for r in captions["rows"]}
    assert summary["train"]["categories"] == len(train_categories)
    assert summary["train_categories_not_in_eval"] == len(train_categories - {c["category"] for c in configs})
    assert summary["source_products"] == project.params["demo"]["products"]
    # the tiny tokenizer spends one token per byte, so BOS + EOS + 75 bytes is the most that fits
    long = sum(len(p.encode()) > 75 for p in captions["prompts"])
    assert summary["train"]["prompts_over_77_tokens"] == long > 0
    assert summary["train"]["empty_descriptions"] == 0


def test_one_pass_reads_the_same_rows_as_fancy_indexing(extracted):
    p = extracted
    captions = read_json(p.path("train_data") / dataset.TRAIN_CAPTIONS)
    images, _ = dataset.load_train_set(p.path("train_data"))
    res = p.params["extract"]["resolution"]
    with h5py.File(p.path("demo_h5")) as f:
        for i, row in enumerate(captions["rows"]):
            assert np.array_equal(images[i], extract.to_resolution(f["input_image"][row], res))


def test_blocks_cover_the_rows_in_slices():
    rows = np.array([0, 1, 2, 10, 11, 30, 31, 32, 33, 34, 35])
    got = list(extract.blocks(rows, chunk=4))
    assert [(a, b) for a, b, _ in got] == [(0, 3), (10, 12), (30, 34), (34, 36)]
    assert np.concatenate([a + picks for a, _, picks in got]).tolist() == rows.tolist()
    assert [(a, b) for a, b, _ in extract.blocks(np.array([0, 3, 6]), chunk=100)] == [(0, 7)]  # gaps <= MAX_GAP


def write_variant(path, **datasets):
    """The demo file's datasets, some replaced by `datasets` (None drops the key)."""
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value


@pytest.fixture
def demo_arrays(project):
    project.run("demo_data")
    with h5py.File(project.path("demo_h5")) as f:
        return {k: f[k][:] for k in ("input_image", "input_productID", *extract.TEXT_KEYS)}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(input_image=d["input_image"].transpose(0, 3, 1, 2)), "input_image is uint8 of shape"),
    (lambda d: d.update(input_image=d["input_image"][..., 0]), r"expected uint8 \(N, H, W, 3\) RGB"),
    (lambda d: d.update(input_image=np.concatenate([d["input_image"], d["input_image"][..., :1]], -1)),
     "input_image is uint8 of shape"),
    (lambda d: d.update(input_image=d["input_image"].astype(np.float32)), "input_image is float32"),
    (lambda d: d.update(input_image=d["input_image"].astype(np.uint16)), "input_image is uint16"),
    (lambda d: d.update(input_productID=d["input_productID"][:-3]), "input_productID is int64 of shape"),
    (lambda d: d.update(input_description=np.repeat(d["input_description"], 2, axis=1)),
     r"input_description is \|S400 of shape \(\d+, 2\); expected fixed-width bytes"),
    (lambda d: d.update(input_name=np.zeros((len(d["input_name"]), 1))), "input_name is float64"),
])
def test_bad_layouts_name_the_file_and_key(project, demo_arrays, tmp_path, change, message):
    change(demo_arrays)
    bad = tmp_path / "bad.h5"
    write_variant(bad, **demo_arrays)
    project.set({"extract.h5": str(bad)})
    with pytest.raises(StageError, match=message) as err:
        project.run("extract")
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)
    assert not project.path("train_data").exists() and not project.path("eval_data").exists()


def test_not_hdf5_and_truncated_files(project, tmp_path):
    project.run("demo_data")
    for name, data in (("notes.h5", b"product,description\n1,dress\n"),
                       ("truncated.h5", project.path("demo_h5").read_bytes()[:100_000])):
        (tmp_path / name).write_bytes(data)
        project.set({"extract.h5": str(tmp_path / name)})
        with pytest.raises(StageError, match=rf"extract.h5: {tmp_path / name} is not a readable HDF5 file \("):
            project.run("extract")


def test_resolution_above_the_source_is_refused(project):
    project.run("demo_data")
    with pytest.raises(StageError, match="extract.resolution: 512 px is above .*'s 256 px images"):
        project.run("extract", extract__resolution=512)


def test_a_corrupt_eval_chunk_leaves_the_previous_split_untouched(extracted, tmp_path):
    """One pass, one commit: a read failing halfway leaves both old folders and the summary."""
    p = extracted
    before = {key: {f: f.read_bytes() for f in sorted(p.path(key).rglob("*")) if f.is_file()}
              for key in ("train_data", "eval_data")}
    summary = p.path("split_summary").read_bytes()
    last_eval_row = dataset.load_eval_configs(p.path("eval_data"))[-1]["row"]
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(p.path("demo_h5").read_bytes())
    with h5py.File(damaged) as f:
        info = f["input_image"].id.get_chunk_info(last_eval_row)
    with damaged.open("r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\xff" * 64)
    p.set({"extract.h5": str(damaged), "extract.seed": 1})  # new inputs, as a rerun would have
    with pytest.raises(StageError, match=r"cannot read rows \d+-\d+ .*the file is damaged: fetch it again"):
        p.run("extract")
    for key, files in before.items():
        assert {f: f.read_bytes() for f in sorted(p.path(key).rglob("*")) if f.is_file()} == files
    assert p.path("split_summary").read_bytes() == summary
    assert not [f for f in p.root.rglob("*.tmp")], "no temp files left behind"

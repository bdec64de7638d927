"""extract splits by product, decodes latin-1, cuts long prompts once; bad inputs: test_bad_inputs.py."""

import os
import stat

import h5py
import numpy as np
import pytest
from transformers import CLIPTokenizer

from stages import extract
from stages.common import dataset, fashiongen
from stages.common.errors import StageError
from stages.common.io import load_rgb, read_json
from stages.demo import garments


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
    drawn = {g.product_id: g for g in garments.make_garments(demo["seed"], demo["products"])}
    captions = read_json(p.path("train_data") / dataset.TRAIN_CAPTIONS)
    for pid, prompt in zip(captions["product_ids"], prompts, strict=True):
        assert prompt == drawn[pid].describe_look()  # first clause, no "[b'...'" artefacts
    for c in dataset.load_eval_configs(p.path("eval_data")):
        assert load_rgb(dataset.gt_path(p.path("eval_data"), c["index"])).shape == (res, res, 3)
        assert c["image"] == f"gt/{c['index']:06d}.png"


def test_prompt_styles_keep_latin1():
    cell = np.array(["Robe en lin écru, col rond. Tencel®".encode("latin-1")], dtype="S400")
    text = fashiongen.decode(cell)
    assert text == "Robe en lin écru, col rond. Tencel®"
    assert extract.make_prompt(text, "Écru Dress", "first_clause") == "Robe en lin écru"
    assert extract.make_prompt(text, "Écru Dress", "description") == text
    assert extract.make_prompt(text, "Écru Dress", "name") == "Écru Dress"
    assert extract.make_prompt("", "Écru Dress", "first_clause") == "Écru Dress"


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
        train_categories = {fashiongen.decode(f["input_category"][r]) for r in captions["rows"]}
    assert summary["train"]["categories"] == len(train_categories)
    assert summary["train_categories_not_in_eval"] == len(train_categories - {c["category"] for c in configs})
    assert summary["source_products"] == project.params["demo"]["products"]
    with h5py.File(project.path("demo_h5")) as f:
        descriptions = [fashiongen.decode(f["input_description"][r]) for r in captions["rows"]]
    tokenizer = CLIPTokenizer.from_pretrained(project.path("base_model") / dataset.TOKENIZER_DIR)
    long = sum(len(tokenizer(d, verbose=False).input_ids) > 77 for d in descriptions)
    assert summary["train"]["prompts_cut_to_77_tokens"] == long > 0
    assert summary["train"]["empty_descriptions"] == 0


def test_long_prompts_are_cut_once_at_a_word_boundary(project, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(project.path("base_model") / dataset.TOKENIZER_DIR)
    prompts = ["short one", "word " * 30, "x" * 120, "Ärmel " + "ab" * 80, "jersey, " * 20]
    fitted, cut = extract.fit_prompts(prompts, tokenizer)
    assert fitted[0] == "short one" and cut == 4
    for original, short in zip(prompts[1:], fitted[1:], strict=True):
        assert original.startswith(short) and short and len(tokenizer(short).input_ids) <= 77
        end = len(short)
        assert not original[end:end + 1].isalnum() or " " not in original[:end], "cut between words"
    assert set(fitted[1].split(" ")) == {"word"} and len(tokenizer(fitted[1] + " word").input_ids) > 77, \
        "as many whole words as fit"
    assert fitted[2] == "x" * 75, "one long word is cut at the token limit"
    assert fitted[3] == "Ärmel", "a cut through a word backs off to the word before"
    assert fitted[4].endswith("jersey"), "no trailing separator"


def test_generation_logs_no_truncation_warning(trained_project, caplog):
    trained_project.run("extract", extract__prompt="description")
    trained_project.run("canny_edges")
    configs = dataset.load_eval_configs(trained_project.path("eval_data"))
    with h5py.File(trained_project.path("demo_h5")) as f:
        descriptions = [fashiongen.decode(f["input_description"][c["row"]]) for c in configs]
    assert any(c["prompt"] != d for c, d in zip(configs, descriptions, strict=True)), "some eval prompts were cut"
    trained_project.run("generate_baseline")
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_one_pass_reads_the_same_rows_as_fancy_indexing(extracted):
    p = extracted
    captions = read_json(p.path("train_data") / dataset.TRAIN_CAPTIONS)
    images, _ = dataset.load_train_set(p.path("train_data"))
    res = p.params["extract"]["resolution"]
    with h5py.File(p.path("demo_h5")) as f:
        for i, row in enumerate(captions["rows"]):
            assert np.array_equal(images[i], extract.to_resolution(f["input_image"][row], res))


def test_eval_images_hold_the_rows_pixels(extracted):
    """The writer's threads and its zlib level change the PNG bytes, never the pixels."""
    p = extracted
    res = p.params["extract"]["resolution"]
    with h5py.File(p.path("demo_h5")) as f:
        for c in dataset.load_eval_configs(p.path("eval_data")):
            expected = extract.to_resolution(f["input_image"][c["row"]], res)
            np.testing.assert_array_equal(load_rgb(dataset.gt_path(p.path("eval_data"), c["index"])), expected)


def test_blocks_cover_the_rows_in_slices():
    rows = np.array([0, 1, 2, 10, 11, 30, 31, 32, 33, 34, 35])
    got = list(extract.blocks(rows, chunk=4))
    assert [(a, b) for a, b, _ in got] == [(0, 3), (10, 12), (30, 34), (34, 36)]
    assert np.concatenate([a + picks for a, _, picks in got]).tolist() == rows.tolist()
    assert [(a, b) for a, b, _ in extract.blocks(np.array([0, 3, 6]), chunk=100)] == [(0, 7)]  # gaps <= MAX_GAP


def test_a_killed_extract_leaves_nothing_that_the_next_one_keeps(project):
    project.run("demo_data")
    leftover = project.path("train_data").with_name(".train.0a1b2c3d.tmp")  # a kill mid-write leaves this
    leftover.mkdir(parents=True)
    (leftover / dataset.TRAIN_IMAGES).write_bytes(b"x" * 1_000_000)
    project.run("extract")
    assert not leftover.exists()
    assert not [f for f in project.root.rglob("*") if ".tmp" in f.name or f.name.endswith(".old")]


def test_outputs_are_readable_by_the_group_and_others(project):
    """0644 files and 0755 folders under the usual umask, not mkstemp's 0600 and mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        project.run("demo_data")
        project.run("extract")
    finally:
        os.umask(old)
    for key in ("train_data", "eval_data"):
        root = project.path(key)
        for path in [root, *root.rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE(project.path("split_summary").stat().st_mode) == 0o644
    assert stat.S_IMODE(project.path("demo_h5").stat().st_mode) == 0o644


def test_an_image_cap_takes_whole_products_in_order_and_stays_disjoint(project):
    project.run("demo_data")
    project.run("extract", extract__train_products=0)
    every = read_json(project.path("train_data") / dataset.TRAIN_CAPTIONS)
    evaluated = {c["product_id"] for c in dataset.load_eval_configs(project.path("eval_data"))}
    assert set(every["product_ids"]).isdisjoint(evaluated)
    assert len(set(every["product_ids"])) == project.params["demo"]["products"] - len(evaluated), "0: all the rest"

    project.run("extract", extract__train_images=25)
    capped = read_json(project.path("train_data") / dataset.TRAIN_CAPTIONS)
    assert len(capped["rows"]) == 25 and set(capped["rows"]) <= set(every["rows"])
    assert set(capped["product_ids"]).isdisjoint(evaluated)
    summary = read_json(project.path("split_summary"))
    assert summary["train"]["images"] == 25
    with pytest.raises(StageError, match=r"extract.train_images: 999 asked for, but the \d+ train products have only"):
        project.run("extract", extract__train_images=999)


def test_the_cap_cuts_at_most_one_product_and_grows_as_a_prefix():
    ids = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 6, 6])
    _, eval_rows = extract.split_products(ids, 0, 1, 0, "x")
    held_out = set(ids[eval_rows])
    previous = set()
    for cap in range(1, len(ids) - 3):
        rows, _ = extract.split_products(ids, 0, 1, 0, "x", cap)
        assert len(rows) == cap and not set(ids[rows]) & held_out
        assert previous <= set(rows.tolist()), "a bigger cap adds rows, never swaps them"
        partial = [p for p in set(ids[rows]) if (ids[rows] == p).sum() < (ids == p).sum()]
        assert len(partial) <= 1, "whole products, but for the last one taken"
        previous = set(rows.tolist())


# --- a FashionGen file from the internet: its header is checked before any data is read

SECRET = b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG"


def write_header(path, rows=4, side=256, text="S400", **makers):
    """A FashionGen-schema H5 whose datasets are declared but hold no data (a few kB on disk, any size),
    laid out as the real file: one gzip chunk per image, (N, 1) ids and latin-1 text. `makers` replace
    datasets: key=(file, key) -> None."""
    def images(f, key):
        f.create_dataset(key, (rows, side, side, 3), np.uint8, chunks=(1, side, side, 3), compression="gzip")
    makers = {"input_image": images, "input_productID": lambda f, key: f.create_dataset(key, (rows, 1), np.int64),
              **{key: lambda f, key: f.create_dataset(key, (rows, 1), text) for key in fashiongen.TEXT_KEYS}, **makers}
    with h5py.File(path, "w") as f:
        for key, make in makers.items():
            make(f, key)
    return path


def test_fashiongen_headers_pass_and_slices_fit_the_budget(extracted, tmp_path):
    """FashionGen's real layout, and the largest one allowed, pass every bound: the headers hold no
    data, so the last check, that every declared byte is stored, is what refuses them."""
    with h5py.File(extracted.path("demo_h5")) as f:
        assert fashiongen.check_layout(f, extracted.path("demo_h5"), 64) == len(f["input_image"])
    full_size = write_header(tmp_path / "fashiongen_256_256_train.h5", rows=260_490)
    with h5py.File(full_size) as f:
        with pytest.raises(StageError, match=r"input_image declares shape \(260490, 256, 256, 3\), but the file "
                                             r"stores 0 of its 260,490 chunks"):
            fashiongen.check_layout(f, full_size, 256)
        assert fashiongen.rows_per_slice(f, 256) == 256, "FashionGen's slices are not cut"
    largest = write_header(tmp_path / "largest.h5", rows=fashiongen.MAX_ROWS, side=fashiongen.MAX_IMAGE_SIDE,
                           text=f"S{fashiongen.MAX_TEXT_WIDTH}")
    with h5py.File(largest) as f:
        with pytest.raises(StageError, match=r"input_image declares shape .* but the file stores 0 of its"):
            fashiongen.check_layout(f, largest, 256)
        rows = fashiongen.rows_per_slice(f, 256)
        assert rows == 10 and rows * (3 * fashiongen.MAX_IMAGE_SIDE ** 2 + 3 * fashiongen.MAX_TEXT_WIDTH + 8) \
            <= fashiongen.SLICE_BUDGET


def external_storage(f, key):
    f.create_dataset(key, (4, 1), "S400", external=[("credentials", 0, h5py.h5f.UNLIMITED)])


def external_link(f, key):
    f[key] = h5py.ExternalLink("other.h5", "/input_description")


def virtual_dataset(f, key):
    layout = h5py.VirtualLayout((4, 1), "S400")
    layout[:] = h5py.VirtualSource("other.h5", "input_description", (4, 1))
    f.create_virtual_dataset(key, layout)


@pytest.mark.parametrize("route", [external_storage, external_link, virtual_dataset])
def test_a_file_that_reads_another_file_is_refused_without_reading_it(route, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HDF5 finds the relative names from here
    (tmp_path / "credentials").write_bytes((SECRET + b"\n") * 100)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["input_description"] = np.full((4, 1), SECRET, "S400")
    bad = write_header(tmp_path / "bad.h5", input_description=route)
    with h5py.File(bad) as f:
        with pytest.raises(StageError, match=r"bad.h5: input_description is .*; a FashionGen H5 keeps") as refused:
            fashiongen.check_layout(f, bad, 64)
        assert SECRET in f["input_description"][0, 0], "what h5py alone would have put in the prompts"
    assert SECRET.decode() not in str(refused.value)

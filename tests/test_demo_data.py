"""The embedded demo is an exact FashionGen-schema H5 whose text tells the truth about its images."""

import h5py
import numpy as np
import pytest

from stages.demo import garments as dg


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.h5"
    garments = dg.make_garments(seed=0, products=40)
    dg.write_h5(path, garments)
    return path, garments


def test_schema_matches_fashiongen(demo_file):
    path, garments = demo_file
    with h5py.File(path) as f:
        assert sorted(f.keys()) == sorted(dg.H5_KEYS) and len(f.keys()) == 16
        n = len(f["input_image"])
        assert n == sum(g.poses for g in garments)
        assert f["input_image"].shape == (n, 256, 256, 3) and f["input_image"].dtype == np.uint8
        assert f["input_description"].dtype == np.dtype("S400")
        for key in dg.TEXT_WIDTHS:
            assert f[key].shape == (n, 1) and f[key].dtype.kind == "S", key
        assert f["input_productID"].shape == (n, 1) and f["input_productID"].dtype.kind == "i"
        assert f["input_msrpUSD"].dtype == np.float32
        assert f["index_2"].shape == (n,)
        assert isinstance(f["input_description"][0], np.ndarray)  # a 1-element array, not bytes


def test_products_are_consecutive_with_one_to_six_poses(demo_file):
    path, _ = demo_file
    with h5py.File(path) as f:
        ids = f["input_productID"][:, 0]
        poses = [p[0].decode() for p in f["input_pose"][:]]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    assert len(starts) == len(np.unique(ids)), "a product's rows must be consecutive"
    runs = np.diff(np.r_[starts, len(ids)])
    assert runs.min() >= 1 and runs.max() <= 6
    for start, run in zip(starts, runs, strict=True):
        assert poses[start:start + run] == [f"id_gridfs_{k + 1}" for k in range(run)]


def test_text_is_latin1_with_accents_and_ampersands():
    garments = dg.make_garments(seed=0, products=120)
    categories = {g.category for g in garments}
    assert "JACKETS & COATS" in categories
    raw = [g.description().encode("latin-1") for g in garments]
    assert any("é".encode("latin-1") in r or "®".encode("latin-1") in r for r in raw)
    # The seed recipe's trap: decoding latin-1 bytes as UTF-8 loses characters.
    accented = next(r for r in raw if b"\xe9" in r)
    assert accented.decode("utf-8", errors="ignore") != accented.decode("latin-1")


def test_deterministic_from_seed(tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    dg.write_h5(a, dg.make_garments(3, 6))
    dg.write_h5(b, dg.make_garments(3, 6))
    dg.write_h5(c, dg.make_garments(4, 6))
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        for key in dg.H5_KEYS:
            np.testing.assert_array_equal(fa[key][:], fb[key][:], err_msg=key)
        assert not np.array_equal(fa["input_description"][:], fc["input_description"][:])


def _share(image, rgb, tol=40):
    return (np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) < tol).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_description_agrees_with_drawing(seed):
    for g in dg.make_garments(seed, 30):
        image = dg.draw(g, pose=0)
        assert f" in {g.colour}" in g.describe_look()
        # the named colour is the garment's main colour
        garment_pixels = (image < 240).any(axis=-1).mean()
        assert _share(image, dg.COLOURS[g.colour]) > 0.3 * garment_pixels, g
        covered = (image < 240).any(axis=-1)
        if g.kind in ("top", "jacket", "dress"):
            # long sleeves reach the bottom outer corners, short ones do not, sleeveless has none
            reach = covered[150:180, 40:75].any()
            assert reach == (g.length == "long sleeve"), g
        if g.kind == "trousers":
            assert covered[200:225, 90:166].any() == (g.length == "full length"), g
        if g.kind == "skirt":
            assert covered[175:225, 60:196].any() == (g.length == "maxi"), g


def test_stage_writes_the_file(project):
    project.run("demo_data")
    path = project.path("demo_h5")
    with h5py.File(path) as f:
        assert len(np.unique(f["input_productID"][:])) == project.params["demo"]["products"]
    assert not list(path.parent.glob(".*tmp*")), "no temp files left behind"

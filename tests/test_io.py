"""Atomic writes, leftovers, permissions, damaged files, resume fingerprints and the image writer."""

import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dvc.fs import LocalFileSystem
from PIL import Image

from stages.common.errors import StageError
from stages.common.io import (OLD_SUFFIX, ImageWriter, atomic_dir, atomic_dirs, atomic_file, check_images, fingerprint,
                              load_rgb, read_json, remove_temps, save_png, source_files)
from tests.conftest import EPS, REPO


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fingerprint_follows_settings_bytes_and_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"abc")
    base = fingerprint({"steps": 20}, folder)
    assert fingerprint({"steps": 20}, folder) == base
    assert fingerprint({"steps": 40}, folder) != base
    (folder / "x.bin").write_bytes(b"abd")
    changed = fingerprint({"steps": 20}, folder)
    assert changed != base
    (folder / "x.bin").rename(folder / "y.bin")
    assert fingerprint({"steps": 20}, folder) != changed


def test_source_files_cover_every_stage_module():
    names = {p.name for p in source_files()}
    assert {"train_lora.py", "generation.py", "models.py", "runtime.py", "params.py"} <= names


def test_atomic_dirs_commit_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "train", tmp_path / "eval"
    with atomic_dirs(a, b) as (ta, tb):
        (ta / "x").write_text("old a")
        (tb / "x").write_text("old b")
    real_replace = os.replace
    calls = []

    def replace_fails_on_the_last_move(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst) == b and Path(src).name.endswith(".tmp"):  # moving the new eval folder in
            raise OSError(errno.EIO, "I/O error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_on_the_last_move)
    with pytest.raises(OSError), atomic_dirs(a, b) as (ta, tb):
        (ta / "x").write_text("new a")
        (tb / "x").write_text("new b")
    monkeypatch.undo()
    assert (a / "x").read_text() == "old a" and (b / "x").read_text() == "old b", "both rolled back"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "train"], "no temp or .old folder left"
    # every old folder moved aside before any new one moved in: never old and new side by side
    assert [dst.startswith(".") for _, dst in calls[:2]] == [True, True]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    target = tmp_path / "train"
    (tmp_path / ".train.0a1b2c3d.tmp").mkdir()
    (tmp_path / ".train.0a1b2c3d.tmp" / "images.npy").write_bytes(b"x" * 1000)
    (tmp_path / ".train.old").mkdir()
    (tmp_path / ".trainer.0a1b2c3d.tmp").mkdir()  # other outputs' leftovers: not train's to remove
    (tmp_path / ".train.json.0a1b2c3d.tmp.json").write_text("{")
    (tmp_path / ".x.json.0a1b2c3d.tmp.json").write_text("{")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".train.json.0a1b2c3d.tmp.json", ".trainer.0a1b2c3d.tmp", ".x.json.0a1b2c3d.tmp.json", "train"]
    with atomic_file(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".train.json.0a1b2c3d.tmp.json", ".trainer.0a1b2c3d.tmp", "train", "x.json"]


KILLED_SWAP = """
import os, sys
from pathlib import Path
from stages.common.io import atomic_dirs
root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == kill_at:
        os._exit(9)  # kill -9: no cleanup, no rollback
    real(src, dst)
os.replace = replace
with atomic_dirs(root / "train", root / "eval") as (train, evaluate):
    (train / "x").write_text("new")
    (evaluate / "x").write_text("new")
"""


@pytest.mark.parametrize("kill_at", range(1, 7))  # the journal's write, two moves aside, two moves in, none
def test_a_kill_at_any_point_of_a_swap_never_mixes_runs(tmp_path, kill_at):
    with atomic_dirs(tmp_path / "train", tmp_path / "eval") as folders:
        for folder in folders:
            (folder / "x").write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(tmp_path), str(kill_at)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == (9 if kill_at <= 5 else 0), killed.stderr
    # the next writer of the unit starts by finishing (or forgetting) the interrupted swap
    with pytest.raises(RuntimeError), atomic_dirs(tmp_path / "train", tmp_path / "eval"):
        raise RuntimeError("the next run fails")
    contents = {(tmp_path / name / "x").read_text() for name in ("train", "eval")}
    assert contents == ({"old"} if kill_at == 1 else {"new"}), "both folders from one run, and none lost"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "train"], "no leftovers"


def test_remove_temps_keeps_finished_files(tmp_path):
    (tmp_path / "000000.png").write_bytes(b"done")
    (tmp_path / ".000001.png.0a1b2c3d.tmp.png").write_bytes(b"half")
    remove_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["000000.png"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "metrics.json") as tmp:
            tmp.write_text("{}")
        with atomic_dirs(tmp_path / "train") as (folder,):
            (folder / "images.npy").write_bytes(b"x")
        save_png(tmp_path / "train" / "000000.png", np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "train").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "train" / "000000.png").stat().st_mode) == 0o666 & ~umask


def test_temp_names_are_ignored_by_dvc(tmp_path):
    """.dvcignore matches every name the atomic writers use, so DVC never tracks a leftover."""
    from dvc.ignore import DvcIgnorePatterns

    ignore = DvcIgnorePatterns.from_file(str(REPO / ".dvcignore"), LocalFileSystem(), ".dvcignore")
    folder = tmp_path / "gen"
    names = []
    with atomic_file(folder / "000005.png") as tmp:
        names.append(tmp.name)
        with atomic_dirs(folder / "sub") as (sub,):
            names += [sub.name, f".sub{OLD_SUFFIX}"]
    for name in names:
        assert ignore.matches(str(REPO), name), name
    assert not ignore.matches(str(REPO), "000005.png") and not ignore.matches(str(REPO), "images.npy")


def test_damaged_json_and_images_are_one_line(tmp_path):
    (tmp_path / "eval_configs.json").write_text('[{"index": 0,')
    with pytest.raises(StageError, match=r"eval_configs.json: not valid JSON \(.*line 1.*\); restore it with "):
        read_json(tmp_path / "eval_configs.json")
    good = tmp_path / "000000.png"
    save_png(good, np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "000001.png"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(StageError, match=r"000001.png: not a readable image \(cannot identify image file\); restore it "
                                         r"with `dvc checkout canny-edges` or rebuild it with `dvc repro -f canny-edges`"):
        check_images([good, bad], "canny-edges")
    with pytest.raises(StageError, match=r"000002.png: not found \(1 missing\); run `dvc repro canny-edges`"):
        check_images([good, tmp_path / "000002.png"], "canny-edges")
    with pytest.raises(StageError, match="000001.png: not a readable image"):
        load_rgb(bad)


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors orders header metadata by a per-process random hash; ours sorts it. Each save
    runs in its own interpreter, where the random order would differ."""
    import subprocess
    import sys

    code = ("import sys, torch; from stages.common.io import save_safetensors; "
            "save_safetensors(sys.argv[1], {'b': torch.ones(3), 'a.alpha': torch.tensor(4.0)}, "
            "{f'key{i}': str(i) for i in range(12)})")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in files:
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    from safetensors import safe_open
    with safe_open(files[0], "pt") as f:
        assert f.metadata() == {f"key{i}": str(i) for i in range(12)}
        assert f.get_tensor("a.alpha").item() == 4.0 and f.get_tensor("b").tolist() == [1.0, 1.0, 1.0]


def photos(count: int, size: int = 64) -> list[np.ndarray]:
    """Noisy images: a PNG encoder has real work on them, unlike flat colours."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def slow_saves(monkeypatch, gate: threading.Event | None = None, seconds: float = 0.0):
    """Make every PNG encode wait (for `gate`, or `seconds`) once its temp file exists."""
    real_save = Image.Image.save

    def save(self, *args, **kwargs):
        if gate is not None:
            gate.wait(10)
        time.sleep(seconds)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_image_writer_writes_what_save_png_writes_pixel_for_pixel(tmp_path):
    images = photos(6)
    with ImageWriter() as writer:
        for i, image in enumerate(images):
            writer.submit(tmp_path / "pool" / f"{i}.png", image if i % 2 else Image.fromarray(image))
    for i, image in enumerate(images):
        save_png(tmp_path / "one" / f"{i}.png", image)
        np.testing.assert_array_equal(load_rgb(tmp_path / "pool" / f"{i}.png"), image)  # PNG is lossless
        assert (tmp_path / "pool" / f"{i}.png").read_bytes() == (tmp_path / "one" / f"{i}.png").read_bytes()


def test_a_failed_write_surfaces_in_the_caller_naming_its_file(tmp_path, monkeypatch):
    real_save = Image.Image.save
    full = tmp_path / "000003.png"

    def disk_fills_up_at_the_fourth(self, fp, *args, **kwargs):
        if Path(fp).name.startswith(f".{full.name}."):  # the temp file beside it
            raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() says it: no file name
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_fills_up_at_the_fourth)
    with pytest.raises(OSError) as caught, ImageWriter() as writer:
        for i, image in enumerate(photos(8)):
            writer.submit(tmp_path / f"{i:06d}.png", image)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(full)  # run_cli's line names it
    assert not full.exists() and not list(tmp_path.glob(".*")), "no temp file left"


def test_an_exception_in_the_block_leaves_whole_files_or_none(tmp_path, monkeypatch):
    slow_saves(monkeypatch, seconds=0.05)
    images = photos(20)
    with pytest.raises(RuntimeError, match="the caller failed"), ImageWriter(threads=2, in_flight=8) as writer:
        for i, image in enumerate(images):
            writer.submit(tmp_path / f"{i}.png", image)
        raise RuntimeError("the caller failed")
    written = sorted(tmp_path.iterdir())
    assert len(written) < len(images), "writes not yet started were dropped"
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in written), "no temp file left"
    for path in written:
        np.testing.assert_array_equal(load_rgb(path), images[int(path.stem)])


def test_images_in_flight_are_bounded(tmp_path, monkeypatch):
    gate = threading.Event()
    slow_saves(monkeypatch, gate)
    submitted = []

    def produce():
        with ImageWriter(threads=2, in_flight=3) as writer:
            for i, image in enumerate(photos(6)):
                writer.submit(tmp_path / f"{i}.png", image)
                submitted.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 10
    while len(submitted) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(submitted) == 3, "the fourth submit waits while three images are held"
    gate.set()
    producer.join(10)
    assert len(submitted) == 6 and len(list(tmp_path.glob("*.png"))) == 6


class DiskLog:
    """What reaches the disk, in order: fsyncs (by path), renames and deletions."""

    def __init__(self, monkeypatch):
        self.events = []
        real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src, dst):
            self.events.append(("rename", str(src), str(dst)))
            real_replace(src, dst)

        def unlink(path, missing_ok=False):
            self.events.append(("delete", str(path)))
            real_unlink(path, missing_ok=missing_ok)

        def rmtree(path, **kwargs):
            self.events.append(("delete", str(path)))
            real_rmtree(path, **kwargs)

        real_rmtree = shutil.rmtree
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)
        monkeypatch.setattr(shutil, "rmtree", rmtree)

    def at(self, *event) -> int:
        return self.events.index(tuple(str(e) for e in event))

    def last(self, *event) -> int:
        return len(self.events) - 1 - self.events[::-1].index(tuple(str(e) for e in event))


def test_a_file_is_on_the_disk_before_its_name_and_its_name_before_the_call_returns(tmp_path, monkeypatch):
    disk = DiskLog(monkeypatch)
    target = tmp_path / "metrics.json"
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    # a power cut between the rename and a late writeback would leave the new name on an empty file
    assert disk.at("fsync", tmp) < disk.at("rename", tmp, target) < disk.at("fsync", tmp_path)


def test_a_new_folder_is_whole_on_the_disk_before_the_journal_and_its_name_before_the_old_data_goes(
        tmp_path, monkeypatch):
    target = tmp_path / "edges"
    with atomic_dir(target) as tmp:
        (tmp / "old.png").write_bytes(b"old")
    disk = DiskLog(monkeypatch)
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.png").write_bytes(b"plain write, no fsync of its own")
        save_png(tmp / "b.png", np.zeros((4, 4, 3), np.uint8))
    journal = next(e for e in disk.events if e[0] == "rename" and e[2].endswith(".commit"))
    moved_in = disk.at("rename", tmp, target)
    for written in (tmp / "sub" / "a.png", tmp / "sub", tmp / "b.png", tmp):
        assert disk.at("fsync", written) < disk.events.index(journal) < moved_in, written
    assert moved_in < disk.last("fsync", tmp_path) < disk.at("delete", tmp_path / f".edges{OLD_SUFFIX}"), \
        "the parent folder's new entries reach the disk before the old folder goes"
    assert sorted(p.name for p in target.rglob("*")) == ["a.png", "b.png", "sub"]


def test_the_previous_checkpoint_goes_only_once_the_new_one_is_on_the_disk(tmp_path, monkeypatch):
    from stages.train_lora import save_checkpoint

    save_checkpoint(tmp_path, {"step": 1, "weights": torch.ones(2)})
    disk = DiskLog(monkeypatch)
    save_checkpoint(tmp_path, {"step": 2, "weights": torch.ones(2)})
    new, old = tmp_path / "checkpoint-000002.pt", tmp_path / "checkpoint-000001.pt"
    renamed = next(i for i, e in enumerate(disk.events) if e[0] == "rename" and e[2] == str(new))
    synced = disk.events.index(("fsync", disk.events[renamed][1]))
    assert synced < renamed < disk.at("fsync", tmp_path) < disk.at("delete", old)
    assert [p.name for p in tmp_path.iterdir()] == [new.name]


def test_a_failed_fsync_publishes_nothing_and_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")

    def fsync_fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError) as caught, atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp / "a")
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://x\",\"click\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx",
                                  "'quoted", "Long sleeve dress", "", "a=b"])
def test_csv_text_never_starts_a_formula_and_reads_back_exactly(text):
    from stages.common.io import FORMULA_PREFIXES, csv_text, csv_text_read

    assert not csv_text(text).startswith(FORMULA_PREFIXES)
    assert csv_text_read(csv_text(text)) == text
    assert csv_text(text) == text or text.startswith((*FORMULA_PREFIXES, "'"))


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "EPS"])
def test_images_decode_only_from_png_jpeg_or_webp_whatever_their_name(tmp_path, monkeypatch, fmt):
    """PIL renders an EPS by running Ghostscript: a file named .png must not get that far."""
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was asked to render an input")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    path = tmp_path / "000000.png"
    if fmt == "EPS":
        path.write_bytes(EPS)
    else:
        Image.new("RGB", (4, 4)).save(path, format=fmt)
    with pytest.raises(StageError, match=r"000000.png: not a readable image"):
        check_images([path], "extract")
    with pytest.raises(StageError, match=r"000000.png: not a readable image"):
        load_rgb(path)
    for fmt in ("PNG", "JPEG", "WEBP"):
        Image.new("RGB", (4, 4), "red").save(path, format=fmt)
        check_images([path], "extract")
        assert load_rgb(path).shape == (4, 4, 3)


def test_a_file_system_that_cannot_sync_folders_still_publishes(tmp_path, monkeypatch):
    """Some network and FUSE file systems answer EINVAL to fsync on a folder (POSIX allows it); a
    file they cannot sync is still an error."""
    real_fsync = os.fsync

    def no_folder_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    with atomic_dir(tmp_path / "out") as tmp:
        save_png(tmp / "a.png", np.zeros((4, 4, 3), np.uint8))
    with atomic_file(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "x.json").read_text() == "{}"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    with pytest.raises(OSError, match="Invalid argument"), atomic_file(tmp_path / "y.json") as tmp:
        tmp.write_text("{}")
    assert not (tmp_path / "y.json").exists()

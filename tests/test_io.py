"""Atomic writes and resume fingerprints."""

import pytest

from stages.common.io import atomic_dir, atomic_file, fingerprint, source_files


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

"""bundle: one reproducible zip of a finished run; refuses stale results and missing files. The
up-to-date check against a real DVC repo runs in test_pipeline_e2e.py."""

import io
import logging
import shutil
import sys
import zipfile
from pathlib import PurePosixPath

import pytest
import yaml

from fashion import bundle
from stages.common.errors import StageError
from stages.common.dataset import LORA_WEIGHTS


@pytest.fixture
def finished_with_lock(finished_project):
    (finished_project.root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    return finished_project


def test_bundle_holds_the_run(finished_with_lock):
    p = finished_with_lock
    bundle.main(["--allow-stale"])
    data = p.path("bundle").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert {"report/index.html", "metrics/metrics.json", "metrics/metrics_detail.json", "metrics/per_sample.csv",
                f"models/lora/{LORA_WEIGHTS}", "models/lora/training_config.json", "dvc.lock",
                bundle.RESOLVED_PARAMS} <= names
        assert archive.testzip() is None
        assert archive.read("metrics/metrics.json") == p.path("metrics").read_bytes()
        assert archive.read(f"models/lora/{LORA_WEIGHTS}") == (p.path("lora") / LORA_WEIGHTS).read_bytes()
        resolved = yaml.safe_load(archive.read(bundle.RESOLVED_PARAMS))
        assert resolved["train"]["max_steps"] == p.params["train"]["max_steps"] and "paths" in resolved
    bundle.main(["--allow-stale"])
    assert p.path("bundle").read_bytes() == data, "same files, same zip"


def test_bundle_refuses_missing_files_and_unknown_options(finished_with_lock):
    p = finished_with_lock
    with pytest.raises(StageError, match="unknown argument '--force'"):
        bundle.main(["--force"])
    p.path("report").unlink()
    with pytest.raises(StageError, match=r"report/index.html: not found; run `dvc repro report`"):
        bundle.main(["--allow-stale"])
    assert not p.path("bundle").exists()


def test_bundle_refuses_when_dvc_cannot_vouch_for_the_files(finished_with_lock):
    """Not a DVC repo here: `dvc status` fails, so freshness is unknown; one line, no zip."""
    with pytest.raises(StageError, match=r"dvc status failed \(.+\); run it here to see why, or pass --allow-stale"):
        bundle.main([])
    assert not finished_with_lock.path("bundle").exists()


def test_entry_names_stay_inside_the_bundle(finished_with_lock, tmp_path_factory, caplog):
    """paths.* outside the repository (`../x`, an absolute path on another disk) go in under
    external/<key>/; one inside it, absolute or not, by its path there. No entry is absolute or
    climbs out with `..`: unpacking writes under the unpacking folder only (no zip slip)."""
    p = finished_with_lock
    outside = p.root.parent / f"outside-{p.root.name}"  # ../outside-<this test's folder>
    outside.mkdir()
    shutil.copy(p.path("report"), outside / "report.html")
    elsewhere = tmp_path_factory.mktemp("other_disk")
    shutil.copy(p.path("metrics_detail"), elsewhere / "detail.json")
    shutil.copytree(p.path("lora"), elsewhere / "lora")
    inside = p.path("per_sample").resolve()
    p.set({"paths.report": f"../{outside.name}/report.html", "paths.metrics_detail": str(elsewhere / "detail.json"),
           "paths.lora": str(elsewhere / "lora"), "paths.per_sample": str(inside)})
    with caplog.at_level(logging.INFO, logger="stages"):
        bundle.main(["--allow-stale"])
    with zipfile.ZipFile(p.path("bundle")) as archive:
        names = archive.namelist()
        assert names == sorted(names) and len(set(names)) == len(names)
        assert [n for n in names if n.startswith("/") or ".." in PurePosixPath(n).parts or "\\" in n] == []
        assert archive.read("external/report/report.html") == (outside / "report.html").read_bytes()
        assert archive.read("external/metrics_detail/detail.json") == p.path("metrics_detail").read_bytes()
        assert archive.read(f"external/lora/{LORA_WEIGHTS}") == (elsewhere / "lora" / LORA_WEIGHTS).read_bytes()
        assert archive.read("metrics/per_sample.csv") == inside.read_bytes()
        assert {"metrics/metrics.json", "dvc.lock", bundle.RESOLVED_PARAMS} <= set(names)
        resolved = yaml.safe_load(archive.read(bundle.RESOLVED_PARAMS))
        assert resolved["paths"]["report"] == f"../{outside.name}/report.html", "where it came from"
    assert f"paths.report (../{outside.name}/report.html) is outside the repository: it goes in under " \
           "external/report/" in caplog.text
    assert caplog.text.count("paths.lora (") == 1


def test_a_backslash_in_a_name_is_refused(finished_with_lock):
    """`..\\..\\x` is one harmless name on Linux, and two folders up on Windows."""
    p = finished_with_lock
    (p.path("lora") / "..\\..\\evil.txt").write_text("x")
    with pytest.raises(StageError, match=r"evil.txt: a backslash in its name, which unpacks as a folder on Windows"):
        bundle.main(["--allow-stale"])
    assert not p.path("bundle").exists()


def test_two_files_under_one_entry_name_are_refused(finished_with_lock):
    p = finished_with_lock
    shutil.copy(p.path("metrics_detail"), p.root / bundle.RESOLVED_PARAMS)
    p.set({"paths.metrics_detail": bundle.RESOLVED_PARAMS})
    with pytest.raises(StageError, match=r"^paths.metrics_detail: params.resolved.yaml would be params.resolved.yaml "
                                         r"in the bundle, as the resolved params is; give it another name$"):
        bundle.main(["--allow-stale"])
    assert not p.path("bundle").exists()


def test_the_bundle_carries_no_secret(finished_with_lock, monkeypatch, capsys):
    """A URL with a password cannot reach params.resolved.yaml: params refuse it, no zip is written."""
    from stages.common.cli import run_cli

    p = finished_with_lock
    p.set({"models.alexnet_url": "https://alice:hunter2@mirror.example/alexnet.pth?sig=5ec7e7"})
    monkeypatch.setattr(sys, "argv", ["fashion-bundle", "--allow-stale"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(bundle.main)
    out, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert err.strip().splitlines()[-1].startswith("error: params.yaml: models.alexnet_url: "
                                                   "https://...@mirror.example/alexnet.pth?... carries")
    assert [s for s in ("alice", "hunter2", "5ec7e7") if s in out + err] == []
    assert not p.path("bundle").exists()

"""bundle: one reproducible zip of a finished run; refuses stale results and missing files. The
up-to-date check against a real DVC repo runs in test_pipeline_e2e.py."""

import io
import zipfile

import pytest
import yaml

from fashion import bundle
from stages.common.errors import StageError
from stages.common.models import LORA_WEIGHTS


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

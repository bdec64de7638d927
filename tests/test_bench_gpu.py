"""`make gpu-check`'s CPU path (--tiny): its three parts run through the project's own code
(tests/test_cuda.py, bench/gpu.py --short, every stage) and land in the JSON and the table. No
timing is asserted: CI has no GPU."""

import json
from pathlib import Path

import pytest
import torch

from bench import gpu_check


def test_the_cpu_path_of_gpu_check_runs_every_part(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["tiny"]
    tests = result["tests"]
    assert tests["passed"] == 0 and tests["skipped"] == len(tests["tests"]) >= 9, "skipped on a CPU, and said so"
    assert all(t["message"].endswith(("needs a CUDA device", "needs two GPUs")) for t in tests["tests"])
    names = [r["name"] for r in result["bench"]["rows"]]
    assert names == ["train: seed recipe", "train: train-lora, 4 per step", "train: train-lora, batch 8",
                     "generate: notebook recipe, 2 steps", "generate: generate stages, 2 steps"]
    assert all(r["rate"] > 0 and r["tflops"] > 0 for r in result["bench"]["rows"])
    assert result["bench"]["rows"][1]["encode_images_per_s"] > 0 and result["bench"]["seed_run_estimate_s"]
    stages = [r["stage"] for r in result["smoke"]["stages"]]
    assert stages == ["build models"] + [s.replace("_", "-") for s in gpu_check.STAGES]
    assert "error" not in result["smoke"]["stages"][-1] and "fid" in result["smoke"]["metrics"]["baseline"]
    table = out.with_suffix(".txt").read_text()
    assert table == capsys.readouterr().out.split("\ngpu-check: JSON in")[0]
    assert "tests/test_cuda.py: ok (0 passed, 0 failed, 0 errors," in table and "  report " in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_read_only_folder_keeps_the_results(tmp_path, monkeypatch, capsys):
    """--out in a folder it cannot write (an attached Kaggle dataset): the table is printed first and
    the files go to the temp folder, not lost to a traceback at the end of the run."""
    monkeypatch.setattr(gpu_check, "run_tests", lambda folder: {"ok": True, "passed": 0, "failed": 0, "error": 0,
                                                                "skipped": 0, "tests": []})
    monkeypatch.setattr(gpu_check, "run_bench", lambda folder, tiny: {"ok": False, "error": "bench: boom"})
    monkeypatch.setattr(gpu_check, "run_smoke", lambda folder, tiny, dev: {"ok": True, "stages": []})
    monkeypatch.setattr(gpu_check.tempfile, "gettempdir", lambda: str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    read_only, write_text = tmp_path / "dataset", Path.write_text

    def refuse(path, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        if path.parent == read_only:
            raise PermissionError(13, "Read-only file system", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    assert gpu_check.main(["--tiny", "--out", str(read_only / "check.json")]) == 1, "a failed part fails"
    out = capsys.readouterr().out
    assert "bench/gpu.py --short: FAILED" in out and f"JSON in {tmp_path / 'temp' / 'check.json'}" in out
    assert json.loads((tmp_path / "temp" / "check.json").read_text())["bench"]["error"] == "bench: boom"


def test_without_a_gpu_it_says_so_and_points_at_tiny(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "check.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA (or ROCm) device" in err[0] and "--tiny" in err[0]
    assert not (tmp_path / "check.json").exists()

"""End to end: `dvc repro` on a copy of this repo runs the whole DAG, caches it, and reruns
exactly what a param change touches."""

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMALL, set_dotted

ALL_STAGES = ["demo-data", "fetch-models", "extract", "canny-edges", "train-lora", "generate-baseline",
              "generate-lora", "metrics", "plots", "report"]


def copy_repo(target: Path) -> None:
    """The repo as a fresh clone would see it: tracked plus untracked-but-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def copy_small_repo(target: Path) -> dict:
    """copy_repo with the test suite's small params written in; returns them."""
    copy_repo(target)
    params = yaml.safe_load((target / "params.yaml").read_text())
    for key, value in SMALL.items():
        set_dotted(params, key, value)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def stage_env(**extra) -> dict:
    """Stage commands say `python`: make it this interpreter, on the CPU with one thread."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", **extra}


def reproduce(root: Path) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in repo.reproduce()]


@pytest.mark.slow
def test_dvc_repro_runs_caches_and_reruns_only_what_changed(tmp_path, monkeypatch):
    params = copy_small_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in ("PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, stage_env()[name])

    assert sorted(reproduce(tmp_path)) == sorted(ALL_STAGES)
    p = params["paths"]
    for key in ("demo_h5", "base_model", "controlnet", "eval_models", "model_sources", "train_data", "eval_data",
                "split_summary", "edges", "lora",
                "loss_log", "train_summary", "generated_baseline", "generated_lora", "metrics", "metrics_detail", "per_sample",
                "samples_grid", "metrics_chart", "deltas_chart", "edge_overlays", "loss_curve", "report"):
        assert (tmp_path / p[key]).exists(), key
    assert (tmp_path / p["lora"] / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / p["generated_lora"]).glob("*.png"))) == SMALL["extract.eval_products"]

    assert reproduce(tmp_path) == [], "a second repro runs nothing"
    bundler = str(Path(sys.executable).parent / "fashion-bundle")
    assert "bundle: wrote dist/results.zip" in run_ok([bundler])
    assert zipfile.ZipFile(tmp_path / p["bundle"]).read("dvc.lock") == (tmp_path / "dvc.lock").read_bytes()

    params["generate"]["steps"] = SMALL["generate.steps"] + 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = subprocess.run([bundler], capture_output=True, text=True)
    assert stale.returncode == 1 and stale.stderr.strip().splitlines()[-1].startswith(
        "error: dvc status: generate-baseline, generate-lora"), stale.stderr
    assert sorted(reproduce(tmp_path)) == sorted(["generate-baseline", "generate-lora", "metrics", "plots", "report"])

    shows = subprocess.run(["dvc", "metrics", "show", "--json"], capture_output=True, text=True, check=True).stdout
    assert '"fid"' in shows and '"lora"' in shows

    # A -> B -> A: back to a configuration trained before, nothing expensive runs again
    a = (tmp_path / "params.yaml").read_text()
    params["train"]["rank"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    b = repro_log(tmp_path)
    assert "train-lora: 4 steps (0 resumed)" in b and "generate-lora: drew 4 images" in b
    (tmp_path / "params.yaml").write_text(a)
    back = repro_log(tmp_path)
    for stage in ("train-lora", "generate-lora"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back, back
    assert "train-lora: 4 steps" not in back and "drew" not in back, "no training step, no image drawn"
    assert not (tmp_path / params["paths"]["resume"]).exists() or not any((tmp_path / params["paths"]["resume"]).iterdir())

    # two experiments that differ only in generate.steps: compared, and neither retrains
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], check=True)
    # the committed baseline has 4 steps; one experiment through a preset, one by hand
    for done in (run_ok([str(Path(sys.executable).parent / "fashion-exp"), "demo", "-S", "generate.steps=5"]),
                 dvc("exp", "run", "-n", "steps-6", "-S", "generate.steps=6")):
        assert "Running stage 'train-lora'" not in done and "Running stage 'generate-lora'" in done, done
    shown = dvc("exp", "show", "--only-changed", "--csv")  # every interval is a column: too wide for 80 columns
    assert "demo" in shown and "steps-6" in shown, "each experiment named after what made it"
    diff = dvc("metrics", "diff", "demo", "steps-6")
    assert "lora.fid" in diff and "lora_minus_baseline.lpips_ci95_low" in diff, "intervals and paired deltas"
    assert max(map(len, diff.splitlines())) <= 100, "fits a terminal"
    dvc("plots", "diff", "demo", "steps-6", "-o", str(tmp_path / "plots_diff"))
    assert (tmp_path / "plots_diff" / "index.html").is_file()

    # a queued sweep over a new LoRA: the first experiment trains, the second reuses it
    for name, steps in (("sweep-1", 5), ("sweep-2", 6)):
        dvc("exp", "run", "--queue", "-n", name, "-S", "train.rank=3", "-S", f"generate.steps={steps}")
    dvc("queue", "start")
    for _ in range(600):
        status = dvc("queue", "status")
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(1)
    assert status.count("Success") >= 2, status
    first, second = dvc("queue", "logs", "sweep-1"), dvc("queue", "logs", "sweep-2")
    assert "Running stage 'train-lora'" in first
    assert "Stage 'train-lora' is cached - skipping run" in second and "Running stage 'train-lora'" not in second


def dvc(*args: str) -> str:
    return run_ok(["dvc", *args])


def run_ok(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def repro_log(root: Path) -> str:
    """`dvc repro` as a user runs it: what it and the stages print."""
    done = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr

"""End to end: `dvc repro` on a copy of this repo runs the whole DAG, caches it, and reruns
exactly what a param change touches (here and in test_remotes.py). Every test goes on from a
copy of the suite's one reproduced repo (conftest.reproduced)."""

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL, copy_reproduced, stage_env

ALL_STAGES = ["demo-data", "fetch-models", "extract", "canny-edges", "train-lora", "generate-baseline",
              "generate-lora", "metrics", "plots", "report", "model-card"]


def reproduce(root: Path) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in repo.reproduce()]


@pytest.fixture
def repo(reproduced, tmp_path, monkeypatch) -> dict:
    """A private copy of the reproduced repo, cwd set to it, stage commands on this interpreter;
    returns its params."""
    assert sorted(copy_reproduced(reproduced, tmp_path)) == sorted(ALL_STAGES), "the first repro runs every stage"
    monkeypatch.chdir(tmp_path)
    for name in ("PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, stage_env()[name])
    return yaml.safe_load((tmp_path / "params.yaml").read_text())


@pytest.mark.slow
def test_dvc_repro_runs_caches_and_reruns_only_what_changed(repo, tmp_path):
    params = repo
    p = params["paths"]
    for key in ("demo_h5", "base_model", "controlnet", "eval_models", "model_sources", "train_data", "eval_data",
                "split_summary", "edges", "lora",
                "train_log", "train_summary", "generated_baseline", "generated_lora", "metrics", "metrics_detail",
                "per_sample", "samples_grid", "metrics_chart", "deltas_chart", "edge_overlays", "report"):
        assert (tmp_path / p[key]).exists(), key
    assert (tmp_path / p["lora"] / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / p["lora"] / "README.md").is_file(), "model-card ran last"
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
    # fashion-publish refuses the same way, before any request: the card would not match the weights
    publisher = subprocess.run([str(Path(sys.executable).parent / "fashion-publish"), "you/fashion-lora", "--dry-run"],
                               capture_output=True, text=True)
    refusal = publisher.stderr.strip().splitlines()[-1]
    assert publisher.returncode == 1 and refusal.startswith("error: dvc status: generate-baseline, generate-lora") \
        and refusal.endswith("not up to date, so the model card would describe other weights than these; "
                             "run `dvc repro` first"), publisher.stderr
    # that this change reruns exactly generate-baseline, generate-lora, metrics, plots and report:
    # test_remotes.py's round trips check it, on a pulled clone, for both remotes

    shows = subprocess.run(["dvc", "metrics", "show", "--json"], capture_output=True, text=True, check=True).stdout
    assert '"fid"' in shows and '"lora"' in shows


@pytest.mark.slow
def test_a_queued_sweep_trains_once_per_training_setting_and_its_experiments_compare(repo, tmp_path):
    """fashion-exp queues a 2 x 2 sweep on a new LoRA (generate.steps x plots.grid_samples) and
    `dvc queue start` runs it: the first experiment trains, the other three take the LoRA from the
    run-cache, generate-lora runs once per generate.steps; then they compare. Then A -> B -> A in
    the workspace: B, a point the queue ran, and A, what the workspace had, each come back from
    the run-cache without a training step or a drawn image."""
    a = (tmp_path / "params.yaml").read_text()
    queued = run_ok([str(Path(sys.executable).parent / "fashion-exp"), "demo", "-S", "train.rank=3",
                     "-S", "generate.steps=5,6", "-S", "plots.grid_samples=1,2", "--queue"])
    assert "dvc exp run -n demo" in queued and "generate.steps=5,6" in queued
    assert [f"Queued experiment 'demo-{n}'" in queued for n in (1, 2, 3, 4)] == [True] * 4, queued
    dvc("queue", "start")
    for _ in range(900):
        status = dvc("queue", "status")
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 4, status
    logs = {n: dvc("queue", "logs", f"demo-{n}") for n in (1, 2, 3, 4)}  # (steps, grid): (5,1) (5,2) (6,1) (6,2)
    ran = {n: {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
           for n, log in logs.items()}
    assert "train-lora" in ran[1] and all("train-lora" not in ran[n] for n in (2, 3, 4)), ran
    assert all("Stage 'train-lora' is cached - skipping run" in logs[n] for n in (2, 3, 4))
    assert [("generate-lora" in ran[n], "plots" in ran[n]) for n in (1, 2, 3, 4)] == \
        [(True, True), (False, True), (True, True), (False, True)], ran

    diff = dvc("metrics", "diff", "demo-1", "demo-3")
    assert "lora.fid" in diff and "delta.lpips" in diff and "delta.kid_x1e3" in diff, "the terminal view's numbers"
    assert "_ci95_" not in diff, "intervals live in metrics_detail.json"
    assert max(map(len, diff.splitlines())) <= 100, "fits a terminal"
    # The README's `dvc exp show` recipe, run as written, at 120 columns: every column it keeps is
    # printed whole (rich cuts a column that does not fit to "…"), sorted by the prompt colour delta.
    recipe = next(line for line in (tmp_path / "README.md").read_text().splitlines()
                  if line.startswith("dvc exp show --drop"))
    table = run_ok(["bash", "-c", recipe], env={**os.environ, "COLUMNS": "120"})
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120 and "…" not in table, table
    for name in ("Experiment", "delta.lpips", "delta.edge_control", "delta.colour_match", "train.rank",
                 "train.learning_rate", "demo-1", "demo-2", "demo-3", "demo-4"):
        assert name in table, (name, table)
    dvc("plots", "diff", "demo-1", "demo-3", "-o", str(tmp_path / "plots_diff"))
    assert (tmp_path / "plots_diff" / "index.html").is_file()

    b = {**repo, "train": {**repo["train"], "rank": 3}, "generate": {**repo["generate"], "steps": 6},
         "plots": {**repo["plots"], "grid_samples": 1}}  # demo-3's point
    for params, point in ((yaml.safe_dump(b, sort_keys=False), "demo-3"), (a, "HEAD")):
        (tmp_path / "params.yaml").write_text(params)
        assert dvc("params", "diff", point).strip() == "", f"the workspace's params are {point}'s"
        back = repro_log(tmp_path)
        for stage in ("train-lora", "generate-lora"):
            assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back, back
        assert "train-lora: 4 steps" not in back and "drew" not in back, "no training step, no image drawn"


def dvc(*args: str) -> str:
    return run_ok(["dvc", *args])


def run_ok(cmd: list[str], env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def repro_log(root: Path) -> str:
    """`dvc repro` as a user runs it: what it and the stages print."""
    done = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


# train-lora's and generate-lora's outputs, and files that neither stage lists as a dep
OUTPUT_KEYS = ("lora", "train_log", "train_summary", "generated_lora")
NOT_THEIR_DEPS = ("fashion/studio.py", "stages/report.py", "stages/demo/kit.py", "stages/common/figures.py")


def digests(root: Path, params: dict) -> dict[str, str]:
    files = {}
    for key in OUTPUT_KEYS:
        path = root / params["paths"][key]
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                files[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


@pytest.mark.slow
def test_outputs_depend_only_on_declared_inputs(reproduced, tmp_path):
    """Edit code that train-lora and generate-lora do not list as deps (their resume
    fingerprints hash it), rerun both directly: their outputs come out byte for byte as the
    repro made them."""
    copy_reproduced(reproduced, tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    dvc_yaml = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    before = digests(tmp_path, params)
    assert any(name.endswith("training_config.json") for name in before) and len(before) > 8
    for rel in NOT_THEIR_DEPS:
        assert rel not in dvc_yaml["train-lora"]["deps"] + dvc_yaml["generate-lora"]["deps"], rel
        with (tmp_path / rel).open("a") as f:
            f.write("\n# an edit that changes no output\n")
    logs = ""
    for stage in ("train_lora", "generate_lora"):
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=stage_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        logs += done.stderr
    assert f"train-lora: {SMALL['train.max_steps']} steps (0 resumed)" in logs, "train-lora ran afresh"
    assert f"({SMALL['extract.eval_products']} made now, 0 by" in logs, "generate-lora ran afresh"
    after = digests(tmp_path, params)
    assert after == before, [name for name in after if after.get(name) != before.get(name)]


@pytest.mark.browser
def test_dvc_plots_draw_offline(repo, tmp_path, chromium):
    """`dvc plots show` takes the project's template (.dvc/config's plots.html_template): vega,
    vega-lite and vega-embed inlined, no script fetched. The browser has no network, and the loss
    curve still draws: its canvas holds the line's colour (without the libraries: no canvas at all)."""
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "plots_show"
    dvc("plots", "show", "-o", str(out))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script src" not in page.replace(" ", "") and "cdn.jsdelivr" not in page, "nothing from a CDN"
    chromium.get((out / "index.html").as_uri())
    WebDriverWait(chromium, 30).until(lambda d: d.execute_script("return document.querySelector('canvas') !== null"))
    width, height, line, inked = chromium.execute_script("""
        const c = document.querySelector('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let line = 0, inked = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] === 0) continue;
          if (d[i] < 230 || d[i + 1] < 230 || d[i + 2] < 230) inked++;
          // axes, grid and text are grey; the curve is DVC's first revision colour (#945dd6)
          if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) line++;
        }
        return [c.width, c.height, line, inked];""")
    assert width > 100 and height > 100 and inked > 500, (width, height, inked)
    assert line > 100, f"the loss curve is drawn ({line} pixels of its colour)"

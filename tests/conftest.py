"""Hermetic fixtures: tiny models and a small demo H5 built in-process, offline, on the CPU."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock

from stages.common import dataset
from stages.common.params import load_params

REPO = Path(__file__).resolve().parents[1]
# An EPS under any name: PIL renders one by running Ghostscript, so no reader of images may open it
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver

# The CI machine has 2 shared cores; more threads only make tiny models slower.
torch.set_num_threads(1)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FASHION_DEVICE"] = "cpu"

# Small but complete: every stage runs for real, in seconds.
SMALL = {
    "demo.products": 16,
    # a few-step pretrain: the code path runs, the suite does not pay for the demo's three minutes
    "models.pretrain.products": 3,
    "models.pretrain.text_steps": 2,
    "models.pretrain.vae_steps": 2,
    "models.pretrain.steps": 2,
    "models.pretrain.decoder_steps": 2,
    "models.pretrain.batch_size": 4,
    "extract.train_products": 10,
    "extract.eval_products": 4,
    "extract.read_chunk": 5,
    "train.max_steps": 4,
    # validation at steps 0, 2 and 4, cheaply: the live log, the held-out loss and the strip run in every training
    "train.validate_every": 2,
    "train.validation_samples": 1,
    "train.validation_loss_samples": 2,
    "train.validation_steps": 1,
    "train.fixed_samples": 8,  # the demo's 64 cost every in-process training run 128 UNet passes
    # the seed recipe's batch (2 x 2, rank 4) and guidance, not the demo's: the suite checks accumulation and CFG
    "train.batch_size": 2,
    "train.grad_accumulation": 2,
    "train.rank": 4,
    "train.alpha": 4,
    "generate.guidance_scale": 7.5,
    "train.warmup_steps": 1,
    "train.checkpoint_every": 2,
    "generate.steps": 3,
    "generate.batch_size": 4,
    "plots.grid_samples": 2,
}


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def set_dotted(data: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


class Project:
    """A throwaway project folder: params.yaml plus outputs, with stages run in-process."""

    def __init__(self, root: Path):
        self.root = root
        self.params = repo_params()
        self.set(SMALL)

    def set(self, overrides: dict) -> Project:
        for key, value in overrides.items():
            set_dotted(self.params, key, value)
        text, path = yaml.safe_dump(self.params, sort_keys=False), self.root / "params.yaml"
        if not path.is_file() or path.read_text() != text:  # a shared fixture's folder is only read
            path.write_text(text)
        return self

    def typed(self):
        return load_params(self.root / "params.yaml")

    def path(self, key: str) -> Path:
        return self.root / self.params["paths"][key]

    def run(self, stage: str, **overrides) -> None:
        """Run `python -m stages.<stage>`'s main() here (cwd is the project root)."""
        if overrides:
            self.set({k.replace("__", "."): v for k, v in overrides.items()})
        module = importlib.import_module(f"stages.{stage}")
        if stage.startswith("generate_"):
            module.run(stage.removeprefix("generate_"))
        else:
            module.main()


def run_in(root: Path, *stages: str) -> Path:
    """Run `stages` in the project at `root` (a session fixture cannot use monkeypatch.chdir)."""
    project = Project(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in stages:
            project.run(stage)
    finally:
        os.chdir(cwd)
    return root


def shared(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test run, shared by every pytest-xdist worker: the
    first to ask builds it under a lock, the others wait and reuse it. Tests only read it (or copy
    it), so one build serves them all."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent  # the run's folder, above each worker's own
    root, done = base / name, base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # half-built by a worker that crashed
            root.mkdir()
            build(root)
            done.touch()
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, worker_id) -> Path:
    """models/ (base, controlnet, eval) built once per test run by the real fetch-models stage."""
    return shared(tmp_path_factory, worker_id, "models_root", lambda root: run_in(root, "fetch_models"))


def copy_models(models_root: Path, project: Project) -> None:
    """fetch-models' outputs: the three model folders and models/sources.json."""
    for key in ("base_model", "controlnet", "eval_models"):
        shutil.copytree(models_root / project.params["paths"][key], project.path(key))
    shutil.copy(models_root / project.params["paths"]["model_sources"], project.path("model_sources"))


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_models) -> Project:
    """An empty project with the session's tiny models in place and cwd set to it."""
    project = Project(tmp_path)
    copy_models(tiny_models, project)
    monkeypatch.chdir(tmp_path)
    return project


@pytest.fixture(scope="session")
def extracted_root(tmp_path_factory, worker_id, tiny_models) -> Path:
    """A project after fetch-models, demo-data, extract and canny-edges, once per test run."""
    def build(root):
        copy_models(tiny_models, Project(root))
        run_in(root, "demo_data", "extract", "canny_edges")
    return shared(tmp_path_factory, worker_id, "extracted", build)


@pytest.fixture
def extracted(extracted_root, tmp_path, monkeypatch) -> Project:
    """A private copy of the extracted project, cwd set to it."""
    shutil.copytree(extracted_root, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id, extracted_root) -> Path:
    """A project that has run every stage up to and including train-lora, once per test run."""
    def build(root):
        shutil.copytree(extracted_root, root, dirs_exist_ok=True)
        run_in(root, "train_lora")
    return shared(tmp_path_factory, worker_id, "trained", build)


@pytest.fixture
def trained_project(trained, tmp_path, monkeypatch) -> Project:
    """A private copy of the trained project, cwd set to it."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    project = Project(tmp_path)
    return project


def fill_generated(project: Project, source) -> None:
    """Fill both generated folders with copies of `source(index)` (ground truth, edges, ...)."""
    paths = project.typed().paths
    for variant in dataset.VARIANTS:
        for c in dataset.load_eval_configs(project.path("eval_data")):
            target = dataset.generated_path(paths, variant, c["index"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source(c["index"]), target)


def image_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="session")
def finished(trained, tmp_path_factory, worker_id) -> Path:
    """A project where every stage has run (the last good run of each output), once per test run."""
    def build(root):
        shutil.copytree(trained, root, dirs_exist_ok=True)
        run_in(root, "generate_baseline", "generate_lora", "metrics", "plots", "report", "model_card")
    return shared(tmp_path_factory, worker_id, "finished", build)


@pytest.fixture
def finished_project(finished, tmp_path, monkeypatch) -> Project:
    """A private copy of the finished project, cwd set to it."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path)


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
    # The end-to-end repos train under DVC again and again: they run the validate_every: 0 path (an empty
    # images folder as a DVC output, no strip); the in-process tests cover validation itself
    for key, value in {**SMALL, "train.validate_every": 0}.items():
        set_dotted(params, key, value)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def stage_env(**extra) -> dict:
    """Stage commands say `python`: make it this interpreter, on the CPU with one thread."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", **extra}


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
STAGES_RUN = ".stages-run.json"  # inside the reproduced repo (git-ignored by the test's own exclude)


def _reproduce_small_repo(root: Path) -> None:
    from dvc.repo import Repo

    copy_small_repo(root)
    (root / ".git" / "info" / "exclude").write_text(f"/{STAGES_RUN}\n")
    env = stage_env()
    saved = {name: os.environ.get(name) for name in ("PATH", "OMP_NUM_THREADS")}
    cwd = os.getcwd()
    os.environ.update(PATH=env["PATH"], OMP_NUM_THREADS="1")
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            ran = [stage.addressing for stage in repo.reproduce()]
    finally:
        os.chdir(cwd)
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    (root / STAGES_RUN).write_text(json.dumps(ran))
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "demo results"], cwd=root, check=True)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id) -> Path:
    """This repo with the suite's small params after one `dvc repro` of the whole DAG, committed to
    git, once per test run; the end-to-end, remote and notebook tests each go on from a copy
    (`copy_reproduced`)."""
    return shared(tmp_path_factory, worker_id, "reproduced", _reproduce_small_repo)


def copy_reproduced(reproduced: Path, target: Path) -> list[str]:
    """A private copy of the reproduced repo (its git history and DVC cache included) at `target`;
    returns the stages its `dvc repro` ran."""
    shutil.copytree(reproduced, target, symlinks=True, dirs_exist_ok=True)
    return json.loads((target / STAGES_RUN).read_text())


@pytest.fixture
def chromium(tmp_path):
    """Headless Chromium through selenium; skipped without it, failed under FASHION_REQUIRE_BROWSER=1 (CI)."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        missing = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        pytest.fail(missing) if os.environ.get("FASHION_REQUIRE_BROWSER") else pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # As root in a container, with no network: no sandbox, no background fetches.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()

"""Hermetic fixtures: tiny models and a small demo H5 built in-process, offline, on the CPU."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.common import dataset
from stages.common.params import load_params

REPO = Path(__file__).resolve().parents[1]
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
    "models.pretrain.batch_size": 4,
    "extract.train_products": 10,
    "extract.eval_products": 4,
    "extract.read_chunk": 5,
    "train.max_steps": 4,
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
        (self.root / "params.yaml").write_text(yaml.safe_dump(self.params, sort_keys=False))
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """models/ (base, controlnet, eval) built once per session by the real fetch-models stage."""
    return run_in(tmp_path_factory.mktemp("models_root"), "fetch_models")


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


@pytest.fixture
def extracted(project) -> Project:
    """A project after demo-data, extract and canny-edges."""
    for stage in ("demo_data", "extract", "canny_edges"):
        project.run(stage)
    return project


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_models) -> Path:
    """A session-wide project that has run every stage up to and including train-lora."""
    root = tmp_path_factory.mktemp("trained")
    project = Project(root)
    copy_models(tiny_models, project)
    return run_in(root, "demo_data", "extract", "canny_edges", "train_lora")


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
def finished(trained, tmp_path_factory) -> Path:
    """A session-wide project where every stage has run: the last good run of each output."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(trained, root, dirs_exist_ok=True)
    return run_in(root, "generate_baseline", "generate_lora", "metrics", "plots", "report")


@pytest.fixture
def finished_project(finished, tmp_path, monkeypatch) -> Project:
    """A private copy of the finished project, cwd set to it."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path)


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

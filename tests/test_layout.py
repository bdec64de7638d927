"""The house's layout: the layering contract holds and catches a break, and every console script
the package declares starts (a stale entry point, say one naming a moved module, fails here)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tomllib

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts from root/pyproject.toml, on the packages under root."""
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_layering_contract_holds():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("stages/common/edges.py", "from stages import metrics", "apps > stages > demo kit > library"),  # upwards
    ("stages/common/edges.py", "from stages.demo import garments", "apps > stages > demo kit > library"),
    ("stages/extract.py", "from stages import canny_edges", "apps > stages > demo kit > library"),  # stage to stage
    ("stages/demo/garments.py", "from fashion import bundle", "apps > stages > demo kit > library"),
    ("stages/common/errors.py", "from stages.common import cli", "no import circle inside a package"),
])
def test_the_layering_contract_catches_a_break(tmp_path, module, line, broken):
    for tree in ("stages", "fashion"):
        shutil.copytree(REPO / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1 and f"{broken} BROKEN" in done.stdout, done.stdout[-3000:]


def test_the_stage_layer_names_every_dvc_stage():
    """A stage missing from the contract's stage layer would escape "no stage imports another"."""
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layer = {name.strip() for name in contract["layers"][1].split("|")}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert layer == {f"stages.{name.replace('-', '_')}" for name in stages}


def test_every_console_script_answers_help():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"fashion-exp", "fashion-bundle", "fashion-generate", "fashion-studio", "fashion-publish"}
    for name in scripts:
        assert (BIN / name).is_file(), f"{name} is not installed: pip install -e '.[test]' (make test does)"
    running = {name: subprocess.Popen([str(BIN / name), "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name in scripts}  # at once: each imports torch
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name} --help: {err[-2000:]}"
        assert "Traceback" not in err and out.strip(), name

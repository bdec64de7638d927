"""The offline wheelhouse (tools/wheelhouse.py, make wheelhouse) and its install.py. The unmarked
tests check install.py's refusals and the builder's bad input in well under a second, with a stand-in
pip; the `wheelhouse` one builds a real wheelhouse for this Python from PyPI (a few minutes, 300
MB) and installs it, with no index, into a fresh venv that holds only this machine's torch."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO
from tools import wheelhouse

HERE = "%d.%d" % sys.version_info[:2]
OTHER = "3.%d" % (sys.version_info.minor + 1)
FAKE_PIP = "import json, os, sys\njson.dump(sys.argv[1:], open(os.environ['FAKE_PIP_CALLS'], 'w'))\n"
IMPORT_ALL = ("import importlib, sys, stages\n"
              "for name in sys.argv[1:]:\n    importlib.import_module(name)\nprint(stages.__file__)\n")


def fake_house(tmp_path: Path, pythons: list[str]) -> Path:
    """install.py and a wheelhouse.json claiming `pythons` on this machine's platform; `-m pip`
    finds a stand-in that records its arguments instead of installing."""
    house = tmp_path / "house"
    house.mkdir()
    shutil.copy(wheelhouse.INSTALLER, house / "install.py")
    manifest = {"project": "fashion-controlnet-lora", "version": "0.1.0", "implementation": "CPython",
                "pythons": pythons, "machine": os.uname().machine, "glibc": "2.17"}
    (house / "wheelhouse.json").write_text(json.dumps(manifest))
    (tmp_path / "fake" / "pip").mkdir(parents=True)
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP)
    return house


def run_installer(tmp_path: Path, house: Path, *args: str, python_flags: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_PIP_CALLS": str(tmp_path / "pip_calls.json")}
    return subprocess.run([sys.executable, *python_flags, str(house / "install.py"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_install_refuses_another_python_in_one_line_without_calling_pip(tmp_path):
    house = fake_house(tmp_path, [OTHER])
    done = run_installer(tmp_path, house)
    assert done.returncode == 1 and done.stdout == ""
    line, = done.stderr.splitlines()
    assert line.startswith(f"wheelhouse: built for CPython {OTHER} on manylinux {os.uname().machine}"), line
    assert f"this is CPython {HERE} on linux" in line and f"make wheelhouse PYTHONS={HERE}" in line, line
    assert not (tmp_path / "pip_calls.json").exists(), "pip ran"


def test_install_refuses_a_box_without_torch(tmp_path):
    house = fake_house(tmp_path, [HERE])
    done = run_installer(tmp_path, house, python_flags=("-S",))  # no site-packages: no torch
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "torch and torchvision not installed" in done.stderr and "brings its own" in done.stderr
    assert not (tmp_path / "pip_calls.json").exists()


def test_install_runs_pip_on_its_folder_alone(tmp_path):
    house = fake_house(tmp_path, [HERE, OTHER])
    done = run_installer(tmp_path, house, "--dry-run")
    assert done.returncode == 0, done.stderr
    calls = json.loads((tmp_path / "pip_calls.json").read_text())
    assert calls == ["install", "--no-index", "--find-links", str(house), "-r", str(house / "requirements.txt"),
                     "--dry-run"]


def test_the_builder_rejects_an_unknown_python(capsys):
    with pytest.raises(SystemExit) as exit:
        wheelhouse.main(["--python", "3.11", "3.10"])
    assert exit.value.code == 2 and "invalid choice: '3.10'" in capsys.readouterr().err


def test_a_failed_build_leaves_the_previous_wheelhouse(tmp_path, monkeypatch, capsys):
    out = tmp_path / "dist" / "wheelhouse"
    out.mkdir(parents=True)
    (out / "install.py").write_text("the previous build")

    def unresolvable(dest, *args):
        (dest / "half.whl").write_text("")
        raise wheelhouse.WheelhouseError("pip cannot resolve the project for CPython 3.13 on manylinux x86_64: "
                                         "No matching distribution found for diffusers<1,>=0.42")

    monkeypatch.setattr(wheelhouse, "project_wheel", unresolvable)
    with pytest.raises(SystemExit) as exit:
        wheelhouse.main(["--out", str(out), "--python", "3.13"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.startswith("error: wheelhouse: pip cannot resolve the project for CPython 3.13")
    assert [p.name for p in out.parent.iterdir()] == ["wheelhouse"], "the half-built folder was left behind"
    assert [p.name for p in out.iterdir()] == ["install.py"]


def test_pip_failures_name_the_package():
    stderr = ("  Link requires a different Python\n"
              "ERROR: Ignored the following versions that require a different python version: 0.42.0 "
              "Requires-Python >=3.11.0\nERROR: Could not find a version that satisfies the requirement "
              "diffusers<1,>=0.42 (from fashion-controlnet-lora) (from versions: 0.0.1, 0.41.0)\n"
              "ERROR: No matching distribution found for diffusers<1,>=0.42\n")
    line = wheelhouse.pip_failure(stderr)
    assert "\n" not in line and "No matching distribution found for diffusers<1,>=0.42" in line
    assert "0.0.1" not in line, "the list of every release is noise"


def bring_this_torch(site: Path) -> None:
    """Put this environment's torch and torchvision, with all they require (nvidia-*, triton, cuda-*,
    sympy, ...), into another venv's site-packages, as hard links: the box's own torch stack, the
    way a GPU image has it, with nothing fetched or copied. (No local wheel store here holds the
    whole stack: torch 2.14.1 needs cuda-bindings from PyPI.)"""
    todo, seen = [("torch", ()), ("torchvision", ())], set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        dist = distribution(name)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in (*extras, "")):
                todo.append((req.name, tuple(sorted(req.extras))))
        for file in dist.files or []:
            target = site / file
            if ".." in file.parts or target.exists():  # console scripts live in bin/
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(dist.locate_file(file), target)
            except OSError:  # another disk
                shutil.copy2(dist.locate_file(file), target)


@pytest.mark.wheelhouse
def test_the_wheelhouse_installs_offline_beside_the_box_torch(tmp_path):
    house = tmp_path / "wheelhouse"
    built = subprocess.run([sys.executable, "-m", "tools.wheelhouse", "--out", str(house), "--python", HERE],
                           cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((house / "wheelhouse.json").read_text())
    wheels = sorted(house.glob("*.whl"))
    assert manifest["pythons"] == [HERE] and manifest["wheel_files"] == len(wheels)
    assert manifest["wheels_per_python"][HERE] == len(wheels), "one version of each package"
    shipped = {w.name.split("-")[0].lower() for w in wheels}
    assert not {n for n in shipped if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia", "cuda"))}

    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "box")], check=True)
    box = tmp_path / "box" / "bin"
    site = subprocess.run([str(box / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    bring_this_torch(Path(site))

    # no pip config, no PIP_* variables: the wheelhouse alone
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    installed = subprocess.run([str(box / "python"), str(house / "install.py"), "--quiet"], cwd=tmp_path, env=offline,
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]

    modules = [".".join(path.relative_to(REPO).with_suffix("").parts)
               for folder in ("stages", "stages/common", "stages/demo", "fashion")
               for path in sorted((REPO / folder).glob("*.py")) if path.name != "__init__.py"]
    imported = subprocess.run([str(box / "python"), "-c", IMPORT_ALL, *modules], cwd=tmp_path, capture_output=True,
                              text=True)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().startswith(str(tmp_path / "box")), "imported the checkout, not the wheel"
    for script in ("fashion-exp", "fashion-bundle", "fashion-generate", "fashion-studio"):
        # in the checkout, as on a box (presets.yaml, params.yaml); a console script imports the installed wheel
        helped = subprocess.run([str(box / script), "--help"], cwd=REPO, capture_output=True, text=True)
        assert helped.returncode == 0 and helped.stdout.strip(), f"{script}: {helped.stderr[-2000:]}"

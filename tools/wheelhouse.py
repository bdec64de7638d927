"""`make wheelhouse`: an install folder for GPU boxes without internet (Kaggle with internet off,
cluster nodes): the project's wheel and every wheel it and its extras need, but torch.

    python -m tools.wheelhouse [--out dist/wheelhouse] [--python 3.11 3.12]

For each Python, pip resolves the project wheel with all its extras for CPython on manylinux
x86_64 (`install --dry-run --report`: metadata only) and then downloads exactly what it picked,
so the folder holds one version of each package per Python (pure-Python wheels, shared between
versions, once). torch and torchvision are left out, and with them what only they need (nvidia-*,
triton, cuda-*): the box brings its own CUDA build. The folder also gets requirements.txt,
wheelhouse.json (what it was built for) and install.py (from tools/wheelhouse_install.py), which
checks the box against wheelhouse.json and runs pip with --no-index:

    python /kaggle/input/wheelhouse/install.py

The folder is built beside --out and renamed into place only when whole, so a failed build
leaves the previous wheelhouse as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from email.message import Message
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
INSTALLER = Path(__file__).with_name("wheelhouse_install.py")
PYTHONS = ("3.11", "3.12", "3.13")  # what --python accepts: the project needs 3.11 or newer
# manylinux_2_28 (glibc 2.28: RHEL 8, Ubuntu 20.04 and newer, Kaggle) down to the oldest tags: pip
# matches platform tags literally, so every older glibc a wheel may be tagged for is listed.
GLIBC = "2.28"
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + ["manylinux2014_x86_64"]
BOX_BRINGS = ("torch", "torchvision")  # the project's requirements the box meets with its own CUDA build
TORCH_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")  # never shipped, whoever asks

log = logging.getLogger("wheelhouse")


class WheelhouseError(Exception):
    """A problem the person running the build can fix: one line, no traceback."""


# pip evaluates dependency markers (`tomli; python_version < "3.11"`) against the Python it runs on,
# not the one --python-version names (pypa/pip#11010, #13296), so a cross-resolution would miss
# backports or add needless ones. This runs pip with the target's marker environment.
_PIP_FOR = """
import runpy, sys
from pip._vendor.packaging import markers
version = sys.argv.pop(1)
target = {**markers.default_environment(), "python_version": version, "python_full_version": version + ".0",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
markers.default_environment = lambda: dict(target)
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


def target_flags(python: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    return flags + [arg for platform in PLATFORMS for arg in ("--platform", platform)]


def pip(args: list[str], python: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _PIP_FOR, python] if python else [sys.executable, "-m", "pip"]
    return subprocess.run(command + args, capture_output=True, text=True)


def pip_failure(stderr: str) -> str:
    """pip's reason in one line, naming the package: its ERROR lines and the conflict's causes."""
    lines = [line.strip() for line in stderr.splitlines()]
    reasons = [re.sub(r" \(from versions: .*\)", "", line.removeprefix("ERROR: ")) for line in lines
               if line.startswith("ERROR:") and "for help visit" not in line]
    reasons += [line for line in lines if " depends on " in line][:3]
    return "; ".join(reasons) or (lines[-1] if lines else "no output")


def project_wheel(dest: Path) -> tuple[Path, Message]:
    """`pip wheel --no-deps .`: the project's own wheel, and its metadata (name, version, extras)."""
    done = pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(REPO)])
    if done.returncode != 0:
        raise WheelhouseError(f"pip wheel of the project failed: {pip_failure(done.stderr)}")
    wheel = next(dest.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return wheel, message_from_bytes(archive.read(name))


def torch_stubs(metadata: Message, dest: Path) -> list[str]:
    """Empty wheels standing in for torch and torchvision, at the oldest release the project admits,
    as direct requirements: pip then never fetches torch (GBs of CUDA wheels where the index serves
    no separate metadata) nor resolves what only torch needs, and every package it picks accepts
    any torch the box may bring."""
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, metadata.get_all("Requires-Dist", []))}
    stubs = []
    for name in BOX_BRINGS:
        floors = [s.version for s in wanted[name].specifier if s.operator in (">=", "==", "~=")]
        if not floors:
            raise WheelhouseError(f"pyproject.toml: {name} has no lower bound; give it one (>=) so the "
                                  "wheelhouse can be resolved for the oldest torch the project admits")
        stub = dest / f"{name}-{floors[0]}-py3-none-any.whl"
        info = f"{name}-{floors[0]}.dist-info"
        with zipfile.ZipFile(stub, "w") as archive:
            archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {floors[0]}\n")
            archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tools.wheelhouse\n"
                                              "Root-Is-Purelib: true\nTag: py3-none-any\n")
            archive.writestr(f"{info}/RECORD", "")
        stubs.append(f"{name} @ {stub.as_uri()}")
    return stubs


def resolve(roots: list[str], scratch: Path, python: str | None, find_links: Path, project: str) -> list[dict]:
    """pip's report of what it would install for CPython `python` on manylinux x86_64 (None: for this
    interpreter, sdists allowed), less the project itself and what the box brings."""
    tag = python or "here"
    report = scratch / f"report-{tag}.json"
    flags = target_flags(python) if python else ["--prefer-binary"]
    done = pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
                str(scratch / f"target-{tag}"), "--find-links", str(find_links), *flags, *roots], python)
    where = f"CPython {python} on manylinux x86_64" if python else "this Python"
    if done.returncode != 0:
        raise WheelhouseError(f"pip cannot resolve the project for {where}: {pip_failure(done.stderr)}")
    resolved = json.loads(report.read_text())
    if python and resolved["environment"]["python_version"] != python:
        raise WheelhouseError(f"pip {resolved['pip_version']} ignored the target's markers; upgrade it")
    return [item for item in resolved["install"]
            if not TORCH_ONLY.match(name := canonicalize_name(item["metadata"]["name"])) and name != project]


def pins(items: list[dict]) -> dict[str, str]:
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in items}


def build_sdists(items: list[dict], dest: Path) -> None:
    """Packages PyPI ships only as source (antlr4-python3-runtime 4.9.3, which hydra-core pins, for
    one): built here into pure-Python wheels, so the binary-only target resolutions find them."""
    for name, version in sorted(pins([i for i in items if not i["download_info"]["url"].endswith(".whl")]).items()):
        log.info("wheelhouse: building %s %s from its sdist (PyPI has no wheel)", name, version)
        done = pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), f"{name}=={version}"])
        if done.returncode != 0:
            raise WheelhouseError(f"{name} {version} has no wheel on PyPI and does not build here: "
                                  f"{pip_failure(done.stderr)}")
    for wheel in dest.glob("*.whl"):
        if not wheel.name.endswith("-none-any.whl"):
            raise WheelhouseError(f"{wheel.name}: no manylinux wheel on PyPI, and its sdist builds to a wheel "
                                  "for this machine only; it cannot go into a portable wheelhouse")


def download(versions: dict[str, dict[str, str]], find_links: Path, dest: Path) -> None:
    for python, wanted in versions.items():
        log.info("wheelhouse: downloading %d wheels for CPython %s", len(wanted), python)
        # one folder for all Pythons: pip skips a file already there, so shared wheels come once
        done = pip(["download", "--no-deps", "--dest", str(dest), "--find-links", str(find_links),
                    *target_flags(python), *(f"{name}=={version}" for name, version in sorted(wanted.items()))])
        if done.returncode != 0:
            raise WheelhouseError(f"pip download for CPython {python} failed: {pip_failure(done.stderr)}")


def write_house(house: Path, metadata: Message, versions: dict[str, dict[str, str]]) -> dict:
    extras = ",".join(sorted(metadata.get_all("Provides-Extra", [])))
    requirement = f"{metadata['Name']}[{extras}]=={metadata['Version']}"
    # the project alone, unpinned below it: pip keeps what the box already has where it fits and
    # takes the rest from this folder, which holds a complete resolution for each Python
    (house / "requirements.txt").write_text(
        "# pip install --no-index --find-links <this folder> -r requirements.txt (install.py does)\n"
        f"{requirement}\n")
    shutil.copy(INSTALLER, house / "install.py")
    wheels = sorted(house.glob("*.whl"))
    manifest = {
        "project": metadata["Name"], "version": metadata["Version"], "requirement": requirement,
        "implementation": "CPython", "pythons": list(versions), "platform": PLATFORMS[0], "machine": "x86_64",
        "glibc": GLIBC, "left_out": "torch, torchvision, nvidia-*, triton, cuda-*: the box brings its own torch",
        "wheels_per_python": {python: len(wanted) + 1 for python, wanted in versions.items()},  # + the project
        "wheel_files": len(wheels), "total_bytes": sum(w.stat().st_size for w in wheels),
    }
    (house / "wheelhouse.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build(out: Path, pythons: list[str]) -> dict:
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise WheelhouseError(f"{out}: exists and is not a folder; remove it or pick another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # beside out: the rename stays on one disk
    try:
        house, scratch, built = work / "house", work / "scratch", work / "built"
        for folder in (house, scratch, built):
            folder.mkdir()
        wheel, metadata = project_wheel(house)
        project = canonicalize_name(metadata["Name"])
        roots = [f"{wheel}[{','.join(metadata.get_all('Provides-Extra', []))}]", *torch_stubs(metadata, scratch)]
        log.info("wheelhouse: resolving %s %s for this Python, to find packages without wheels",
                 metadata["Name"], metadata["Version"])
        build_sdists(resolve(roots, scratch, None, built, project), built)
        log.info("wheelhouse: resolving for CPython %s on manylinux x86_64", ", ".join(pythons))
        with ThreadPoolExecutor(len(pythons)) as pool:  # one pip process each, on the network half the time
            resolved = pool.map(lambda python: pins(resolve(roots, scratch, python, built, project)), pythons)
            versions = dict(zip(pythons, resolved, strict=True))
        download(versions, built, house)
        manifest = write_house(house, metadata, versions)
        previous = work / "previous"  # removed with work below
        if out.exists():
            out.rename(previous)
        try:
            house.rename(out)
        except OSError:
            if previous.exists():
                previous.rename(out)
            raise
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.wheelhouse", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "wheelhouse", help="the folder to (re)build")
    parser.add_argument("--python", nargs="+", default=["3.11", "3.12"], choices=PYTHONS, metavar="X.Y",
                        help=f"CPython versions to build for, of {', '.join(PYTHONS)} (default: 3.11 3.12)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pythons = sorted(set(args.python), key=lambda v: tuple(map(int, v.split("."))))
    try:
        manifest = build(args.out, pythons)
    except WheelhouseError as err:
        print(f"error: wheelhouse: {err}", file=sys.stderr)
        sys.exit(1)
    log.info("wheelhouse: wrote %s: %d wheel files, %.0f MB; wheels per Python: %s", args.out,
             manifest["wheel_files"], manifest["total_bytes"] / 1e6,
             ", ".join(f"{python} {count}" for python, count in manifest["wheels_per_python"].items()))


if __name__ == "__main__":
    main()

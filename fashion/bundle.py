"""One zip with everything needed to read, check and reuse a finished run.

    make bundle                      # or: fashion-bundle [--allow-stale]

Writes `paths.bundle` with the report page, metrics.json, metrics_detail.json, per_sample.csv,
the LoRA folder (weights and training config), the resolved params (every section, as the stages
read them) and dvc.lock, which pins every input and output by hash. It refuses while `dvc status`
says a stage is out of date, since the files would then come from different runs;
`--allow-stale` packs them anyway. The same files give the same zip, byte for byte.

Entries are named by their paths in the repository. A `paths.*` file outside it (`../x`, an
absolute path on another disk) goes in as `external/<key>/<file name>`, so no entry is absolute
or climbs out with `..`: unpacking writes under the unpacking folder only.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import atomic_file, public_path
from stages.common.dataset import LORA_WEIGHTS
from stages.common.params import load_params

LOCK_FILE = Path("dvc.lock")
RESOLVED_PARAMS = "params.resolved.yaml"
EXTERNAL = "external"  # where files from outside the repository go in the zip, by their paths.* key
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: entries carry no build time


def entry_name(path: Path, key: str, name: str) -> str:
    """`path`'s name in the zip: its path relative to the repository (the working folder), or for a
    file outside it `external/<key>/<name>`. Never absolute, never `..`: whoever unpacks the
    bundle gets files under the folder they unpack it in, and nowhere else."""
    root = Path.cwd()
    entry = f"{EXTERNAL}/{key}/{name}"
    for inside, base in ((Path(os.path.normpath(root / path)), root), (path.resolve(), root.resolve())):
        if inside.is_relative_to(base) and inside != base:
            entry = inside.relative_to(base).as_posix()
            break
    if "\\" in entry:  # a folder separator to Windows' unzip: `..\\x` would climb out there
        raise StageError(f"{path}: a backslash in its name, which unpacks as a folder on Windows; rename it")
    return entry


def members(paths) -> dict[str, Path]:
    """The files to pack by entry name, each checked to exist (with the stage that makes it)."""
    wanted = [("report", "report"), ("metrics", "metrics"), ("metrics_detail", "metrics"),
              ("per_sample", "metrics")]
    files = [(key, Path(getattr(paths, key)), stage) for key, stage in wanted]
    files += [("lora", Path(paths.lora) / LORA_WEIGHTS, "train-lora"), (None, LOCK_FILE, None)]
    for _, path, stage in files:
        if not path.is_file():
            raise StageError(f"{path}: not found; " + (f"run `dvc repro {stage}`" if stage else "run `dvc repro`"))
    files += [("lora", p, None) for p in sorted(Path(paths.lora).iterdir())
              if p.is_file() and p.name != ".gitignore"]  # DVC's, not the run's
    entries: dict[str, Path] = {}
    for key, path, _ in files:
        name = entry_name(path, key, path.name) if key else path.as_posix()
        if name.startswith(f"{EXTERNAL}/") and not any(n.startswith(f"{EXTERNAL}/{key}/") for n in entries):
            log.info("bundle: paths.%s (%s) is outside the repository: it goes in under %s/%s/", key,
                     getattr(paths, key), EXTERNAL, key)
        if name == RESOLVED_PARAMS or not entries.setdefault(name, path).samefile(path):
            raise StageError(f"{f'paths.{key}' if key else path}: {path} would be {name} in the bundle, as "
                             f"{entries.get(name, 'the resolved params')} is; give it another name")
    return dict(sorted(entries.items()))


def check_up_to_date(consequence: str = "so the bundle would mix runs", override: str | None = "--allow-stale") -> None:
    """Refuse while `dvc status` lists a stage: `consequence` says why, `override` the option that packs anyway."""
    escape = f", or pass {override}" if override else ""
    # this interpreter's dvc: the console script may run without the venv's bin on PATH
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"dvc status failed ({last}); run it here to see why{escape}")
    stale = [name.split(":")[-1] for name in yaml.safe_load(done.stdout or "{}") or {}]
    if stale:
        raise StageError(f"dvc status: {', '.join(stale)} not up to date, {consequence}; run `dvc repro` first{escape}")


def write_zip(target: Path, files: dict[str, Path], resolved: str) -> None:
    def add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, _EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        archive.writestr(info, data)

    with atomic_file(target) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, path in files.items():
            add(archive, name, path.read_bytes())
        add(archive, RESOLVED_PARAMS, resolved.encode())


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    unknown = [a for a in args if a != "--allow-stale"]
    if unknown:
        raise StageError(f"fashion-bundle: unknown argument {unknown[0]!r}; the only option is --allow-stale")
    params = load_params()
    files = members(params.paths)
    if "--allow-stale" not in args:
        check_up_to_date()
    resolved = yaml.safe_dump(dataclasses.asdict(params), sort_keys=False)
    target = Path(params.paths.bundle)
    write_zip(target, files, resolved)
    log.info("bundle: wrote %s (%d files, %.1f MB)", public_path(str(target)), len(files) + 1,
             target.stat().st_size / 1e6)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

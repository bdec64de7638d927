"""Named experiments from presets.yaml, one command each (the `fashion-exp` console script).

    fashion-exp seed-30k-3k-s20 -S extract.h5=/data/fashiongen_256_256_train.h5
    fashion-exp seed-30k-3k-s40 --queue        # then: dvc queue start
    fashion-exp --list

Each preset is a set of `-S key=value` overrides of params.yaml. The command checks them (and
your own `-S`) against the params schema first, then runs `dvc exp run -n <preset> -S ...`, so
`dvc exp show` names every experiment after the preset that made it. Anything else after the
name (--queue, --temp, -f, ...) goes to `dvc exp run` as is.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from stages.common.cli import run_cli
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, ParamsError, parse_params, read_yaml

PRESETS_FILE = Path("presets.yaml")


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict]:
    if not path.is_file():
        raise StageError(f"{path}: not found; run fashion-exp from the repository root")
    presets = read_yaml(path)
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise StageError(f"{path}: expected a mapping of preset names to mappings of `key: value` overrides")
    return presets


def apply(data: dict, overrides: dict) -> dict:
    """params.yaml's mapping with dotted `overrides` set, as `dvc exp run -S` would."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{key}: unknown key")
            node = node[part]
        node[leaf] = value
    return data


def user_overrides(args: list[str]) -> dict:
    """The `-S key=value` pairs among the extra arguments, values read as YAML (as DVC does)."""
    pairs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-S", "--set-param")]
    pairs += [arg.split("=", 1)[1] for arg in args if arg.startswith("--set-param=")]
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise StageError(f"-S {pair}: expected key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def command(name: str, preset: dict, extra: list[str]) -> list[str]:
    # DVC reads -S values with Hydra's grammar: JSON quotes keep a string with commas or spaces one value
    sets = [arg for key, value in preset.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    return ["dvc", "exp", "run", "-n", name, *sets, *extra]


def check(name: str, presets: dict[str, dict], extra: list[str]) -> list[str]:
    """The dvc command for preset `name`, once its params (and the user's -S) validate."""
    if name not in presets:
        raise StageError(f"{PRESETS_FILE}: no preset {name!r}; the presets are {', '.join(presets)}")
    overrides = {**presets[name], **user_overrides(extra)}
    parse_params(apply(read_yaml(PARAMS_FILE), overrides), f"{PRESETS_FILE}: {name}")
    return command(name, presets[name], extra)


def check_params_clean() -> None:
    """`dvc exp run` starts from the workspace's params.yaml, and every experiment applies its own
    params there: a preset run after another would inherit what it does not set."""
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(PARAMS_FILE)], capture_output=True)
    if changed.returncode == 1:
        raise StageError(f"{PARAMS_FILE}: differs from HEAD (the last experiment applied its params), so the "
                         f"preset would not start from the committed values; `git checkout {PARAMS_FILE}` or "
                         "commit it first")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    presets = load_presets()
    if not args or args[0] in ("-h", "--help", "--list"):
        if args[:1] != ["--list"]:
            print(__doc__.split("\n\n")[1])
        print("presets: " + ", ".join(presets))
        return
    cmd = check(args[0], presets, [a for a in args[1:] if a != "--dry-run"])
    check_params_clean()
    print("$ " + " ".join(cmd), flush=True)
    if "--dry-run" not in args:
        sys.exit(subprocess.run(cmd).returncode)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

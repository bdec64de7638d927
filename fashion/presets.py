"""Named experiments from presets.yaml, one command each (the `fashion-exp` console script).

    fashion-exp seed-30k-3k-s20 -S extract.h5=/data/fashiongen_256_256_train.h5
    fashion-exp seed-30k-3k-s40 --queue        # then: dvc queue start
    fashion-exp demo -S 'train.rank=4,16' -S 'train.learning_rate=1e-3,5e-3' --queue   # a 2 x 2 sweep
    fashion-exp demo -S 'train.rank=range(4,33,4)' --sweep                           # its grid, not run
    fashion-exp --list

Each preset is a set of `-S key=value` overrides of params.yaml. The command checks them (and
your own `-S`) against the params schema first, then runs `dvc exp run -n <preset> -S ...`, so
`dvc exp show` names every experiment after the preset that made it. Anything else after the
name (--queue, --temp, -f, ...) goes to `dvc exp run` as is.

A `-S` may sweep, in DVC's grammar: `a,b,c`, `range(start, stop[, step])`, `choice(a, b)`. DVC
queues one experiment per point of the grid (named <preset>-1, -2, ...); every point is checked
first, and the line names a value that fails. `--sweep` prints the grid and runs nothing; more
than --max-runs (16) experiments queue only with --yes.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from stages.common.cli import run_cli
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, ParamsError, parse_params, read_yaml

PRESETS_FILE = Path("presets.yaml")
DEFAULT_MAX_RUNS = 16  # a sweep larger than this queues only with --yes: each experiment may train


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


def user_overrides(args: list[str]) -> list[str]:
    """The `-S key=value` overrides among the extra arguments, as written (DVC's Hydra grammar)."""
    pairs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-S", "--set-param")]
    pairs += [arg.split("=", 1)[1] for arg in args if arg.startswith("--set-param=")]
    for pair in pairs:
        if "=" not in pair:
            raise StageError(f"-S {pair}: expected key=value")
    return pairs


def command(name: str, preset: dict, extra: list[str]) -> list[str]:
    return ["dvc", "exp", "run", "-n", name, *(arg for s in preset_overrides(preset) for arg in ("-S", s)), *extra]


def preset_overrides(preset: dict) -> list[str]:
    # DVC reads -S values with Hydra's grammar: JSON quotes keep a string with commas or spaces one value
    return [f"{key}={json.dumps(value)}" for key, value in preset.items()]


def expand(overrides: list[str]) -> list[list[str]]:
    """What DVC queues for these overrides, with DVC's own code: one list of key=value per
    experiment. Hydra's sweep syntax expands (a,b,c; range(start, stop[, step]); choice(a, b)),
    as a grid over the swept keys, in DVC's order; without a sweep, one experiment."""
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    try:
        return [sweep[str(PARAMS_FILE)] for sweep in get_hydra_sweeps({str(PARAMS_FILE): overrides})]
    except HydraException as err:  # the grammar's message is several lines: its first says what
        raise StageError(f"-S {' '.join(overrides)}: not DVC's -S grammar ({str(err).splitlines()[0]}); "
                         "see https://hydra.cc/docs/advanced/override_grammar/basic") from None


def values(run: list[str]) -> dict:
    """A run's key=value overrides as Python values, read as DVC reads them (the last one wins)."""
    from dvc.utils.hydra import to_hydra_overrides

    return {o.key_or_group: o.value() for o in to_hydra_overrides(run)}


def check(name: str, presets: dict[str, dict], extra: list[str]) -> tuple[list[str], list[dict]]:
    """The dvc command for preset `name`, and the overrides of each experiment it makes (one, or a
    sweep's grid), once every one of them (preset and user -S) validates."""
    if name not in presets:
        raise StageError(f"{PRESETS_FILE}: no preset {name!r}; the presets are {', '.join(presets)}")
    runs = [values(run) for run in expand(preset_overrides(presets[name]) + user_overrides(extra))]
    swept = [key for key in runs[0] if len({json.dumps(run[key]) for run in runs}) > 1]
    params = read_yaml(PARAMS_FILE)
    for number, run in enumerate(runs, 1):
        where = f"{PRESETS_FILE}: {name}" + (f", sweep run {number} of {len(runs)} ("
                                              + ", ".join(f"{k}={run[k]}" for k in swept) + ")" if swept else "")
        try:
            parse_params(apply(params, run), where)
        except ParamsError as err:  # parse_params names `where` itself; apply does not
            raise ParamsError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
    return command(name, presets[name], extra), runs


def grid(name: str, runs: list[dict]) -> str:
    """The sweep as a table: the experiment names DVC gives it and each swept key's value."""
    swept = [key for key in runs[0] if len({json.dumps(run[key]) for run in runs}) > 1]
    rows = [["experiment", *swept]] + [[f"{name}-{n}" if len(runs) > 1 else name, *(json.dumps(run[k]) for k in swept)]
                                       for n, run in enumerate(runs, 1)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


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
    name, extra = args[0], args[1:]
    ours = {flag: flag in extra for flag in ("--dry-run", "--sweep", "--yes")}
    max_runs = DEFAULT_MAX_RUNS
    if "--max-runs" in extra:
        at = extra.index("--max-runs")
        value = extra[at + 1] if at + 1 < len(extra) else ""
        if not value.isdigit() or int(value) < 1:
            raise StageError(f"--max-runs {value}: expected a whole number of experiments, at least 1")
        max_runs, extra = int(value), extra[:at] + extra[at + 2:]
    extra = [a for a in extra if a not in ours]
    cmd, runs = check(name, presets, extra)
    if ours["--sweep"]:  # the grid alone: nothing runs, nothing is queued
        print(f"{len(runs)} experiment{'s' if len(runs) > 1 else ''}:\n" + grid(name, runs))
        return
    if len(runs) > 1 and "--queue" not in extra:
        raise StageError(f"-S: a sweep of {len(runs)} experiments runs from DVC's queue: add --queue, then "
                         "`dvc queue start` (--sweep prints the grid)")
    if len(runs) > max_runs and not ours["--yes"]:
        raise StageError(f"-S: the sweep expands to {len(runs)} experiments, more than --max-runs {max_runs}; "
                         f"check it with --sweep, then add --yes (or --max-runs {len(runs)}) to queue them all")
    check_params_clean()
    print("$ " + " ".join(cmd), flush=True)
    if not ours["--dry-run"]:
        sys.exit(subprocess.run(cmd).returncode)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

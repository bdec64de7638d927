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
    """The `-S key=value` overrides among the extra arguments (-S x, -Sx, --set-param x,
    --set-param=x), as written in DVC's Hydra grammar, less DVC's optional `params.yaml:` prefix."""
    pairs = []
    for i, arg in enumerate(args):
        if arg in ("-S", "--set-param") and i + 1 < len(args):
            pairs.append(args[i + 1])
        elif arg.startswith("--set-param="):
            pairs.append(arg.split("=", 1)[1])
        elif arg.startswith("-S") and len(arg) > 2:  # -Sx, and -S=x as argparse reads it
            pairs.append(arg[3:] if arg.startswith("-S=") else arg[2:])
    overrides = []
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        if not sep:
            raise StageError(f"-S {pair}: expected key=value")
        if ":" in key:
            if key.split(":", 1)[0] != str(PARAMS_FILE):
                raise StageError(f"-S {pair}: fashion-exp checks {PARAMS_FILE} only; set another file's params "
                                 "with `dvc exp run -S`")
            pair = pair.split(":", 1)[1]
        overrides.append(pair)
    return overrides


def command(name: str, preset: dict, extra: list[str]) -> list[str]:
    return ["dvc", "exp", "run", "-n", name, *(arg for s in preset_overrides(preset) for arg in ("-S", s)), *extra]


def preset_overrides(preset: dict) -> list[str]:
    # DVC reads -S values with Hydra's grammar: JSON quotes keep a string with commas or spaces one value
    return [f"{key}={json.dumps(value)}" for key, value in preset.items()]


def expand(overrides: list[str]) -> tuple[list[dict], bool]:
    """What DVC queues for these overrides, with DVC's own code: each experiment's overrides as
    Python values (read as DVC reads them; the last one of a key wins), and whether they sweep.
    Hydra's sweep syntax (a,b,c; range(start, stop[, step]); choice(a, b)) makes a grid over the
    swept keys, in DVC's order; without one, one experiment."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides
    from hydra.errors import HydraException

    parsed = []
    for override in overrides:  # one by one, so that the error names the one that does not parse
        try:
            parsed += to_hydra_overrides([override])
        except HydraException as err:  # the grammar's message is several lines: its first says what
            raise StageError(f"-S {override}: not DVC's -S grammar ({str(err).splitlines()[0]}); see "
                             "https://hydra.cc/docs/advanced/override_grammar/basic") from None
    for override in parsed:  # DVC shuffles on its own: the grid printed here would name other points
        if override.is_sweep_override() and getattr(override.value(), "shuffle", False):
            raise StageError(f"-S {override.input_line}: shuffle() queues in an order fashion-exp cannot show; list "
                             "the values instead")
    try:
        sweeps = get_hydra_sweeps({str(PARAMS_FILE): overrides})
    except (InvalidArgumentError, HydraException) as err:  # glob() and interval(), which DVC cannot expand
        raise StageError(f"-S: {err}") from None
    runs = [{o.key_or_group: o.value() for o in to_hydra_overrides(sweep[str(PARAMS_FILE)])} for sweep in sweeps]
    return runs, any(o.is_sweep_override() for o in parsed)


def swept_keys(runs: list[dict]) -> list[str]:
    return [key for key in runs[0] if len({json.dumps(run[key]) for run in runs}) > 1]


def check(name: str, presets: dict[str, dict], extra: list[str]) -> tuple[list[str], list[dict], bool]:
    """The dvc command for preset `name`, the overrides of each experiment it makes (one, or a
    sweep's grid) and whether it sweeps, once every experiment's params (preset and user -S)
    validate."""
    if name not in presets:
        raise StageError(f"{PRESETS_FILE}: no preset {name!r}; the presets are {', '.join(presets)}")
    runs, sweep = expand(preset_overrides(presets[name]) + user_overrides(extra))
    swept, params = swept_keys(runs), read_yaml(PARAMS_FILE)
    for number, run in enumerate(runs, 1):
        point = f" ({', '.join(f'{k}={run[k]}' for k in swept)})" if swept else ""
        where = f"{PRESETS_FILE}: {name}" + (f", sweep run {number} of {len(runs)}{point}" if sweep else "")
        try:
            parse_params(apply(params, run), where)
        except ParamsError as err:  # parse_params names `where` itself; apply does not
            raise ParamsError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
    return command(name, presets[name], extra), runs, sweep


def grid(name: str, runs: list[dict], sweep: bool) -> str:
    """The experiments as a table: the names DVC gives them and each swept key's value."""
    swept = swept_keys(runs)
    rows = [["experiment", *swept]] + [[f"{name}-{n}" if sweep else name, *(json.dumps(run[k]) for k in swept)]
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
    name, extra, max_runs = args[0], [], DEFAULT_MAX_RUNS
    ours = {flag: flag in args[1:] for flag in ("--dry-run", "--sweep", "--yes")}
    rest = iter(args[1:])
    for arg in rest:  # our own flags out; the rest goes to dvc exp run
        if arg == "--max-runs" or arg.startswith("--max-runs="):
            value = arg.split("=", 1)[1] if "=" in arg else next(rest, "")
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise StageError(f"--max-runs {value}: expected a whole number of experiments, at least 1")
            max_runs = int(value)
        elif arg not in ours:
            extra.append(arg)
    if not ours["--sweep"]:  # first: the check below reads params.yaml (--sweep only shows it)
        check_params_clean()
    cmd, runs, sweep = check(name, presets, extra)
    if ours["--sweep"]:  # the grid alone: nothing runs, nothing is queued
        print(f"{len(runs)} experiment{'s' if len(runs) > 1 else ''}:\n" + grid(name, runs, sweep))
        return
    if sweep and "--queue" not in extra:
        raise StageError(f"-S: a sweep ({len(runs)} experiment{'s' if len(runs) > 1 else ''}) runs from DVC's "
                         "queue: add --queue, then `dvc queue start` (--sweep prints the grid)")
    if len(runs) > max_runs and not ours["--yes"]:
        raise StageError(f"-S: the sweep expands to {len(runs)} experiments, more than --max-runs {max_runs}; "
                         f"check it with --sweep, then add --yes (or --max-runs {len(runs)}) to queue them all")
    print("$ " + " ".join(cmd), flush=True)
    if not ours["--dry-run"]:
        sys.exit(subprocess.run(cmd).returncode)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

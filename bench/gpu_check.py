"""One check of a CUDA (or ROCm) machine before a long run: `make gpu-check`.

    python -m bench.gpu_check                # on the GPU box: a few minutes on one H100
    python -m bench.gpu_check --tiny         # the same code paths on a CPU with the tiny models (CI runs it)

It needs no internet: full-size random models, as `make test-fullsize` builds them (once, for the
benchmark and the smoke run), so it runs from the offline wheelhouse (`make wheelhouse`). Three
parts, each timed and each with a time limit, none stopping the next:

1. tests: tests/test_cuda.py: bf16, fp16 + GradScaler, CUDA graphs with the seed's 2 x 2 under the
   ControlNet, compiled generation, resume across devices, metrics GPU against CPU, and with two
   GPUs or more, two processes over NCCL (all skipped on a CPU, and reported so);
2. bench: bench/gpu.py --short: the seed recipe, train-lora's step eager and with CUDA graphs,
   the best batch, generation at 20 steps at the stage's batch and at a T4's, peak memory;
3. smoke: every stage in order, as `dvc repro` runs them, on full-size SD 1.5 architectures at
   256 px (the tiny kit with --tiny), with each stage's time and peak GPU memory.

Prints the table, writes gpu-check.json (--out) and the table beside it (.txt; in the temp
folder where --out's folder is read-only, as an attached Kaggle dataset is), and exits 1 if a
part failed. Compiled kernels of all parts share one cache in the scratch folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["demo_data", "fetch_models", "extract", "canny_edges", "train_lora", "generate_baseline", "generate_lora",
          "metrics", "plots", "report", "model_card"]
# The smoke run on the tiny kit: every stage for real, in seconds (the repo's models.pretrain, so
# fetch-models installs the shipped kit instead of pretraining).
LIMIT_S = {"tests": 300, "bench": 360}  # a hung part is reported, and the check goes on
TINY = {"demo.products": 16, "extract.train_products": 10, "extract.eval_products": 4, "train.max_steps": 2,
        "train.warmup_steps": 0, "train.validate_every": 0,  # the CUDA full-size part validates
        "train.fixed_samples": 4, "generate.steps": 2, "generate.batch_size": 4, "metrics.bootstrap_resamples": 100,
        "metrics.fid_bootstrap_resamples": 0, "plots.grid_samples": 2}


def run_tests(folder: Path) -> dict:
    """tests/test_cuda.py in a pytest of its own: its outcome per test, from pytest's JUnit XML."""
    xml = folder / "test_cuda.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "tests/test_cuda.py", f"--junitxml={xml}"]
    result = run_limited(command, LIMIT_S["tests"])
    if not xml.is_file():
        return {"ok": False, "error": (result.stdout + result.stderr).strip()[-2000:]}
    tests = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        reason = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        tests.append({"test": case.get("name"), "outcome": outcome, "s": round(float(case.get("time", 0)), 1),
                      **({"message": reason[:300]} if outcome != "passed" else {})})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    return {"ok": result.returncode in (0, 5) and not counts["failed"] and not counts["error"], **counts,
            "tests": tests, **({"log": result.stdout[-3000:]} if result.returncode not in (0, 5) else {})}


def run_limited(command: list[str], limit: int) -> subprocess.CompletedProcess:
    """`command` in the checkout, its output captured; past `limit` seconds it is stopped and
    reported as timed out."""
    try:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(command, 124, tail, f"timed out after {limit} s")


def run_bench(folder: Path, tiny: bool) -> dict:
    """bench/gpu.py --short, in a process of its own, on the smoke run's full-size models: its JSON."""
    out = folder / "bench-gpu.json"
    command = [sys.executable, "-m", "bench.gpu", "--short", "--out", str(out)] + (
        ["--tiny", "--train-steps", "1", "--images", "2", "--generate-batch", "2", "--generate-steps", "2"]
        if tiny else ["--models", str(bench_models(folder))])
    result = run_limited(command, LIMIT_S["bench"])
    if result.returncode or not out.is_file():
        return {"ok": False, "error": (result.stdout + result.stderr).strip()[-3000:]}
    measured = json.loads(out.read_text())
    if not tiny:
        measured["size"] = "full (random weights, built by gpu-check)"
    return {"ok": True, **measured}


def sources(folder: Path) -> dict[str, Path]:
    """The full-size random models, built once for the benchmark and the smoke run."""
    from bench.full_size_models import build_full_size_sources, source_paths

    if not (folder / "sources").is_dir():
        return build_full_size_sources(folder / "sources")
    return source_paths(folder / "sources")


def bench_models(folder: Path) -> Path:
    """base/ and controlnet/ as bench/gpu.py --models loads them: the sources' fp16 variant files
    linked under their plain names, as fetch-models installs them."""
    built, models = sources(folder), folder / "bench-models"
    for name in ("base", "controlnet"):
        for file in built[name].rglob("*"):
            if file.is_file():
                target = models / name / file.relative_to(built[name]).as_posix().replace(".fp16.", ".")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(file, target)
    return models


def smoke_project(folder: Path, tiny: bool, cuda: bool) -> Path:
    """A scratch project: the repo's params.yaml with the smoke run's sizes and models."""
    root = folder / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if tiny:
        overrides = TINY
    else:
        from bench.full_size_models import full_size_settings

        overrides = full_size_settings(sources(folder), cuda)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        section[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_smoke(folder: Path, tiny: bool, dev: torch.device) -> dict:
    """Every stage in order, in this process (as `python -m stages.X` runs it): time and peak GPU
    memory of each; the first failure stops the run and is reported with its stage."""
    started = time.perf_counter()
    root = smoke_project(folder, tiny, dev.type == "cuda")
    rows, here = [{"stage": "build models", "s": round(time.perf_counter() - started, 1)}], os.getcwd()
    os.chdir(root)
    try:
        for stage in STAGES:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            started = time.perf_counter()
            error = None
            try:
                with warnings.catch_warnings():  # "found in sys.modules": imported by an earlier stage, as intended
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
            except SystemExit as stop:  # run_cli's one-line error went to stderr
                error = None if stop.code in (0, None) else f"exit status {stop.code}"
            except Exception as err:  # noqa: BLE001 - reported, and the check goes on to its table
                error = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            rows.append({"stage": stage.replace("_", "-"), "s": round(time.perf_counter() - started, 1),
                         **({"peak_gpu_gb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)}
                            if dev.type == "cuda" else {}), **({"error": error} if error else {})})
            if error:
                break
    finally:
        os.chdir(here)
    ok = len(rows) == len(STAGES) + 1 and "error" not in rows[-1]
    metrics = json.loads((root / "metrics" / "metrics.json").read_text()) if ok else None
    return {"ok": ok, "models": "tiny kit" if tiny else "full-size SD 1.5 (random weights), 256 px",
            "stages": rows, **({"metrics": metrics} if metrics else {})}


def table(result: dict) -> str:
    """The readable summary: one line per test, benchmark row and stage."""
    lines = [f"gpu-check: {result['device']}, torch {result['torch']}, {result['wall_s']:.0f} s, "
             f"{'OK' if result['ok'] else 'FAILED'}"]
    tests = result["tests"]
    lines.append(f"\ntests/test_cuda.py: {'ok' if tests['ok'] else 'FAILED'}" + (
        f" ({tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, {tests['skipped']} skipped)"
        if "tests" in tests else f": {tests.get('error', '')}"))
    for t in tests.get("tests", []):
        lines.append(f"  {t['outcome']:<8} {t['s']:>6.1f} s  {t['test']}" + (
            f"  ({t['message'][:100]})" if t["outcome"] != "passed" else ""))
    bench = result["bench"]
    lines.append(f"\nbench/gpu.py --short: {'ok' if bench['ok'] else 'FAILED'}")
    if bench["ok"]:
        lines.append(f"  {'measurement':<40} {'batch':>6} {'dtype':>9} {'rate':>9} {'unit':<10} {'peak GB':>8}")
        for r in bench["rows"]:
            peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
            lines.append(f"  {r['name']:<40} {r['batch']:>6} {r['dtype']:>9} {r['rate']:>9.2f} {r['unit']:<10} "
                         f"{peak:>8}")
    else:
        lines.append("  " + bench["error"].splitlines()[-1] if bench.get("error") else "")
    smoke = result["smoke"]
    lines.append(f"\nsmoke run of every stage ({smoke.get('models', '')}): {'ok' if smoke['ok'] else 'FAILED'}")
    for row in smoke.get("stages", []):
        peak = f"  peak GPU {row['peak_gpu_gb']:.1f} GB" if "peak_gpu_gb" in row else ""
        lines.append(f"  {row['stage']:<18} {row['s']:>7.1f} s{peak}" + (f"  {row['error']}" if "error" in row else ""))
    if "error" in smoke:
        lines.append("  " + smoke["error"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU path: tiny models, no timing claims")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON; the table goes beside it")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.tiny and not torch.cuda.is_available():
        print(f"error: gpu-check: torch {torch.__version__} sees no CUDA (or ROCm) device on this machine; run it "
              "on the GPU machine, or `python -m bench.gpu_check --tiny` (make gpu-check ARGS=--tiny) for the "
              "CPU path", file=sys.stderr)
        return 1
    if args.tiny:
        os.environ["FASHION_DEVICE"] = "cpu"
    from stages.common.runtime import device

    dev = device()
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="fashion-gpu-check-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # one cache for every part
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor()})",
              "torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip, "tiny": args.tiny}
    try:
        for part, run in (("tests", lambda: run_tests(folder)), ("bench", lambda: run_bench(folder, args.tiny)),
                          ("smoke", lambda: run_smoke(folder, args.tiny, dev))):
            print(f"gpu-check: {part} ...", file=sys.stderr, flush=True)
            part_started = time.perf_counter()
            try:
                result[part] = run()
            except Exception as err:  # noqa: BLE001 - a broken part is a result too
                result[part] = {"ok": False, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
            result[part]["wall_s"] = round(time.perf_counter() - part_started, 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(result[part]["ok"] for part in ("tests", "bench", "smoke"))
    text = table(result)
    print(text)  # first: whatever happens to the files, the table is on the screen
    out = args.out
    try:
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError:  # a read-only folder (an attached Kaggle dataset): the temp folder instead
        out = Path(tempfile.gettempdir()) / args.out.name
        out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"\ngpu-check: JSON in {out}, this table in {out.with_suffix('.txt')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

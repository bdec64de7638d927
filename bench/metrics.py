"""Benchmark: the metrics stage at the seed's size (3,000 eval images at 256 px) on this CPU, with
the demo's stand-in backbones, so that metrics never becomes the slow stage.

    python -m bench.metrics [--images 3000] [--size 256] [--workdir /tmp/fashion-bench-metrics] [--code DIR]

Draws `--images` demo garments (their categories as FashionGen's), their canny maps with
params.yaml's thresholds, and two "generated" sets (the ground truth blurred, shifted and given
noise, as a generator's near misses), once, into --workdir. Then runs `python -m stages.metrics`
there as DVC would, with the code and params.yaml of `--code` (default: this checkout; give a
`git worktree` of an older commit to time the code before a change), and prints the wall time,
peak RSS and the stage's own log lines. The models come from this checkout's models/ (run
`make demo` once first).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common import dataset  # noqa: E402
from stages.common.edges import canny  # noqa: E402
from stages.common.io import index_name, save_png, write_json  # noqa: E402
from stages.demo.garments import draw, make_garments  # noqa: E402


def near_miss(image: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """The image blurred, shifted by a few pixels and given noise: close to it, never equal."""
    moved = np.roll(cv2.GaussianBlur(image, (5, 5), 1.2), shift, axis=1)
    return np.clip(moved + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def build(workdir: Path, images: int, size: int) -> None:
    """The eval set, its edges and both generated sets, in the default params' paths."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    paths, thresholds = params["paths"], params["canny"]
    done = workdir / "images.done"
    if done.is_file() and done.read_text() == f"{images} {size}":
        return
    if workdir.exists() and not done.is_file() and any(workdir.iterdir()):
        sys.exit(f"{workdir}: not empty and not this benchmark's; name a new --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    rng = np.random.default_rng(0)
    configs = []
    for index, garment in enumerate(make_garments(seed=0, products=images)):
        gt = draw(garment, 0, size)
        save_png(dataset.gt_path(workdir / paths["eval_data"], index), gt)
        save_png(dataset.edge_path(workdir / paths["edges"], index),
                 canny(gt, thresholds["low_threshold"], thresholds["high_threshold"]))
        for variant, shift in (("baseline", 3), ("lora", 2)):
            save_png(workdir / paths[f"generated_{variant}"] / index_name(index), near_miss(gt, rng, shift))
        configs.append({"index": index, "image": f"{dataset.GT_DIR}/{index_name(index)}", "prompt": garment.description(),
                        "product_id": garment.product_id, "row": index, "name": garment.name(),
                        "category": garment.category})
    write_json(workdir / paths["eval_data"] / dataset.EVAL_CONFIGS, configs)
    for key in ("eval_models", "model_sources"):
        source, target = REPO / paths[key], workdir / paths[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    done.write_text(f"{images} {size}")


def run(workdir: Path, code: Path) -> float:
    shutil.copy(code / "params.yaml", workdir / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "stages.metrics"], cwd=workdir, env=env, text=True,
                            capture_output=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    for line in result.stderr.splitlines():
        if "stages:" in line:
            print("   ", line.split("stages: ", 1)[-1][:200])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fashion-bench-metrics"))
    parser.add_argument("--code", type=Path, default=REPO)
    args = parser.parse_args()
    if not (REPO / "models" / "eval").is_dir():
        sys.exit("models/eval: not found; run `make demo` once first")
    start = time.perf_counter()
    build(args.workdir, args.images, args.size)
    print(f"eval set: {args.images} images at {args.size} px in {args.workdir} "
          f"({time.perf_counter() - start:.0f} s to draw, or reused)")
    seconds = run(args.workdir, args.code.resolve())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the stage is the only child
    print(f"metrics ({args.code}): {seconds:.1f} s wall, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()

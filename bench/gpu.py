"""Benchmark: training and generation throughput on one GPU, against the seed recipe, in one run.

    python -m bench.gpu                       # full-size SD 1.5 + canny ControlNet, random weights, 256 px
    python -m bench.gpu --models models       # real weights: a folder with base/ and controlnet/
    python -m bench.gpu --tiny                # the tiny models on the CPU: the code paths, no timing claims

It runs the project's own code: train-lora's `Trainer` (the optimiser step of the stage, latent
cache included) and the generate stages' `draw`, not a copy. Measured, each after warm-up steps:

- training samples/s (and warm-up seconds, compiling included) of the seed recipe's configuration (fp32, VAE and text encoder at every
  step, batch 2 x 2 accumulation, through the same Trainer: the notebook loop itself was slower
  still, with an unfused AdamW), of train-lora's path at the seed's 4 samples per
  optimiser step, eager and (on a GPU) with CUDA graphs (`train.compile: reduce-overhead`), and
  at the batch of --train-batches that runs fastest;
- the latent cache's encoding rate, and from it and the batch-4 rate an estimate of the seed's
  whole 5000-step run on 30k images (20k samples: 20k pairs to encode);
- generation images/s of the notebook recipe (one image per call, UniPC, fp16) and of the
  generate stages' batched path, at 20 and 40 steps;
- peak GPU memory of each, and achieved TFLOP/s with FLOPs counted by torch.utils.flop_counter;
- on a GPU, the T4's shapes: fp16 training at 2 x 2, and generation at batch 8, 16 and 32
  (the peak memory against a T4's 16 GB; the rates are this GPU's, not a T4's).

Prints a table last and writes JSON (--out). Full size needs the real CLIP vocabulary: the
`fullsize` extra (pip install -e '.[fullsize]').
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common.generation import draw  # noqa: E402
from stages.common.models import load_controlnet_pipeline  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.runtime import device, inference_dtype, is_oom, training_dtype  # noqa: E402
from stages.common.training import Trainer, TrainSamples, encode_latents  # noqa: E402
from bench.full_size_models import build_sd15_and_controlnet  # noqa: E402

SEED_RUN = {"steps": 5000, "samples_per_step": 4, "images": 30_000}  # the notebooks' run
PROMPT = "Long sleeve dress in red with white polka dots"


def build_models(folder: Path, size: str) -> tuple[Path, Path]:
    """Random SD 1.5 and canny ControlNet in the layouts the stages load (plain weight names)."""
    torch.manual_seed(0)
    build_sd15_and_controlnet(folder / "base", folder / "controlnet", size)
    for variant in folder.rglob("*.fp16.safetensors"):  # what fetch-models' install() does
        variant.rename(variant.with_name(variant.name.replace(".fp16", "")))
    return folder / "base", folder / "controlnet"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    """A clean slate for the next row: the last measurement's models, a failed batch's activations,
    and compiled state. A CUDA-graph pool (and dynamo's caches) can outlive the Trainer that made
    them, so without the resets a later row would run with less free memory than it could have,
    and the best-batch search would under-report."""
    torch._dynamo.reset()
    if dev.type == "cuda":
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def tf32_state() -> str:
    """Which fp32 kernels may use TF32, as a row records it. torch's defaults, which the seed's
    notebooks ran with: convolutions yes (cuDNN), matmuls no."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return {(True, True): "conv+matmul", (True, False): "conv", (False, True): "matmul"}.get((conv, matmul), "none")


def peak_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def significant(x: float) -> float:
    return float(f"{x:.4g}")


def measure_training(name: str, paths, train_cfg, dtype, dev, resolution: int, steps: int,
                     warmup: int) -> dict:
    """samples/s of `steps` optimiser steps of train-lora's Trainer after `warmup` steps."""
    reset_peak(dev)
    trainer = Trainer(paths, dataclasses.replace(train_cfg, max_steps=warmup + steps + 1), dtype, dev)
    per_step = train_cfg.batch_size * train_cfg.grad_accumulation
    count = max(64 if dev.type == "cpu" else 512, per_step * 2)  # images to encode (and train on)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
    samples = TrainSamples(images, [PROMPT] * count, trainer.m.tokenizer, True, train_cfg.seed,
                           trainer.latent_shape(resolution), trainer.m.noise_scheduler.config.num_train_timesteps)
    encode = {}
    if train_cfg.cache_latents:
        pairs = [(i, f) for i in range(count) for f in (0, 1)]
        encode_latents(trainer.m.vae, samples, pairs[:32], dtype, dev, batch=32)  # warm-up: kernels chosen
        sync(dev)
        started = time.perf_counter()
        samples.use_cache(pairs, encode_latents(trainer.m.vae, samples, pairs, dtype, dev, batch=32))
        sync(dev)
        encode = {"encode_images_per_s": round(len(pairs) / (time.perf_counter() - started), 1)}
    batches = trainer.loader(samples, 0, warmup + steps + 1)
    started = time.perf_counter()
    for step in range(warmup):  # with train.compile, this is where it compiles and captures
        trainer.step(step, batches, samples)
    sync(dev)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.step(step, batches, samples)
    sync(dev)
    elapsed = time.perf_counter() - started
    flops = counted_flops(lambda: trainer.step(warmup + steps, batches, samples))
    rate = steps * per_step / elapsed
    result = {"name": name, "kind": "train", "batch": f"{train_cfg.batch_size}x{train_cfg.grad_accumulation}",
              "dtype": str(dtype).removeprefix("torch."), "rate": round(rate, 2), "unit": "samples/s",
              "step_ms": round(1000 * elapsed / steps, 1), "tflops": significant(flops * steps / elapsed / 1e12),
              "peak_gb": peak_gb(dev), "warmup_s": round(warmup_s, 1), **encode}
    if dtype == torch.float32 and dev.type == "cuda":
        result["tf32"] = tf32_state()
    del trainer, samples, batches
    return result


def measure_generation(name: str, pipe, generate_cfg, dev, batch: int, images: int, resolution: int) -> dict:
    """images/s of the generate stages' `draw`, `batch` images per call."""
    edges = Image.fromarray(np.zeros((resolution, resolution, 3), np.uint8))
    edges.paste((255, 255, 255), (resolution // 4, resolution // 4, resolution // 4 + 2, 3 * resolution // 4))

    def call(seeds):
        return draw(pipe, [edges] * len(seeds), [PROMPT] * len(seeds), seeds, generate_cfg, dev)

    reset_peak(dev)
    call(list(range(batch)))  # warm-up: kernels picked, memory allocated
    sync(dev)
    started = time.perf_counter()
    done = 0
    while done < images:
        call(list(range(done, done + batch)))
        done += batch
    sync(dev)
    elapsed = time.perf_counter() - started
    flops = counted_flops(lambda: call(list(range(batch))))
    return {"name": name, "kind": "generate", "batch": str(batch), "steps": generate_cfg.steps,
            "dtype": str(pipe.dtype).removeprefix("torch."), "rate": round(done / elapsed, 3), "unit": "images/s",
            "tflops": significant(flops * done / batch / elapsed / 1e12), "peak_gb": peak_gb(dev)}


def table(rows: list[dict], baseline: dict[str, float]) -> str:
    lines = [f"{'measurement':<34} {'batch':>6} {'dtype':>9} {'rate':>10} {'unit':<10} {'x recipe':>8} "
             f"{'TFLOP/s':>8} {'peak GB':>8}"]
    for r in rows:
        ratio = r["rate"] / baseline[r["kind"]] if baseline.get(r["kind"]) else float("nan")
        peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
        lines.append(f"{r['name']:<34} {r['batch']:>6} {r['dtype']:>9} {r['rate']:>10.2f} {r['unit']:<10} "
                     f"{ratio:>8.1f} {r['tflops']:>8.3g} {peak:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models (the CPU is fine): code paths, not speed")
    parser.add_argument("--models", type=Path, help="a folder with base/ and controlnet/ (real weights)")
    parser.add_argument("--resolution", type=int, help="default 256 (the seed's), 64 with --tiny")
    parser.add_argument("--train-steps", type=int, help="timed optimiser steps per measurement")
    parser.add_argument("--train-batches", type=int, nargs="+", help="batch sizes to try for the best batch")
    parser.add_argument("--generate-batch", type=int, help="images per call for the batched path")
    parser.add_argument("--images", type=int, help="images per generation measurement")
    parser.add_argument("--generate-steps", type=int, nargs="+", default=[20, 40],
                        help="denoising steps to time generation at; the first is the baseline of the ratios")
    parser.add_argument("--short", action="store_true",
                        help="fewer steps and batches, generation at 20 steps only: make gpu-check's few minutes")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
    args = parser.parse_args(argv)
    if args.short:
        args.train_steps = args.train_steps or (1 if args.tiny else 10)
        args.train_batches = args.train_batches or ([8] if args.tiny else [32, 64])
        args.images = args.images or (2 if args.tiny else 64)
        args.generate_steps = [args.generate_steps[0]] if args.generate_steps != [20, 40] else [20]

    dev = device()
    tiny = args.tiny
    if dev.type == "cuda":  # stated, not inherited: the fp32 rows record it (torch's defaults)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    resolution = args.resolution or (64 if tiny else 256)
    steps = args.train_steps or (3 if tiny else 30)
    warmup = 1 if tiny else 5
    batches = args.train_batches or ([8, 16] if tiny else [32, 64, 128])
    generate_batch = args.generate_batch or (4 if tiny else 64)
    images = args.images or (4 if tiny else 128)
    params = load_params(REPO / "params.yaml")
    # the seed recipe's LoRA, not the demo's (rank 16, lr 5e-3)
    train_cfg = dataclasses.replace(params.train, mixed_precision="auto", cache_latents=True, grad_accumulation=1,
                                    batch_size=4, warmup_steps=0, num_workers=-1, rank=4, alpha=4,
                                    learning_rate=1e-4, controlnet=False, validate_every=0)
    started = time.perf_counter()
    workdir = None
    if args.models:
        base, controlnet = args.models / "base", args.models / "controlnet"
    else:
        workdir = Path(tempfile.mkdtemp(prefix="fashion-bench-"))
        base, controlnet = build_models(workdir, "tiny" if tiny else "full")
    build_s = time.perf_counter() - started
    # What train-lora's Trainer reads of paths: the base model, and where compiled kernels are kept.
    paths = types.SimpleNamespace(base_model=base, resume=os.path.join(tempfile.gettempdir(), "fashion-bench-cache"))
    print(f"bench.gpu: {'tiny' if tiny else 'full-size'} models ({build_s:.0f} s), {resolution} px on {dev}"
          f"{' ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}", flush=True)

    rows = []
    try:
        recipe = dataclasses.replace(train_cfg, mixed_precision="no", cache_latents=False, batch_size=2,
                                     grad_accumulation=2)
        rows.append(measure_training("train: seed recipe", paths, recipe, torch.float32, dev, resolution,
                                     steps, warmup))
        fast = training_dtype("auto", dev)
        rows.append(measure_training("train: train-lora, 4 per step", paths, train_cfg, fast, dev, resolution,
                                     steps, warmup))
        if dev.type == "cuda":  # inductor on a CPU takes minutes to compile even the tiny UNet
            graphed = dataclasses.replace(train_cfg, compile="reduce-overhead")
            rows.append(measure_training("train: train-lora, 4 per step, CUDA graphs", paths, graphed, fast, dev,
                                         resolution, steps * 3, warmup))
        best = None
        for batch in batches:
            try:
                row = measure_training(f"train: train-lora, batch {batch}", paths,
                                       dataclasses.replace(train_cfg, batch_size=batch), fast, dev, resolution,
                                       max(2, steps // 3), warmup)
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                print(f"bench.gpu: batch {batch} does not fit", flush=True)
                break
            if best is None or row["rate"] > best["rate"]:
                best = row
        if best:
            rows.append(best)
        if dev.type == "cuda":  # a Kaggle T4 has no bf16: fp16 with loss scaling, the seed's 2 x 2
            t4 = dataclasses.replace(train_cfg, mixed_precision="fp16", batch_size=2, grad_accumulation=2)
            rows.append(measure_training("train: T4 shape (fp16, 2x2)", paths, t4, torch.float16, dev, resolution,
                                         max(2, steps // 3), warmup))

        generate_cfg = dataclasses.replace(params.generate, negative_prompt="", guidance_scale=7.5)
        dtype = inference_dtype("auto", dev)
        pipe = load_controlnet_pipeline(base, controlnet, "unipc", dtype, dev)
        for steps_n in args.generate_steps:
            cfg = dataclasses.replace(generate_cfg, steps=steps_n)
            rows.append(measure_generation(f"generate: notebook recipe, {steps_n} steps", pipe, cfg, dev, 1,
                                           max(2, images // 16), resolution))
            rows.append(measure_generation(f"generate: generate stages, {steps_n} steps", pipe, cfg, dev,
                                           generate_batch, images, resolution))
        if dev.type == "cuda":  # the largest batch a 16 GB T4 holds, fp16 (peak memory is the figure to read)
            for batch in (8, 16, 32):
                rows.append(measure_generation(f"generate: T4 shape, batch {batch}", pipe,
                                               dataclasses.replace(generate_cfg, steps=20), dev, batch, batch,
                                               resolution))
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    recipe_rate = rows[0]["rate"]
    baseline = {"train": recipe_rate, "generate": next(r["rate"] for r in rows if r["name"].startswith(
        f"generate: notebook recipe, {args.generate_steps[0]} steps"))}
    batch4 = rows[1]
    graphed = next((r for r in rows if r["name"].endswith("CUDA graphs")), None)
    fastest = max((batch4, graphed) if graphed else (batch4,), key=lambda r: r["rate"])
    # The cache encodes the (image, flip) pairs the run draws: 20k samples of 30k images are 20k pairs.
    encodes = min(SEED_RUN["steps"] * SEED_RUN["samples_per_step"], 2 * SEED_RUN["images"])
    whole_run = (encodes / batch4["encode_images_per_s"] + fastest["warmup_s"]
                 + SEED_RUN["steps"] * SEED_RUN["samples_per_step"] / fastest["rate"])
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
              "torch": torch.__version__, "size": "tiny" if tiny else ("real" if args.models else "full"),
              "resolution": resolution, "rows": rows,
              "seed_run_estimate_s": {"train_lora": round(whole_run, 1), "seed_recipe": round(
                  SEED_RUN["steps"] * SEED_RUN["samples_per_step"] / recipe_rate, 1),
                  "note": "encoding the 20k (image, flip) pairs the run draws, warm-up (compiling, where it "
                          "compiles) and 5000 steps of 4 at the faster batch-4 rate; no model loading or saving"}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbench.gpu: {result['device']}, torch {result['torch']}, {result['size']} models, {resolution} px; "
          f"JSON in {args.out}")
    print(f"seed's whole run (estimate): train-lora {result['seed_run_estimate_s']['train_lora']:.0f} s, "
          f"seed recipe {result['seed_run_estimate_s']['seed_recipe']:.0f} s")
    print(table(rows, baseline))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

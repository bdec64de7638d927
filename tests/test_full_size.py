"""Every stage at full size: SD 1.5, canny ControlNet v1.1 and CLIP ViT-B/32 architectures with
random weights and the real CLIP vocabulary, taken in through `models.mode: local`, at 256 px.

    make test-fullsize        # about 10 minutes on 2 CPU cores; prints time and peak RSS per stage

Tiny models hide what shows only at full size: memory, load times, fp16 weights upcast on load,
the real tokenizer's 77-token truncation. Each stage runs as DVC runs it (`python -m stages.X`),
under /usr/bin/time for its peak RSS. On a CUDA machine the same test trains and samples a few
hundred images, and also in a T4's precision (fp16 training with a GradScaler, fp16 sampling).
"""

import json
import os
import re
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stages.common.train_log import read_history
from stages.common import dataset
from stages.common.io import load_rgb
from stages.common.dataset import LORA_WEIGHTS
from bench.full_size_models import build_full_size_sources, full_size_settings
from tests.conftest import REPO, Project

pytestmark = pytest.mark.fullsize
CUDA = torch.cuda.is_available()
STAGES = ["demo_data", "fetch_models", "extract", "canny_edges", "train_lora", "generate_baseline", "generate_lora",
          "metrics", "plots", "report", "model_card"]
LONG = " ".join(["red"] * 95)  # 97 CLIP tokens with BOS and EOS, cut at 77 everywhere; fits |S400


def run_stage(project: Project, stage: str) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "FASHION_DEVICE": "auto"}
    result = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", f"stages.{stage}"],
                            cwd=project.root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    gpu = re.search(r"peak GPU memory ([\d.]+) GB", result.stderr)
    return {"stage": stage, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_gb": round(int(result.stderr.strip().splitlines()[-1]) / 1024 ** 2, 2),
            **({"peak_gpu_gb": float(gpu.group(1)) if gpu else None} if CUDA else {})}


def lengthen_some_descriptions(h5_path) -> None:
    """Give every third product a description longer than CLIP's 77 tokens."""
    with h5py.File(h5_path, "r+") as f:
        descriptions = f["input_description"]
        for row in range(0, len(descriptions), 3):
            descriptions[row] = np.array([LONG.encode("latin-1")], dtype=descriptions.dtype)
        assert descriptions[0][0].decode("latin-1") == LONG, "the field holds it whole"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    started = time.perf_counter()
    built = build_full_size_sources(tmp_path_factory.mktemp("full_size_sources"))
    print(f"\nbuilt full-size random models in {time.perf_counter() - started:.0f} s")
    return built


def full_size_project(root, sources, **overrides) -> Project:
    return Project(root).set({**full_size_settings(sources, CUDA), **overrides})


def run_all(p: Project, title: str) -> None:
    """Every stage in order, as DVC would, then the table of time and memory."""
    rows = []
    for stage in STAGES:
        rows.append(run_stage(p, stage))
        if stage == "demo_data":
            lengthen_some_descriptions(p.path("demo_h5"))
    report(title, rows)


def report(title: str, rows: list[dict]) -> None:
    table = pd.DataFrame(rows)
    print(f"\n{title}\n{table.to_string(index=False)}\ntotal {table['wall_s'].sum():.0f} s, "
          f"max peak RSS {table['peak_rss_gb'].max():.2f} GB")


def check_outputs(p: Project) -> None:
    weights = load_file(p.path("lora") / LORA_WEIGHTS)
    text_encoder = p.params["train"]["text_encoder_rank"]  # gpu-check's CUDA run trains one (4 layers x 12)
    assert len([k for k in weights if k.startswith("unet.")]) == 256
    assert len([k for k in weights if k.startswith("text_encoder.")]) == (2 * 4 * 12 if text_encoder else 0)
    assert all(torch.isfinite(v).all() for v in weights.values())
    # the real UNet's widths: the first down block's attention works on 320 channels
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    assert weights[key].shape == (4, 320)
    loss = read_history(p.path("train_log"))
    assert np.isfinite(loss["loss"]).all() and len(loss) == p.params["train"]["max_steps"]
    summary = json.loads(p.path("split_summary").read_text())
    configs = dataset.load_eval_configs(p.path("eval_data"))
    # cut once, at extract, to the 75 words that fit between BOS and EOS
    assert summary["eval"]["prompts_cut_to_77_tokens"] == sum(c["prompt"] == " ".join(["red"] * 75) for c in configs)
    assert summary["train"]["prompts_cut_to_77_tokens"] > 0
    paths = p.typed().paths
    for variant in dataset.VARIANTS:
        for c in configs:
            image = load_rgb(p.root / dataset.generated_path(paths, variant, c["index"]))
            assert image.shape == (256, 256, 3) and image.std() > 0, "not blank: no NaN turned black"
    metrics = json.loads(p.path("metrics").read_text())
    for variant in dataset.VARIANTS:
        assert all(np.isfinite(metrics[variant][k]) for k in ("fid", "kid_x1e3", "lpips", "clip_score"))
    detail = json.loads(p.path("metrics_detail").read_text())
    assert detail["backbones"]["clip"].startswith("openai/clip-vit-base-patch32 (weights sha256")


def test_every_stage_at_full_size(sources, tmp_path):
    p = full_size_project(tmp_path, sources)
    run_all(p, f"full size on {'CUDA' if CUDA else 'CPU'}")
    check_outputs(p)
    # fetch-models only linked the user's files: fp16 on disk, exactly as the "hub" folders had them
    unet = p.path("base_model") / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.stat().st_ino == (sources["base"] / "unet" / "diffusion_pytorch_model.fp16.safetensors").stat().st_ino


@pytest.mark.skipif(not CUDA, reason="a T4's precision needs a CUDA device")
def test_t4_precision_at_full_size(sources, tmp_path):
    """fp16 training with a GradScaler and fp16 sampling, as `auto` picks on a T4 (no bf16)."""
    p = full_size_project(tmp_path, sources, **{"train.mixed_precision": "fp16", "generate.precision": "fp16"})
    run_all(p, "full size, fp16 training and sampling (a T4's precision)")
    check_outputs(p)

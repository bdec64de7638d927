"""The CUDA paths: bf16 and fp16 (T4-style, GradScaler) training, CUDA graphs in training (the
seed's 2 x 2 under the ControlNet) and in generation, fp16 generation, resume across devices,
metrics on the GPU. Skipped where there is no GPU, so CI (CPU-only) never runs them: `make
gpu-check` runs them on a GPU machine. tests/test_precision.py runs the precision paths on the CPU."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stages.common.train_log import read_history
from stages.common import dataset
from stages.common.io import load_rgb, read_json
from stages.common.dataset import LORA_WEIGHTS
from stages.common import generation
from tests.conftest import fill_generated, image_diff

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def on_cuda(trained_project, monkeypatch):
    monkeypatch.setenv("FASHION_DEVICE", "cuda")
    return trained_project


@pytest.mark.parametrize("precision", ["auto", "fp16", "no"])
def test_training_precisions(on_cuda, precision):
    p = on_cuda
    p.run("train_lora", train__mixed_precision=precision, train__max_steps=6)
    auto = "torch.bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "torch.float16"  # T4: fp16
    expected = {"auto": auto, "fp16": "torch.float16", "no": "torch.float32"}[precision]
    assert read_json(p.path("lora") / "training_config.json")["dtype"] == expected
    weights = load_file(p.path("lora") / LORA_WEIGHTS)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora.up.weight"))


def test_fp16_generation_and_lora(on_cuda):
    p = on_cuda
    p.run("train_lora")
    p.run("generate_baseline")
    p.run("generate_lora")
    paths = p.typed().paths
    for c in dataset.load_eval_configs(p.path("eval_data")):
        base = load_rgb(dataset.generated_path(paths, "baseline", c["index"]))
        assert base.std() > 1, "not a blank image (no NaNs turned black)"
    assert read_json(paths.generated_baseline + "/generation_config.json")["dtype"] == "torch.float16"


@pytest.mark.parametrize("tf32", [False, True])
def test_metrics_agree_between_cpu_and_cuda(on_cuda, monkeypatch, tf32):
    """With TF32 off (the default), GPU and CPU agree to 1e-4; with it on they may not, which is
    why it is off. Both runs are printed, so the TF32 gap is measured, not assumed."""
    p = on_cuda
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics", metrics__tf32=tf32)
    gpu = read_json(p.path("metrics"))
    monkeypatch.setenv("FASHION_DEVICE", "cpu")
    p.run("metrics")
    cpu = read_json(p.path("metrics"))
    for variant in dataset.VARIANTS:
        for key in gpu[variant]:
            gap = abs(gpu[variant][key] - cpu[variant][key]) if gpu[variant][key] is not None else 0.0
            print(f"tf32={tf32} {variant}.{key}: gpu {gpu[variant][key]!r} cpu {cpu[variant][key]!r} gap {gap:.2e}")
            if not tf32:
                np.testing.assert_allclose(gpu[variant][key], cpu[variant][key], rtol=1e-4, atol=1e-4,
                                           err_msg=f"{variant}.{key}")


@pytest.mark.parametrize("text_encoder_rank", [0, 2], ids=["unet", "and-text-encoder"])
def test_cuda_graphs_train_the_seeds_two_micro_batches_under_the_controlnet(on_cuda, text_encoder_rank):
    """train.compile: reduce-overhead with 2 x 2: each micro-batch's backward accumulates into
    gradient buffers outside the graph pool (pytorch#169545 otherwise), and the compiled text
    encoder and ControlNet replay their graphs per micro-batch. The loss curve follows the eager
    one (bf16 or fp16 rounding apart). With a text encoder LoRA the compiled text encoder trains
    and the compiled ControlNet passes gradients back to it."""
    p = on_cuda
    p.run("train_lora", train__batch_size=2, train__grad_accumulation=2, train__controlnet=True, train__max_steps=6,
          train__text_encoder_rank=text_encoder_rank, train__compile="none")
    eager = read_history(p.path("train_log"))
    p.run("train_lora", train__compile="reduce-overhead")
    graphed = read_history(p.path("train_log"))
    assert np.isfinite(graphed["loss"]).all() and len(graphed) == 6
    np.testing.assert_allclose(graphed["loss"], eager["loss"], rtol=0.05)
    weights = load_file(p.path("lora") / LORA_WEIGHTS)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_compiled_generation_with_cuda_graphs(on_cuda):
    """generate.compile: reduce-overhead: the pipeline marks each denoising step (the models are
    compiled by assignment), so the UNet's replay does not overwrite the ControlNet residuals it
    reads (pytorch#160281): the images match the eager ones."""
    p = on_cuda
    p.run("generate_baseline")
    paths = p.typed().paths
    configs = dataset.load_eval_configs(p.path("eval_data"))
    eager = {c["index"]: load_rgb(dataset.generated_path(paths, "baseline", c["index"])) for c in configs}
    shutil.rmtree(p.path("generated_baseline"))
    p.run("generate_baseline", generate__compile="reduce-overhead")
    for c in configs:
        assert image_diff(load_rgb(dataset.generated_path(paths, "baseline", c["index"])), eager[c["index"]]) <= 8


def test_a_folder_begun_on_the_cpu_is_not_finished_on_the_gpu(on_cuda, monkeypatch, caplog):
    """CPU and CUDA generators draw different noise from one seed: a resume folder started on the
    CPU is dropped by a GPU run, not topped up, even in the same precision (fp32 on both)."""
    import logging

    p = on_cuda
    real = generation.draw

    def die_after_one(*args, **kwargs):
        monkeypatch.setattr(generation, "draw", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real(*args, **kwargs)

    monkeypatch.setenv("FASHION_DEVICE", "cpu")
    monkeypatch.setattr(generation, "draw", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        p.run("generate_baseline", generate__batch_size=1, generate__precision="fp32")
    monkeypatch.setattr(generation, "draw", real)
    monkeypatch.setenv("FASHION_DEVICE", "cuda")
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("generate_baseline")
    assert "holds images from other inputs; starting afresh" in caplog.text
    assert read_json(p.typed().paths.generated_baseline + "/generation_config.json")["dtype"] == "torch.float32"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_as_one_over_nccl(on_cuda, monkeypatch):
    """train.processes: 2 under accelerate launch: NCCL, each process on its own GPU (LOCAL_RANK,
    with FASHION_DEVICE=cuda too), one writer; the loss curve follows the one-GPU run's."""
    p = on_cuda
    p.run("train_lora", train__max_steps=6)
    one = read_history(p.path("train_log"))
    p.run("train_lora", train__processes=2)
    two = read_history(p.path("train_log"))
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=0.05)

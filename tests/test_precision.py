"""The GPU's precision paths, run on the CPU: fp16 autocast with a GradScaler (a T4's path),
bf16 (Ampere and newer, and AMD), and fused AdamW. In recent torch all three exist on the CPU,
so CI runs the code a user's first GPU run will, with the same checks as tests/test_cuda.py.
What the CPU cannot take is CUDA graphs (train.compile: reduce-overhead needs CUDA streams; the
CPU tests trace with aot_eager, which drops the mode) and NCCL: `make gpu-check` covers those.

Every test here asserts that the precision it asked for is the one that ran (frozen weights and
activations in that dtype, the scaler on or off): none may pass by silently falling back to fp32.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from stages.common import dataset, training
from stages.common.io import read_json
from stages.common.dataset import LORA_WEIGHTS

CPU = torch.device("cpu")


def trainer(p, dtype, **overrides):
    """train-lora's Trainer and its samples on the CPU, at `dtype`, from the project's params."""
    params = p.typed()
    cfg = dataclasses.replace(params.train, **overrides)
    t = training.Trainer(params.paths, cfg, dtype, CPU)
    images, prompts = dataset.load_train_set(params.paths.train_data)
    edges = (params.canny.low_threshold, params.canny.high_threshold) if cfg.controlnet else None
    samples = training.TrainSamples(images, prompts, t.m.tokenizer, cfg.random_flip, cfg.seed,
                                    t.latent_shape(images.shape[1]), t.m.noise_scheduler.config.num_train_timesteps,
                                    edges)
    return t, samples, t.loader(samples, 0, cfg.max_steps)


def activation_dtypes(module: torch.nn.Module) -> set:
    """The dtypes every Linear and Conv2d of `module` computes in, recorded by forward hooks."""
    seen = set()
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            layer.register_forward_hook(lambda _, __, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_step_runs_in_the_precision_asked_for(extracted, dtype):
    """Frozen weights in `dtype`, the LoRA in fp32, every UNet and ControlNet layer computing in
    `dtype` under autocast, AdamW fused, the GradScaler on for fp16 only: and the step learns."""
    t, samples, batches = trainer(extracted, dtype, max_steps=2, warmup_steps=0)
    assert {q.dtype for q in t.m.unet.parameters() if not q.requires_grad} == {dtype}
    assert {q.dtype for q in t.lora_params} == {torch.float32}
    assert t.optimizer.defaults["fused"] is True
    assert t.scaler.is_enabled() == (dtype == torch.float16)
    unet, controlnet = activation_dtypes(t.m.unet), activation_dtypes(t.m.controlnet)
    before = [q.detach().clone() for q in t.lora_params]
    rows = training.read_rows([t.step(0, batches, samples)])
    assert unet == {dtype} and controlnet == {dtype}, (unet, controlnet)
    assert all(torch.isfinite(q).all() for q in t.lora_params)
    assert any(not torch.equal(a, q) for a, q in zip(before, t.lora_params)), "the step updated the LoRA"
    assert 0 < rows[0]["loss"] < 10 and rows[0]["grad_norm"] > 0


def test_an_overflowing_fp16_step_is_skipped_and_lowers_the_scale(extracted):
    """One inf gradient (as fp16 overflow gives): the fused AdamW step is skipped (the LoRA, and
    the schedule, do not move), the loss scale halves, and the next step trains as usual."""
    t, samples, batches = trainer(extracted, torch.float16, max_steps=3, warmup_steps=0)
    scale = t.scaler.get_scale()
    before = [q.detach().clone() for q in t.lora_params]
    hook = t.lora_params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    row = training.read_rows([t.step(0, batches, samples)])[0]
    hook.remove()
    assert row["grad_norm"] == float("inf")
    assert all(torch.equal(a, q) for a, q in zip(before, t.lora_params)), "the overflowing step was skipped"
    assert t.scaler.get_scale() == scale * t.scaler.get_backoff_factor()
    assert t.lr_scheduler.last_epoch == 0, "no schedule step for a skipped update"
    t.step(1, batches, samples)
    assert any(not torch.equal(a, q) for a, q in zip(before, t.lora_params)), "the next step trains"
    assert all(torch.isfinite(q).all() for q in t.lora_params)
    assert t.scaler.get_scale() == scale * t.scaler.get_backoff_factor() and t.lr_scheduler.last_epoch == 1


@pytest.mark.parametrize("precision, dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")])
def test_train_lora_in_a_gpus_precision(extracted, precision, dtype):
    """What tests/test_cuda.py asserts of a GPU run, on the CPU: the dtype in training_config.json,
    finite fp32 LoRA weights, and a run that learns (the LoRA lowers the fixed samples' loss)."""
    p = extracted
    p.run("train_lora", train__mixed_precision=precision, train__max_steps=6, train__learning_rate=1e-2)
    assert read_json(p.path("lora") / "training_config.json")["dtype"] == dtype
    weights = load_file(p.path("lora") / LORA_WEIGHTS)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora.up.weight"))
    summary = read_json(p.path("train_summary"))
    assert summary["denoising_loss_lora"] < summary["denoising_loss_base"], summary

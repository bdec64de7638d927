"""Device, precision and seeding, chosen in one place."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from stages.common.cli import log
from stages.common.errors import StageError


def device() -> torch.device:
    """CUDA when there is one; FASHION_DEVICE=cpu forces the CPU."""
    wanted = os.environ.get("FASHION_DEVICE", "auto")
    if wanted == "auto":  # under accelerate launch, process k of a machine takes its GPU k
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        dev = torch.device(wanted)
    except RuntimeError:
        raise StageError(f"FASHION_DEVICE={wanted!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise StageError(f"FASHION_DEVICE={wanted}, but torch sees {torch.cuda.device_count()} CUDA devices; "
                         "unset it (auto) or install a CUDA build of torch")
    return dev


def training_dtype(mixed_precision: str, dev: torch.device) -> torch.dtype:
    """Dtype of the frozen weights and of autocast. The LoRA weights themselves stay fp32."""
    if mixed_precision == "auto":
        if dev.type != "cuda":
            return torch.float32
        # T4s (Kaggle, sm_75) have no bf16 units: fp16 with a GradScaler there. Not
        # is_bf16_supported(), which also says yes for (slow) emulated bf16.
        return torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
    if mixed_precision != "no" and dev.type != "cuda":
        raise StageError(f"train.mixed_precision: {mixed_precision} needs a CUDA device; set it to 'auto' or 'no'")
    if mixed_precision == "bf16" and torch.cuda.get_device_capability(dev)[0] < 8:
        log.warning("train.mixed_precision: bf16 is emulated (slowly) on this GPU; 'auto' picks fp16 here")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def inference_dtype(precision: str, dev: torch.device) -> torch.dtype:
    """fp16 on CUDA by default (the seed recipe); CPU kernels want fp32."""
    if precision == "auto":
        return torch.float16 if dev.type == "cuda" else torch.float32
    if precision != "fp32" and dev.type != "cuda":
        raise StageError(f"generate.precision: {precision} needs a CUDA device; set it to 'auto' or 'fp32'")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs: cuDNN allows them by default, which
    moves metric backbones' outputs by about 1e-3. Off, GPU and CPU agree to float32 precision.
    The long-standing flags, not torch 2.9's `fp32_precision`: once that is set, reading these
    (as libraries still do) raises."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(dev: torch.device) -> str:
    """', peak GPU memory 12.3 GB' for a stage's closing log line; empty on the CPU."""
    if dev.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(dev) / 1e9:.1f} GB"


def compile_module(module: torch.nn.Module, mode: str, paths) -> None:
    """torch.compile in place (state-dict keys unchanged) with `mode` (train.compile, generate.compile).
    Compiled kernels persist beside the resume state, so a rerun does not compile again.
    FASHION_COMPILE_BACKEND=aot_eager traces without inductor's minutes of code generation: the
    CPU tests use it."""
    if mode == "none":
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(paths.resume, "inductor"))
    backend = os.environ.get("FASHION_COMPILE_BACKEND", "inductor")
    module.compile(backend=backend, **({"mode": mode} if backend == "inductor" else {}))

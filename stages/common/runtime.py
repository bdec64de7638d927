"""Device, precision and seeding, chosen in one place."""

from __future__ import annotations

import gc
import os
import random
import re

import numpy as np
import torch

from stages.common.cli import log
from stages.common.errors import StageError


def device() -> torch.device:
    """CUDA when there is one (ROCm's torch answers to "cuda" too); FASHION_DEVICE=cpu forces the
    CPU. Under several processes (accelerate launch) process k of a machine takes GPU LOCAL_RANK,
    whatever index FASHION_DEVICE names: an indexless "cuda" would fail init_process_group, and
    "cuda:N" would bind every process to the same GPU."""
    wanted = os.environ.get("FASHION_DEVICE", "auto")
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1
    local = int(os.environ.get("LOCAL_RANK", 0))
    if wanted == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(wanted)
    except RuntimeError:
        raise StageError(f"FASHION_DEVICE={wanted!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        dev = torch.device("cuda", local if several else dev.index or 0)
        if not torch.cuda.is_available() or dev.index >= torch.cuda.device_count():
            raise StageError(f"FASHION_DEVICE={wanted}{f' (process {local} of this machine)' if several else ''}, "
                             f"but torch sees {torch.cuda.device_count()} CUDA devices; unset it (auto), start fewer "
                             "processes or install a CUDA (or ROCm) build of torch")
    return dev


# AMD archs with bf16 matrix units: MI100 (gfx908), MI200 (gfx90a), MI300 (gfx94x), MI350 (gfx95x),
# RDNA3 and RDNA4 (gfx11xx, gfx12xx). MI50 (gfx906) and RDNA2 (gfx103x) emulate it.
ROCM_BF16 = re.compile(r"gfx(908|90a|94[0-9]|95[0-9]|11[0-9]{2}|12[0-9]{2})")


def has_bf16(dev: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively. NVIDIA: from Ampere (sm_80) on; not
    is_bf16_supported(), which also says yes for a T4's slow emulation. ROCm: by the gfx arch
    name, since torch.cuda.is_bf16_supported() says yes for every AMD GPU without asking it, and a
    ROCm device's "capability" is its gfx number, not NVIDIA's scale."""
    if dev.type != "cuda":
        return False
    if torch.version.hip:
        return bool(ROCM_BF16.match(getattr(torch.cuda.get_device_properties(dev), "gcnArchName", "")))
    return torch.cuda.get_device_capability(dev)[0] >= 8


def training_dtype(mixed_precision: str, dev: torch.device) -> torch.dtype:
    """Dtype of the frozen weights and of autocast. The LoRA weights themselves stay fp32.
    fp16 and bf16 run on a CPU too, slower than fp32 there: they exercise a GPU's precision path
    (autocast, the GradScaler's skipped steps) where there is no GPU, as the tests do."""
    if mixed_precision == "auto":
        if dev.type != "cuda":
            return torch.float32
        return torch.bfloat16 if has_bf16(dev) else torch.float16  # T4s (Kaggle, sm_75): fp16 + GradScaler
    if mixed_precision != "no" and dev.type != "cuda":
        log.warning("train.mixed_precision: %s on the CPU runs a GPU's precision path, more slowly than fp32; "
                    "'auto' picks fp32 here", mixed_precision)
    elif mixed_precision == "bf16" and not has_bf16(dev):
        log.warning("train.mixed_precision: bf16 is emulated (slowly) on this GPU; 'auto' picks fp16 here")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def inference_dtype(precision: str, dev: torch.device) -> torch.dtype:
    """fp16 on CUDA by default (the seed recipe); fp32 on the CPU, whose kernels are fastest in it
    (fp16 and bf16 run there too, as a GPU's path, more slowly)."""
    if precision == "auto":
        return torch.float16 if dev.type == "cuda" else torch.float32
    if precision != "fp32" and dev.type != "cuda":
        log.warning("generate.precision: %s on the CPU runs a GPU's precision path, more slowly than fp32",
                    precision)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def fused_adamw(dev: torch.device) -> bool:
    """AdamW's one-kernel update for all LoRA tensors: the same math (to float rounding), and under
    fp16 the GradScaler hands it the inf check, so skipping a step needs no sync with the GPU.
    torch has the kernel for CUDA (ROCm included) and the CPU."""
    return dev.type in ("cuda", "cpu")


def is_oom(err: BaseException) -> bool:
    """Out of GPU memory, in any of the forms torch raises: its own OutOfMemoryError, and cuBLAS's
    or cuDNN's failed workspace allocations, which arrive as plain RuntimeErrors."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in (
        "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "HIPBLAS_STATUS_ALLOC_FAILED",
        "MIOPEN_STATUS_ALLOC_FAILED"))


def free_cached_memory(dev: torch.device) -> None:
    """Give the caching allocator's free blocks back, once the failed batch's tensors are gone:
    called after the `except` block that caught an OOM ends, since the traceback held them."""
    gc.collect()  # reference cycles through frames of the traceback
    if dev.type == "cuda":
        torch.cuda.empty_cache()


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
    """torch.compile in place (state-dict keys unchanged) with `mode` (train.compile). For a
    module a diffusers pipeline calls, use `compiled` instead. Compiled kernels persist beside the
    resume state, so a rerun does not compile again. FASHION_COMPILE_BACKEND=aot_eager traces
    without inductor's minutes of code generation: the CPU tests use it."""
    if mode != "none":
        module.compile(**_compile_options(mode, paths))


def compiled(module: torch.nn.Module, mode: str, paths) -> torch.nn.Module:
    """`module` wrapped by torch.compile (generate.compile), or itself for "none". A wrapper, not
    in place: diffusers' pipelines recognise only a wrapped module as compiled, and only then mark
    each denoising step's start for CUDA graphs; without the mark, reduce-overhead's UNet replay
    overwrites the ControlNet residuals it is reading (pytorch#160281)."""
    return module if mode == "none" else torch.compile(module, **_compile_options(mode, paths))


def _compile_options(mode: str, paths) -> dict:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(paths.resume, "inductor"))
    backend = os.environ.get("FASHION_COMPILE_BACKEND", "inductor")
    return {"backend": backend, **({"mode": mode} if backend == "inductor" else {})}


def uses_cuda_graphs(mode: str) -> bool:
    """Whether `mode` replays CUDA graphs, whose outputs live in a pool the next replay reuses."""
    return mode == "reduce-overhead" and os.environ.get("FASHION_COMPILE_BACKEND", "inductor") == "inductor"

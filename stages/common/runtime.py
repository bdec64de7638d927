"""Device, precision, seeding and logging: how a stage runs, chosen in one place."""

from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch

from stages.common.errors import StageError

log = logging.getLogger("stages")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    # Everything loads from local folders; make any accidental hub access fail fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def device() -> torch.device:
    """CUDA when there is one; FASHION_DEVICE=cpu forces the CPU."""
    wanted = os.environ.get("FASHION_DEVICE", "auto")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def training_dtype(mixed_precision: str, dev: torch.device) -> torch.dtype:
    """Dtype of the frozen weights and of autocast. The LoRA weights themselves stay fp32."""
    if mixed_precision == "auto":
        if dev.type != "cuda":
            return torch.float32
        # T4s (Kaggle) have no bf16: fp16 with a GradScaler there.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision != "no" and dev.type != "cuda":
        raise StageError(f"train.mixed_precision: {mixed_precision} needs a CUDA device; set it to 'auto' or 'no'")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def inference_dtype(precision: str, dev: torch.device) -> torch.dtype:
    """fp16 on CUDA by default (the seed recipe); CPU kernels want fp32."""
    if precision == "auto":
        return torch.float16 if dev.type == "cuda" else torch.float32
    if precision != "fp32" and dev.type != "cuda":
        raise StageError(f"generate.precision: {precision} needs a CUDA device; set it to 'auto' or 'fp32'")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

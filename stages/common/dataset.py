"""The on-disk layout inside the stage folders, and its readers. File names inside the stage
folders are written here and nowhere else (the folders themselves are `paths:` in params.yaml).

    <train_data>/images.npy         uint8 (N, H, W, 3), memory-mapped by training
    <train_data>/captions.json      {"prompts": [...], "product_ids": [...], "rows": [...]}
    <eval_data>/gt/000000.png       ground truth, one per eval product
    <eval_data>/eval_configs.json   [{"index", "image", "prompt", "product_id", "row", ...}]
    <edges>/000000.png              canny edges of gt/000000.png
    <generated_baseline>/000000.png, <generated_lora>/000000.png
                                    000000_1.png, ...: the further images of a condition
                                    (generate.images_per_condition)
    <generated_*>/generation_config.json   the generate params that drew them
    <lora>/pytorch_lora_weights.safetensors, fashion_lora_kohya.safetensors, training_config.json
    <lora>/README.md, samples.png      the model card and the image it shows
    <eval_models>/backbones.json    names of the metric backbones, reported beside every number
    <eval_models>/inception/inception-2015-12-05.pt   clean-fid's Inception (TorchScript)
    <eval_models>/lpips/alexnet.pth  torchvision AlexNet state dict, the LPIPS backbone
    <eval_models>/clip/             transformers CLIP folder for the CLIP score
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.common.errors import StageError, restore_hint
from stages.common.io import index_name, read_json

TRAIN_IMAGES = "images.npy"
TRAIN_CAPTIONS = "captions.json"
EVAL_CONFIGS = "eval_configs.json"
GENERATION_CONFIG = "generation_config.json"  # in each generated folder: how its images were drawn
# The LoRA folder (paths.lora): train-lora's weights (diffusers' name) and config, model-card's card and its image.
# The kohya copy's name lives with its format, in lora_formats.py.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CONFIG = "training_config.json"
CARD_FILE = "README.md"   # the hub reads a repo's card from this name
CARD_IMAGE = "samples.png"
GT_DIR = "gt"
VARIANTS = ("baseline", "lora")
BACKBONES_FILE = "backbones.json"
# How backbones.json names the demo's random metric networks: their numbers show the code runs,
# never which variant is better, so the report gives them no verdict.
STAND_IN = "tiny-random-"
INCEPTION_FILE = "inception/inception-2015-12-05.pt"  # clean-fid loads it by this name from its folder
ALEXNET_FILE = "lpips/alexnet.pth"
CLIP_DIR = "clip"
TOKENIZER_DIR = "tokenizer"  # inside <base_model>, as in every diffusers SD folder


def load_train_set(train_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """Training images (memory-mapped, never read whole) and their prompts."""
    train_dir = Path(train_dir)
    images_path = train_dir / TRAIN_IMAGES
    if not images_path.is_file():
        raise StageError(f"{images_path}: not found; run `dvc repro extract` first")
    captions_path = train_dir / TRAIN_CAPTIONS
    if not captions_path.is_file():
        raise StageError(f"{captions_path}: not found; rerun `dvc repro extract`")
    try:
        images = np.load(images_path, mmap_mode="r")
    except (ValueError, OSError) as err:  # a truncated or foreign file
        raise StageError(f"{images_path}: not a readable .npy ({err}); {restore_hint('extract')}") from None
    if images.ndim != 4 or images.dtype != np.uint8:
        raise StageError(f"{images_path}: {images.dtype} of shape {images.shape}, expected uint8 (N, H, W, 3); "
                         f"{restore_hint('extract')}")
    prompts = read_json(captions_path)["prompts"]
    if len(prompts) != len(images):
        raise StageError(f"{train_dir}: {len(images)} images but {len(prompts)} prompts; rerun `dvc repro extract`")
    return images, prompts


def load_eval_configs(eval_dir: str | Path) -> list[dict]:
    path = Path(eval_dir) / EVAL_CONFIGS
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro extract` first")
    return read_json(path)


def gt_path(eval_dir: str | Path, index: int) -> Path:
    return Path(eval_dir) / GT_DIR / index_name(index)


def edge_path(edges_dir: str | Path, index: int) -> Path:
    return Path(edges_dir) / index_name(index)


def resume_dir(paths, stage: str) -> Path:
    """Where `stage` keeps what a killed run already finished (checkpoints, images): outside its
    DVC outputs, so DVC's run-cache works, and removed once the stage succeeds."""
    return Path(paths.resume) / stage


def generated_dir(paths, variant: str) -> Path:
    """`paths.generated_baseline` or `paths.generated_lora`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return Path(getattr(paths, f"generated_{variant}"))


def generated_name(index: int, copy: int = 0) -> str:
    """Image `copy` of eval condition `index`: 000042.png for the first, 000042_1.png for the next,
    so a run of one image per condition is named as it always was."""
    return index_name(index) if copy == 0 else index_name(index, f"_{copy}.png")


def generated_path(paths, variant: str, index: int, copy: int = 0) -> Path:
    return generated_dir(paths, variant) / generated_name(index, copy)

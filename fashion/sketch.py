"""New inputs through the generate stages' own code: `fashion-generate` and the studio share it.

An uploaded photo or sketch becomes a ControlNet edge map at the model's resolution, and one
pipeline (the LoRA loaded, switched off for the baseline) draws baseline and LoRA for the same
seeds, seed k exactly as generate-baseline and generate-lora draw it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from stages.common.errors import StageError
from stages.common.edges import canny
from stages.common.generation import draw
from stages.common.models import load_controlnet_pipeline
from stages.common.runtime import inference_dtype

MAX_PIXELS = 50 * 10 ** 6  # a 50-megapixel photo is a large one; PIL's own bomb check starts at 89


class Note(NamedTuple):
    """What was done to an input, for the log or the page: 'photo.jpg' + text."""
    level: int
    text: str


def read_image(source, name) -> np.ndarray:
    """RGB, upright (a phone photo's EXIF orientation applied), transparency on white. `source` is a
    path or a file object (the studio's uploads); `name` is what an error calls it."""
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:  # checked on the header, before decoding
                raise StageError(f"{name}: {img.width}x{img.height} is more than {MAX_PIXELS // 10 ** 6} megapixels; "
                                 "give a smaller image (it is resized to the model's resolution anyway)")
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                page = Image.new("RGBA", img.size, "white")
                img = Image.alpha_composite(page, img)
            return np.array(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        # PIL repeats what it was given: a path in quotes, or an upload's "<_io.BytesIO object at 0x...>"
        reason = re.sub(r" (<_io\.BytesIO object at 0x[0-9a-f]+>|'[^']*')$", "", str(err))
        raise StageError(f"{name}: not a readable image ({reason}); give a PNG or JPEG photo or sketch") from None


def edge_map(image: np.ndarray, resolution: int, sketch: bool, low: int, high: int,
             threshold_hint: str = "lower the canny thresholds") -> tuple[Image.Image, list[Note]]:
    """The ControlNet condition at the model's resolution, from a photo (canny) or a sketch, and
    notes on what was done to the input (each to follow the input's name)."""
    notes = []
    height, width = image.shape[:2]
    if (width, height) != (resolution, resolution):
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        image = np.array(Image.fromarray(image[top:top + side, left:left + side]).resize(
            (resolution, resolution), Image.Resampling.LANCZOS))
        notes.append(Note(logging.INFO, f"is {width}x{height}; "
                          f"{'resized' if width == height else 'centre-cropped and resized'} "
                          f"to the model's {resolution}x{resolution}"))
    if sketch:
        gray = image.mean(axis=-1)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if np.median(border) > 127:  # a light page with dark lines: the ControlNet wants white edges on black
            notes.append(Note(logging.INFO, "has a light background; inverted to white edges on black"))
            gray = 255 - gray
        edges = np.stack([gray.astype(np.uint8)] * 3, axis=-1)
    else:
        edges = canny(image, low, high)
    if (edges > 127).mean() < 0.002:
        notes.append(Note(logging.WARNING, "gives a nearly empty edge map; "
                          + ("is it a line drawing?" if sketch else threshold_hint)))
    return Image.fromarray(edges), notes


class ModelsMissing(StageError):
    """models/ is not there yet: the studio answers 503 to it, and the page says what to run."""


def check_models(paths) -> None:
    for folder in (paths.base_model, paths.controlnet, paths.lora):
        if not Path(folder).is_dir():
            raise ModelsMissing(f"{folder}: not found; run `make demo` (tiny models) or `dvc pull` first")


def load_pipeline(paths, cfg, scheduler: str, dev):
    """The ControlNet pipeline with the LoRA loaded; `draw_pair` switches it off for the baseline."""
    check_models(paths)
    return load_controlnet_pipeline(paths.base_model, paths.controlnet, scheduler,
                                    inference_dtype(cfg.precision, dev), dev, lora=paths.lora)


def draw_pair(pipe, edges: Image.Image, prompt: str, seeds: list[int], cfg, dev,
              lora_scale: float) -> tuple[list[Image.Image], list[Image.Image]]:
    """Baseline and LoRA images of one edge map and prompt, one per seed, seed k as in the stages."""
    baseline, lora = [], []
    for start in range(0, len(seeds), cfg.batch_size):  # generate.batch_size images per call, as the stages
        batch = seeds[start:start + cfg.batch_size]
        inputs = ([edges] * len(batch), [prompt] * len(batch), batch)
        pipe.unet.disable_lora()  # the baseline: the same pipeline without the LoRA
        baseline += draw(pipe, *inputs, cfg, dev)
        pipe.unet.enable_lora()
        lora += draw(pipe, *inputs, cfg, dev, lora_scale)
    return baseline, lora


def side_by_side(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (c * width, r * height))
    return sheet

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
from PIL import ExifTags, Image, ImageFilter, ImageOps

from stages.common.errors import StageError
from stages.common.edges import canny
from stages.common.generation import draw
from stages.common.io import IMAGE_FORMATS
from stages.common.models import load_controlnet_pipeline
from stages.common.runtime import inference_dtype

# Pixels decoded per input, at most. The model reads `extract.resolution` (512) px a side, so 25 MP
# (5000x5000, an A4 page at 300 dpi twice over, a 6K screenshot) is plenty; a decode peaks at 5
# (RGB) to 9 (RGBA) bytes a pixel, 0.1-0.2 GB at 25 MP. JPEGs (phone photos, 48 MP and more) are
# decoded at 1/2, 1/4 or 1/8 of their size (libjpeg's DCT scaling) when that still covers the
# model's resolution, and this counts the pixels so decoded.
MAX_PIXELS = 25 * 10 ** 6
_SHOWN = [f.replace("WEBP", "WebP") for f in IMAGE_FORMATS]
ACCEPTED = f"{', '.join(_SHOWN[:-1])} or {_SHOWN[-1]}"  # IMAGE_FORMATS as an error names them: PNG, JPEG or WebP


class Note(NamedTuple):
    """What was done to an input, for the log or the page: 'photo.jpg' + text."""
    level: int
    text: str


def light_page(gray: np.ndarray) -> bool:
    """A sketch drawn dark on a light page (its border mostly light), rather than light on dark."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return bool(np.median(border) > 127)


def shrink_lines(img: Image.Image, resolution: int) -> Image.Image:
    """A square line drawing shrunk to `resolution` without losing its lines. Resampled as a photo,
    a 1-px line at 8x shrinks to a grey haze (a 512-px sketch gave a map of median 10, max 199);
    so each line is first widened to the shrink factor (dark lines grow on a light page, light
    ones on a dark page), then pixels are averaged, and a line still covers most of a pixel."""
    gray = img.convert("L")
    width = int(np.ceil(img.width / resolution)) | 1  # PIL's rank filters take odd sizes
    if width > 1:
        grow = ImageFilter.MinFilter if light_page(np.asarray(gray)) else ImageFilter.MaxFilter
        gray = gray.filter(grow(width))
    return gray.resize((resolution, resolution), Image.Resampling.BOX)


def read_image(source, name, resolution: int, sketch: bool = False) -> tuple[np.ndarray, list[Note]]:
    """The input as the model reads it: RGB, upright (a phone photo's EXIF orientation applied),
    transparency on white, centre-cropped to a square and resized to `resolution` (a `sketch` so
    that its lines survive: shrink_lines), and notes on what was done (each to follow the input's
    name). `source` is a path or a file object (the studio's uploads); `name` is what an error
    calls it. Only IMAGE_FORMATS are decoded: PIL's other decoders never see an input, whatever
    its name."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as img:
            width, height = img.size  # as given, before a JPEG's reduced decode
            img.draft(None, (resolution, resolution))  # JPEG only; a no-op for the others
            if img.width * img.height > MAX_PIXELS:  # checked on the header, before decoding
                raise StageError(f"{name}: {width}x{height} is more than {MAX_PIXELS // 10 ** 6} megapixels; "
                                 f"give a smaller image (it is resized to the model's {resolution}x{resolution} "
                                 "anyway)")
            if img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # turned by 90 degrees (any other value: as is)
                width, height = height, width
            ImageOps.exif_transpose(img, in_place=True)
            # Cropped and resized before anything else at full size: the white page goes under a
            # transparent image after (PIL resizes RGBA premultiplied, so the same pixels), and an L
            # image becomes RGB after.
            alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            mode = "RGBA" if alpha else "L" if img.mode == "L" else "RGB"
            if img.mode != mode:
                img = img.convert(mode)
            notes = []
            if sketch and img.mode == "RGBA":  # the page under the lines before they are widened
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")
            if img.size != (resolution, resolution) or (width, height) != (resolution, resolution):
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                box = (left, top, left + side, top + side)
                img = (shrink_lines(img.crop(box), resolution) if sketch else
                       img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box))
                notes.append(Note(logging.INFO, f"is {width}x{height}; "
                                  f"{'resized' if width == height else 'centre-cropped and resized'} "
                                  f"to the model's {resolution}x{resolution}"))
            if img.mode == "RGBA":
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
            return np.array(img.convert("RGB")), notes
    except Image.DecompressionBombError:  # raised by Image.open itself, on the header
        raise StageError(f"{name}: more than {Image.MAX_IMAGE_PIXELS * 2 // 10 ** 6} megapixels; give a smaller "
                         f"image (it is resized to the model's {resolution}x{resolution} anyway)") from None
    except (OSError, ValueError, SyntaxError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        # PIL repeats what it was given: a path in quotes, or an upload's "<_io.BytesIO object at 0x...>"
        reason = re.sub(r" (<_io\.BytesIO object at 0x[0-9a-f]+>|'[^']*')$", "", str(err))
        raise StageError(f"{name}: not a readable image ({reason}); give a {ACCEPTED} photo or sketch "
                         "(no other format is read)") from None


def edge_map(image: np.ndarray, sketch: bool, low: int, high: int,
             threshold_hint: str = "lower the canny thresholds") -> tuple[Image.Image, list[Note]]:
    """The ControlNet condition from `read_image`'s photo (canny) or sketch, and notes on what was
    done (each to follow the input's name)."""
    notes = []
    if sketch:
        gray = image.mean(axis=-1)
        if light_page(gray):  # a light page with dark lines: the ControlNet wants white edges on black
            notes.append(Note(logging.INFO, "has a light background; inverted to white edges on black"))
            gray = 255 - gray
        # 0/255 lines, as canny gave the ControlNet in training; not a grey haze
        edges = np.stack([np.where(gray > 127, 255, 0).astype(np.uint8)] * 3, axis=-1)
    else:
        edges = canny(image, low, high)
    if (edges > 127).mean() < 0.002:
        faint = sketch and ((gray > 32) & (gray <= 127)).mean() >= 0.002
        notes.append(Note(logging.WARNING, "gives a nearly empty edge map; " + (
            "its lines are too faint to keep (lighter than mid-grey): draw them darker" if faint else
            "is it a line drawing?" if sketch else threshold_hint)))
    return Image.fromarray(edges), notes


class ModelsMissing(StageError):
    """models/ is not there yet: the studio answers 503 to it, and the page says what to run."""


def check_models(paths) -> None:
    for folder in (paths.base_model, paths.controlnet, paths.lora):
        if not Path(folder).is_dir():
            raise ModelsMissing(f"{folder}: not found; run `make demo` (tiny models) or `dvc pull` first")


def prompt_notes(prompt: str, tokenizer) -> list[Note]:
    """The pipeline's CLIP text encoder reads 77 tokens (BOS and EOS included) and drops the rest
    without a word: say so, and what is dropped."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # verbose: no warning of its own
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return []
    dropped = tokenizer.decode(ids[limit - 1:-1]).strip()
    shown = dropped if len(dropped) <= 60 else dropped[:57] + "..."
    return [Note(logging.WARNING, f"is {len(ids) - 2} tokens, but CLIP reads the first {limit - 2}: the rest "
                                  f"({shown!r}) is ignored; shorten the prompt")]


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
        pipe.disable_lora()  # the baseline: the same pipeline without the LoRA (the text encoder's too)
        baseline += draw(pipe, *inputs, cfg, dev)
        pipe.enable_lora()
        lora += draw(pipe, *inputs, cfg, dev, lora_scale)
    return baseline, lora


COLUMNS = ("edges", "baseline", "LoRA")  # the side-by-side's columns, as its header names them
TILE = 256  # px a side at least: the model's 64 px, upscaled for viewing (nearest: no pixel invented)
LEFT, TOP = 88, 56  # the seed labels' column; the prompt's line and the column titles above the tiles


def sheet_size(rows: int, resolution: int) -> tuple[int, int]:
    """(width, height) of side_by_side's sheet for `rows` seeds of `resolution`-px images."""
    tile = max(TILE, resolution)
    return LEFT + len(COLUMNS) * tile, TOP + rows * tile


def side_by_side(rows: list[list[Image.Image]], seeds: list[int], prompt: str) -> Image.Image:
    """One row per seed, edges | baseline | LoRA, each tile at least TILE px, with the column
    titles, each row's seed and the prompt written on it: a file that explains itself."""
    from PIL import ImageDraw, ImageFont

    resolution = rows[0][0].width
    tile = max(TILE, resolution)
    sheet = Image.new("RGB", sheet_size(len(rows), resolution), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    shown = prompt if len(prompt) <= 110 else prompt[:109] + "…"
    draw.text((8, 6), f"prompt: {shown}", fill="black", font=font)
    for c, title in enumerate(COLUMNS):
        draw.text((LEFT + c * tile + tile // 2, TOP - 8), title, fill="black", font=font, anchor="ms")
    for r, (row, seed) in enumerate(zip(rows, seeds, strict=True)):
        draw.text((8, TOP + r * tile + tile // 2), f"seed {seed}", fill="black", font=font, anchor="lm")
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST),
                        (LEFT + c * tile, TOP + r * tile))
    return sheet

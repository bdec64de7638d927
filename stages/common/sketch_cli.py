"""fashion-generate: baseline and LoRA side by side for a new photo or edge sketch.

    fashion-generate photo.jpg --prompt "Long sleeve dress in red" --seeds 0 1 2
    fashion-generate sketch.png --sketch --prompt "Mini skirt in navy" --count 4 --lora-scale 0.8

A photo gets canny edges (`--low`/`--high`, default params.yaml's `canny`); `--sketch` uses the
image as the edge map itself (dark lines on a light page are inverted to the ControlNet's white on
black). The input is resized to the model's resolution (`extract.resolution`, centre-cropped to a
square) and the command says so. Knobs default to params.yaml's `generate` section. It reads the
pipeline's models/ offline (the demo's tiny models or real ones) and draws with the generate
stages' own code, so seed k here is seed k there. Writes to `--out`:
<name>-edges.png, <name>-seed<k>-baseline.png, <name>-seed<k>-lora.png and <name>-side-by-side.png
(one row per seed: edges | baseline | LoRA).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.edges import canny
from stages.common.generation import draw
from stages.common.io import save_png
from stages.common.models import SCHEDULERS, load_controlnet_pipeline
from stages.common.params import load_params
from stages.common.runtime import device, inference_dtype


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 1, as every command of the project
        raise StageError(f"fashion-generate: {message}; see fashion-generate --help")


def parse(argv: list[str], params) -> argparse.Namespace:
    g, c = params.generate, params.canny
    parser = Parser(prog="fashion-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a photo, or with --sketch an edge sketch")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--sketch", action="store_true", help="use the image as the edge map (no canny)")
    parser.add_argument("--low", type=int, default=c.low_threshold, help="canny low threshold (photos)")
    parser.add_argument("--high", type=int, default=c.high_threshold, help="canny high threshold (photos)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one image per seed (default: --seed, --seed+1, ...)")
    parser.add_argument("--seed", type=int, default=g.seed)
    parser.add_argument("--count", type=int, default=1, help="images per variant when --seeds is not given")
    parser.add_argument("--steps", type=int, default=g.steps)
    parser.add_argument("--guidance", type=float, default=g.guidance_scale)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=g.scheduler)
    parser.add_argument("--controlnet-scale", type=float, default=g.controlnet_scale)
    parser.add_argument("--lora-scale", type=float, default=g.lora_scale)
    parser.add_argument("--negative-prompt", default=g.negative_prompt)
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"))
    parser.add_argument("--debug", action="store_true", help="a traceback with any error")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        raise StageError(f"{args.input}: not found; give the path of a photo or sketch (PNG, JPEG, ...)")
    if not args.prompt.strip():
        raise StageError("--prompt: empty; describe the garment, e.g. --prompt 'Long sleeve dress in red'")
    if args.seeds and "--count" in argv:
        raise StageError("--seeds and --count: give one; --seeds draws one image per seed")
    if args.count < 1 or args.steps < 1 or args.guidance < 0:
        raise StageError("--count and --steps: must be at least 1, --guidance at least 0")
    if not 0 <= args.low <= args.high:
        raise StageError(f"--low {args.low} --high {args.high}: need 0 <= low <= high")
    if any(not 0 <= s < 2 ** 63 for s in args.seeds or [args.seed]):
        raise StageError("--seeds / --seed: must be between 0 and 2**63 - 1")
    return args


def read_image(source, name) -> np.ndarray:
    """RGB, upright (a phone photo's EXIF orientation applied), transparency on white. `source` is a
    path or a file object (the studio's uploads); `name` is what an error calls it."""
    try:
        with Image.open(source) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                page = Image.new("RGBA", img.size, "white")
                img = Image.alpha_composite(page, img)
            return np.array(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        raise StageError(f"{name}: not a readable image ({err}); give a PNG or JPEG photo or sketch") from None


def edge_map(image: np.ndarray, resolution: int, sketch: bool, low: int, high: int) -> tuple[Image.Image, list[str]]:
    """The ControlNet condition at the model's resolution, from a photo (canny) or a sketch, and
    notes on what was done to the input (each to follow the input's name)."""
    notes = []
    height, width = image.shape[:2]
    if (width, height) != (resolution, resolution):
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        image = np.array(Image.fromarray(image[top:top + side, left:left + side]).resize(
            (resolution, resolution), Image.Resampling.LANCZOS))
        notes.append(f"is {width}x{height}; {'resized' if width == height else 'centre-cropped and resized'} "
                     f"to the model's {resolution}x{resolution}")
    if sketch:
        gray = image.mean(axis=-1)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if np.median(border) > 127:  # a light page with dark lines: the ControlNet wants white edges on black
            notes.append("has a light background; inverted to white edges on black")
            gray = 255 - gray
        edges = np.stack([gray.astype(np.uint8)] * 3, axis=-1)
    else:
        edges = canny(image, low, high)
    if (edges > 127).mean() < 0.002:
        notes.append("gives a nearly empty edge map; " + ("is it a line drawing?" if sketch else
                                                           "lower the canny thresholds"))
    return Image.fromarray(edges), notes


def check_models(paths) -> None:
    for folder in (paths.base_model, paths.controlnet, paths.lora):
        if not Path(folder).is_dir():
            raise StageError(f"{folder}: not found; run `make demo` (tiny models) or `dvc pull` first")


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


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    params = load_params()
    args = parse(sys.argv[1:] if argv is None else argv, params)
    check_models(params.paths)
    edges, notes = edge_map(read_image(args.input, args.input), params.extract.resolution, args.sketch,
                            args.low, args.high)
    for note in notes:
        level = logging.WARNING if "nearly empty" in note else logging.INFO
        log.log(level, "fashion-generate: %s %s", args.input, note.replace("the canny thresholds", "--low/--high"))
    cfg = dataclasses.replace(params.generate, steps=args.steps, guidance_scale=args.guidance,
                              controlnet_scale=args.controlnet_scale, negative_prompt=args.negative_prompt)
    seeds = args.seeds or [args.seed + k for k in range(args.count)]
    dev = device()
    pipe = load_pipeline(params.paths, cfg, args.scheduler, dev)
    baseline, lora = draw_pair(pipe, edges, args.prompt, seeds, cfg, dev, args.lora_scale)

    name = args.input.stem
    save_png(args.out / f"{name}-edges.png", edges)
    for seed, base_image, lora_image in zip(seeds, baseline, lora, strict=True):
        save_png(args.out / f"{name}-seed{seed}-baseline.png", base_image)
        save_png(args.out / f"{name}-seed{seed}-lora.png", lora_image)
    sheet = args.out / f"{name}-side-by-side.png"
    save_png(sheet, side_by_side([[edges, b, l] for b, l in zip(baseline, lora, strict=True)]))
    log.info("fashion-generate: %d seeds, baseline and LoRA; wrote %s (edges | baseline | LoRA per row)",
             len(seeds), sheet)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

"""fashion-generate: baseline and LoRA side by side for a new photo or edge sketch.

    fashion-generate photo.jpg --prompt "Long sleeve dress in red" --seeds 0 1 2
    fashion-generate sketch.png --sketch --prompt "Mini skirt in navy" --count 4 --lora-scale 0.8

A photo gets canny edges (`--low`/`--high`, default params.yaml's `canny`); `--sketch` uses the
image as the edge map itself (dark lines on a light page are inverted to the ControlNet's white on
black). The input is read only as PNG, JPEG or WebP, whatever its name, and resized to the
model's resolution (`extract.resolution`, centre-cropped to a square), and the command says so
(a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size when that still covers it). Knobs default
to params.yaml's `generate` section. It reads the pipeline's models/ offline (the demo's tiny
models or real ones) and draws with the generate stages' own code, so seed k here is seed k there.
Writes to `--out`:
<name>-edges.png, <name>-seed<k>-baseline.png, <name>-seed<k>-lora.png and <name>-side-by-side.png
(one row per seed: edges | baseline | LoRA).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import fsync, save_png
from stages.common.models import SCHEDULERS
from stages.common.params import load_params
from stages.common.runtime import device
from fashion.sketch import (ACCEPTED, check_models, draw_pair, edge_map, load_pipeline, prompt_notes, read_image,
                           side_by_side)


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
        raise StageError(f"{args.input}: not found; give the path of a {ACCEPTED} photo or sketch")
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


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    params = load_params()
    args = parse(sys.argv[1:] if argv is None else argv, params)
    check_models(params.paths)
    image, notes = read_image(args.input, args.input, params.extract.resolution, args.sketch)
    edges, more = edge_map(image, args.sketch, args.low, args.high, threshold_hint="lower --low/--high")
    for note in notes + more:
        log.log(note.level, "fashion-generate: %s %s", args.input, note.text)
    cfg = dataclasses.replace(params.generate, steps=args.steps, guidance_scale=args.guidance,
                              controlnet_scale=args.controlnet_scale, negative_prompt=args.negative_prompt)
    seeds = args.seeds or [args.seed + k for k in range(args.count)]
    dev = device()
    pipe = load_pipeline(params.paths, cfg, args.scheduler, dev)
    for note in prompt_notes(args.prompt, pipe.tokenizer):
        log.log(note.level, "fashion-generate: --prompt %s", note.text)
    baseline, lora = draw_pair(pipe, edges, args.prompt, seeds, cfg, dev, args.lora_scale)

    name = args.input.stem
    save_png(args.out / f"{name}-edges.png", edges)
    for seed, base_image, lora_image in zip(seeds, baseline, lora, strict=True):
        save_png(args.out / f"{name}-seed{seed}-baseline.png", base_image)
        save_png(args.out / f"{name}-seed{seed}-lora.png", lora_image)
    sheet = args.out / f"{name}-side-by-side.png"
    save_png(sheet, side_by_side([[edges, b, l] for b, l in zip(baseline, lora, strict=True)], seeds, args.prompt))
    fsync(args.out)  # their names on the disk too (save_png flushed each file before naming it)
    log.info("fashion-generate: %d seeds, baseline and LoRA; wrote %s (edges | baseline | LoRA per row)",
             len(seeds), sheet)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

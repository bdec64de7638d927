"""ControlNet generation over the eval set, shared by generate-baseline and generate-lora.

Image i is drawn with its own generator seeded `generate.seed + i`, so it does not depend on
the batch size or on which images were already done. The output folder is a DVC `persist`
output: a rerun after a crash skips the images already written, and a rerun after any input
changed (fingerprint in generation_config.json) starts from an empty folder, but only once the
models and the LoRA have loaded, so a bad model file never costs the previous images.
"""

from __future__ import annotations

import shutil
import time

import torch
from PIL import Image
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import StageError, log, setup_logging
from stages.common.io import (check_images, fingerprint, load_rgb, read_json, remove_temps, save_png, source_files,
                              write_json)
from stages.common.model_layouts import check_folder
from stages.common.models import check_lora, load_controlnet_pipeline
from stages.common.params import load_params, what_keys
from stages.common.runtime import device, inference_dtype, peak_memory

CONFIG_FILE = "generation_config.json"


def previous_fingerprint(config_path) -> str | None:
    """The fingerprint a folder's images were made with; None if unknown (or the file is damaged)."""
    try:
        return read_json(config_path).get("fingerprint") if config_path.is_file() else None
    except StageError:
        return None


def run(variant: str) -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.generate, params.paths
    dev = device()
    dtype = inference_dtype(cfg.precision, dev)
    configs = dataset.load_eval_configs(paths.eval_data)
    out_dir = dataset.generated_dir(paths, variant)

    check_images([dataset.edge_path(paths.edges, c["index"]) for c in configs], "canny-edges")
    check_folder(paths.base_model, "base")
    check_folder(paths.controlnet, "controlnet")
    if variant == "lora":
        check_lora(paths.lora)
    settings = what_keys(cfg)
    # Every input, code included, so a resumed folder never mixes images of old and new inputs.
    inputs = [paths.eval_data, paths.edges, paths.base_model, paths.controlnet, *source_files()]
    if variant == "lora":
        inputs.append(paths.lora)
    else:
        settings.pop("lora_scale")
    expected = fingerprint({**settings, "variant": variant, "dtype": str(dtype)}, *inputs)
    config_path = out_dir / CONFIG_FILE
    resumable = out_dir.exists() and previous_fingerprint(config_path) == expected
    todo = [c for c in configs if not (resumable and dataset.generated_path(paths, variant, c["index"]).exists())]
    if resumable:
        remove_temps(out_dir)  # half-written images of a killed run
    if not todo:
        log.info("generate-%s: all %d images already in %s", variant, len(configs), out_dir)
        return

    # Models and LoRA load (and fail, if they must) before a single old image is touched.
    pipe = load_controlnet_pipeline(paths.base_model, paths.controlnet, cfg.scheduler, dtype, dev,
                                    lora=paths.lora if variant == "lora" else None)
    if out_dir.exists() and not resumable:
        log.info("generate-%s: %s holds images from other inputs; starting afresh", variant, out_dir)
        shutil.rmtree(out_dir)
    write_json(config_path, {"fingerprint": expected, "variant": variant, "generate": settings,
                             "dtype": str(dtype), "images": len(configs)})
    extra = {"cross_attention_kwargs": {"scale": cfg.lora_scale}} if variant == "lora" else {}
    started = time.perf_counter()
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"generate-{variant}", unit="batch"):
        batch = todo[start:start + cfg.batch_size]
        edges = [Image.fromarray(load_rgb(dataset.edge_path(paths.edges, c["index"]))) for c in batch]
        images = pipe(
            prompt=[c["prompt"] for c in batch],
            negative_prompt=[cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None,
            image=edges, height=edges[0].height, width=edges[0].width,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            controlnet_conditioning_scale=cfg.controlnet_scale,
            generator=[torch.Generator(dev).manual_seed(cfg.seed + c["index"]) for c in batch],
            **extra,
        ).images
        for config, image in zip(batch, images, strict=True):
            save_png(dataset.generated_path(paths, variant, config["index"]), image)
    rate = len(todo) / (time.perf_counter() - started)
    log.info("generate-%s: wrote %d images (%.2f images/s, %s %s, %d steps%s) to %s",
             variant, len(todo), rate, dev, dtype, cfg.steps, peak_memory(dev), out_dir)

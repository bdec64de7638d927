"""ControlNet generation over the eval set, shared by generate-baseline and generate-lora.

Image i is drawn with its own generator seeded `generate.seed + i`, so it does not depend on
the batch size or on which images were already done. With `generate.images_per_condition` k > 1,
condition i also gets images 1 .. k-1 (000042_1.png, ...), seeded COPY_SEEDS further apart each. Images are drawn into a resume folder under
`paths.resume` and moved into the output folder whole at the end. A rerun after a crash skips the
images already drawn; a rerun after any input changed (its fingerprint, which hashes the code too,
is resume state: it never enters the output) starts afresh, but only once the models and the LoRA
have loaded. The output's generation_config.json holds only declared inputs. The output is an ordinary
DVC output, so DVC's run-cache restores it for any configuration seen before. With
`generate.processes` above 1 (or under `accelerate launch`) each process draws its share of the
batches, one per GPU, into the same resume folder.
"""

from __future__ import annotations

import os
import shutil
import time

import torch
from PIL import Image
from tqdm import tqdm

from stages.common import dataset, distributed
from stages.common.cli import log, setup_logging
from stages.common.errors import StageError
from stages.common.io import (ImageWriter, atomic_dir, check_images, fingerprint, load_rgb, read_json,
                              remove_temps, source_files, write_json)
from stages.common.model_layouts import check_folder
from stages.common.models import check_lora, load_controlnet_pipeline, lora_components
from stages.common.params import load_params, what_keys
from stages.common.runtime import compiled, device, free_cached_memory, inference_dtype, is_oom, peak_memory

# Copy j of condition i is seeded generate.seed + i + j * COPY_SEEDS: no two images of an eval set
# (FashionGen's validation split has 32,528 products) share a seed, and copy 0 draws what a run of one
# image per condition draws.
COPY_SEEDS = 1_000_000
FINGERPRINT_FILE = "fingerprint.json"  # in resume state: what the images there were made from


def previous_fingerprint(path) -> str | None:
    """The fingerprint in `path`; None if unknown (or the file is damaged)."""
    try:
        return read_json(path).get("fingerprint") if path.is_file() else None
    except StageError:
        return None


def run(variant: str) -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.generate, params.paths
    if distributed.relaunch(cfg.processes, params.launch, f"stages.generate_{variant}", "generate.processes"):
        return  # its processes did the work
    writer, rank, processes = distributed.is_writer(), distributed.rank(), distributed.world_size()
    dev = device()
    distributed.init(dev)
    dtype = inference_dtype(cfg.precision, dev)
    configs = dataset.load_eval_configs(paths.eval_data)
    out_dir = dataset.generated_dir(paths, variant)

    check_images([dataset.edge_path(paths.edges, c["index"]) for c in configs], "canny-edges")
    check_folder(paths.base_model, "base")
    check_folder(paths.controlnet, "controlnet")
    settings = what_keys(cfg)
    # Every input, code included, so a resumed folder never mixes images of old and new inputs. The
    # LoRA's weights file, not its folder: the model card written there later changes no image.
    inputs = [paths.eval_data, paths.edges, paths.base_model, paths.controlnet, *source_files()]
    if variant == "lora":
        inputs.append(check_lora(paths.lora))
    else:
        settings.pop("lora_scale")
    # The device type too: CPU and CUDA generators draw different noise from the same seed, so a
    # folder begun on one must not be finished on the other.
    expected = fingerprint({**settings, "variant": variant, "dtype": str(dtype), "device": dev.type}, *inputs)
    # Images are made in a resume folder outside the DVC output and moved in whole at the end.
    work = dataset.resume_dir(paths, f"generate-{variant}")
    resumable = previous_fingerprint(work / FINGERPRINT_FILE) == expected
    if cfg.images_per_condition > 1 and max((c["index"] for c in configs), default=0) >= COPY_SEEDS:
        raise StageError(f"{paths.eval_data}: eval index {max(c['index'] for c in configs)} >= {COPY_SEEDS:,}, so "
                         "two images would share a seed; evaluate fewer products (extract.eval_products)")
    images = [(c, copy) for c in configs for copy in range(cfg.images_per_condition)]
    todo = [(c, copy) for c, copy in images
            if not (resumable and (work / dataset.generated_name(c["index"], copy)).is_file())]
    if todo:  # models and LoRA load (and fail, if they must) before any earlier work is dropped
        pipe = load_controlnet_pipeline(paths.base_model, paths.controlnet, cfg.scheduler, dtype, dev,
                                        lora=paths.lora if variant == "lora" else None)
        if variant == "lora":
            # One scale for the whole stage: fold the LoRA into the UNet's weights (and the text
            # encoder's, if it has one) once, so every step runs the plain UNet, without two extra
            # matmuls per attention projection. Within 1 level of the unfused LoRA
            # (tests/test_fashion_generate.py draws it unfused).
            pipe.fuse_lora(components=lora_components(pipe), lora_scale=cfg.lora_scale)
        pipe.unet = compiled(pipe.unet, cfg.compile, paths)
        pipe.controlnet = compiled(pipe.controlnet, cfg.compile, paths)
    distributed.barrier()  # every process has read the resume folder before the writer changes it
    if writer:
        if work.exists() and not resumable:
            log.info("generate-%s: %s holds images from other inputs; starting afresh", variant, work)
            shutil.rmtree(work)
        remove_temps(work)  # half-written images of a killed run
        write_json(work / FINGERPRINT_FILE, {"fingerprint": expected})
        write_json(work / dataset.GENERATION_CONFIG, {"variant": variant, "generate": settings, "dtype": str(dtype),
                                        "images": len(images)})
    distributed.barrier()
    # Process r draws every processes-th batch: the same batches as one process draws, so the same
    # images to the bit, and the one writer moves them all into the output.
    batches = [todo[start:start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    mine = [image for batch in batches[rank::processes] for image in batch]
    if mine:
        generate(pipe, mine, cfg, variant, dev, paths, work)
    distributed.barrier()
    if writer:
        with atomic_dir(out_dir) as tmp:
            for done in work.iterdir():  # linked, not moved: if the swap fails, the resume folder is whole
                if done.name == FINGERPRINT_FILE:
                    continue
                try:
                    os.link(done, tmp / done.name)
                except OSError:  # paths.resume on another file system
                    shutil.copy2(done, tmp / done.name)
        shutil.rmtree(work)
        log.info("generate-%s: %d images in %s (%d made now, %d by an earlier run)", variant, len(images),
                 out_dir, len(todo), len(images) - len(todo))
    distributed.finish()


def draw(pipe, edges: list[Image.Image], prompts: list[str], seeds: list[int], cfg, dev,
         lora_scale: float | None = None) -> list[Image.Image]:
    """One pipeline call: image i from edge map i, prompt i and its own generator seeded with
    seeds[i], so an image does not depend on what else is in the batch. `lora_scale` for a
    pipeline with the LoRA loaded; the generate stages and `fashion-generate` both draw here."""
    extra = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale is not None else {}
    return pipe(
        prompt=prompts, negative_prompt=[cfg.negative_prompt] * len(prompts) if cfg.negative_prompt else None,
        image=edges, height=edges[0].height, width=edges[0].width,
        num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
        controlnet_conditioning_scale=cfg.controlnet_scale,
        generator=[torch.Generator(dev).manual_seed(seed) for seed in seeds], **extra,
    ).images


def image_seed(cfg, index: int, copy: int) -> int:
    return cfg.seed + index + copy * COPY_SEEDS


def generate(pipe, todo: list[tuple[dict, int]], cfg, variant: str, dev, paths, work) -> None:
    """Draw `todo` (eval config, copy) in batches, each image with its own seeded generator, into `work`.
    `generate.batch_size` is a ceiling: a batch the GPU cannot hold is halved and drawn again
    (an image does not depend on its batch), so a T4 gets through a preset sized for an H100."""
    started, size, done = time.perf_counter(), cfg.batch_size, 0
    progress = tqdm(total=len(todo), desc=f"generate-{variant}", unit="img", disable=not distributed.is_writer())
    # PNGs are encoded on the writer's threads while the GPU draws the next batch.
    with ImageWriter(in_flight=max(16, 2 * cfg.batch_size)) as writer:  # a whole batch queues without waiting
        while done < len(todo):
            batch = todo[done:done + size]
            maps = {c["index"]: Image.fromarray(load_rgb(dataset.edge_path(paths.edges, c["index"]))) for c, _ in batch}
            images = None
            try:
                images = draw(pipe, [maps[c["index"]] for c, _ in batch], [c["prompt"] for c, _ in batch],
                              [image_seed(cfg, c["index"], copy) for c, copy in batch], cfg, dev)
            except RuntimeError as err:  # torch's OutOfMemoryError, or cuBLAS's and cuDNN's allocation failures
                if not is_oom(err):
                    raise
                if size == 1:
                    raise StageError(f"generate-{variant}: one image does not fit in the GPU's memory; use "
                                     "generate.precision: fp16 or a smaller extract.resolution") from None
            if images is None:  # out of memory. Here, not in `except`: its traceback held the batch's activations
                free_cached_memory(dev)
                size //= 2
                log.warning("generate-%s: a batch of %d does not fit in the GPU's memory; drawing %d at a time",
                            variant, len(batch), size)
                continue
            for (config, copy), image in zip(batch, images, strict=True):
                writer.submit(work / dataset.generated_name(config["index"], copy), image)
            done += len(batch)
            progress.update(len(batch))
    progress.close()
    rate = len(todo) / (time.perf_counter() - started)
    log.info("generate-%s: drew %d images (%.2f images/s, %s %s, %d steps%s)",
             variant, len(todo), rate, dev, pipe.dtype, cfg.steps, peak_memory(dev))

"""Validation while training (`train.validate_every`): what the LoRA does to fixed eval
conditions, at step 0 (the base) and every N steps, logged by stages/common/train_log.py.

- **Images.** The first `train.validation_samples` eval conditions (edge map, prompt, seed
  `train.seed + index`) drawn with the current LoRA through the generate stages' `draw`, under the
  ControlNet whatever `train.controlnet` says, with validation's own sampler settings: UniPC at
  `train.validation_steps` steps, `train.validation_guidance`, ControlNet scale 1, no negative
  prompt. A view of the LoRA's progress, cheaper than generate-lora's images and not the same.
- **A held-out denoising loss.** The first `train.validation_loss_samples` eval images, each with
  its own fixed latent draw and noise and a fixed timestep, the timesteps spread evenly over the
  schedule: only the weights move it between steps, unlike the training loss, whose timesteps are
  drawn anew each step. Under the ControlNet if training is. The latents are encoded once.

Eager even when the models are compiled, and on the writer process alone.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from stages.common import dataset
from stages.common.edges import canny
from stages.common.errors import StageError
from stages.common.generation import draw
from stages.common.io import check_images, load_rgb
from stages.common.train_log import HELDOUT, png
from stages.common.training import denoising_loss, tokenize


def check_counts(cfg, eval_data) -> list[dict]:
    """The eval configs, once the counts fit them: before any training."""
    configs = dataset.load_eval_configs(eval_data)
    for key in ("validation_samples", "validation_loss_samples"):
        if getattr(cfg, key) > len(configs):
            raise StageError(f"params.yaml: train.{key}: {getattr(cfg, key)} is above the eval set's "
                             f"{len(configs)} products ({eval_data}); use at most {len(configs)}")
    return configs


class Validator:
    def __init__(self, m, cfg, canny_cfg, eval_data, resolution: int, latent_shape, dtype, dev):
        self.m, self.cfg, self.dtype, self.dev = m, cfg, dtype, dev
        configs = check_counts(cfg, eval_data)
        n = max(cfg.validation_samples, cfg.validation_loss_samples)
        paths = [dataset.gt_path(eval_data, c["index"]) for c in configs[:n]]
        check_images(paths, "extract", (resolution, resolution))
        gt = [load_rgb(path) for path in paths]
        edges = [canny(image, canny_cfg.low_threshold, canny_cfg.high_threshold) for image in gt]
        # Images
        shown = configs[:cfg.validation_samples]
        self.indices = [c["index"] for c in shown]
        self.conditions = ([Image.fromarray(edges[i]) for i in range(len(shown))], [c["prompt"] for c in shown],
                           [cfg.seed + c["index"] for c in shown])
        self.pipe = StableDiffusionControlNetPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, controlnet=m.controlnet,
            scheduler=UniPCMultistepScheduler.from_config(m.noise_scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.sampler = SimpleNamespace(steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                                       controlnet_scale=1.0, negative_prompt="")
        # The held-out loss's fixed inputs
        count, timesteps = cfg.validation_loss_samples, m.noise_scheduler.config.num_train_timesteps
        generator = torch.Generator().manual_seed(cfg.seed)
        self.latent_noise = torch.randn((count, *latent_shape), generator=generator)
        self.noise = torch.randn((count, *latent_shape), generator=generator)
        self.timesteps = ((torch.arange(count) + 0.5) * timesteps / count).long()
        self.input_ids = tokenize(m.tokenizer, [c["prompt"] for c in configs[:count]])
        self.control = (torch.from_numpy(np.stack(edges[:count])).permute(0, 3, 1, 2).float() / 255
                        if cfg.controlnet else None)
        # No gradients and no optimiser state: inference fits a larger batch than a training step's
        self.batch = max(cfg.micro_batch or cfg.batch_size, 8)
        pixels = torch.from_numpy(np.stack(gt[:count])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            self.moments = torch.cat([m.vae.encode(pixels[s:s + self.batch].to(dev, dtype)).latent_dist.parameters
                                      for s in range(0, count, self.batch)]).float()
        self.seconds = 0.0  # spent validating, for the log

    @torch.no_grad()
    def heldout_loss(self) -> float:
        total = 0.0
        for s in range(0, len(self.timesteps), self.batch):
            part = slice(s, s + self.batch)
            control = self.control[part] if self.control is not None else None
            losses = denoising_loss(self.m, DiagonalGaussianDistribution(self.moments[part]),
                                    self.input_ids[part].to(self.dev), self.latent_noise[part].to(self.dev),
                                    self.noise[part].to(self.dev), self.timesteps[part].to(self.dev), self.dtype,
                                    self.m.unet, control)
            total += float(losses.sum())
        return total / len(self.timesteps)

    def __call__(self, step: int) -> dict:
        """A validation record: the step, the held-out loss and {eval index: PNG bytes}."""
        started, unet = time.perf_counter(), self.m.unet
        was_training = unet.training
        unet.eval()
        try:
            with torch.compiler.set_stance("force_eager"), \
                    torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.heldout_loss() if len(self.timesteps) else float("nan")
                images = draw(self.pipe, *self.conditions, self.sampler, self.dev) if self.indices else []
        finally:
            unet.train(was_training)
        self.seconds += time.perf_counter() - started
        return {"step": step, HELDOUT: loss, "images": {i: png(image) for i, image in zip(self.indices, images)}}

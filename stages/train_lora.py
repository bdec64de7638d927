"""train-lora: LoRA fine-tune of the SD 1.5 UNet on the extracted training set.

    python -m stages.train_lora

The seed recipe (diffusers' train_text_to_image_lora.py with the notebooks' flags): LoRA on the
UNet's to_q/to_k/to_v/to_out.0 with gaussian init, frozen VAE and text encoder, epsilon-MSE on
`latent_dist.sample() * scaling_factor` at t ~ U[0, 1000), AdamW + cosine schedule with warmup,
gradient accumulation. Two deliberate differences: gradients are clipped for real (upstream's
clip_grad_norm_ got an exhausted generator and clipped nothing), and a resumed run reloads the
LoRA (diffusers #12689).

With `train.cache_latents` (the default) each image and its mirror image are encoded once, and
every step samples from the stored latent distribution (mean and log-variance): the same
objective, and the same random draws in the same order, as encoding at every step, without the
VAE pass. The text encoder still runs per step: it is about 3% of a step's FLOPs, while a cache of
unique prompts would take 77 x 768 values each, about 10 GB for FashionGen.

Every random draw is a function of (train.seed, sample or step number), so a run resumed from a
checkpoint continues exactly as if it had never stopped. Checkpoints are resume state, kept under
`paths.resume` (not a DVC output, so DVC's run-cache can restore this stage's outputs) and
deleted once the run has finished. Writes to `paths.lora` pytorch_lora_weights.safetensors
(diffusers key names, the adapter config with its alpha in the metadata), the same weights as
fashion_lora_kohya.safetensors (A1111, ComfyUI) and training_config.json; and one loss row per
optimiser step to `paths.loss_log`.
"""

import csv
import hashlib
import json
import math
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn import functional as F
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.io import (atomic_dir, atomic_file, fingerprint, remove_temps,
                              read_json, save_safetensors, source_files, write_json)
from stages.common.lora_formats import KOHYA_FILE, base_model_name, kohya_metadata, to_kohya
from stages.common.models import LORA_WEIGHTS, check_target_modules, load_training_models
from stages.common.params import as_dict, load_params, what_keys
from stages.common.runtime import device, peak_memory, seed_everything, training_dtype

LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm")


class TrainSamples(torch.utils.data.Dataset):
    """Item k is the k-th sample of the whole run: epoch k // N in a seeded order, with a seeded
    flip. Indexing by k (not by image) is what makes resuming exact. An item names the image and
    its orientation; `pixels()` makes the seed recipe's tensor from them."""

    def __init__(self, images: np.ndarray, prompts: list[str], tokenizer, flip: bool, seed: int):
        self.images, self.flip, self.seed = images, flip, seed
        self.input_ids = tokenizer(prompts, padding="max_length", truncation=True,
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        self._order = (-1, None)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int):
        epoch, pos = divmod(k, len(self.images))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images)))
        i = int(self._order[1][pos])
        flipped = self.flip and np.random.default_rng([self.seed, epoch, pos]).random() < 0.5
        return i, int(flipped), self.input_ids[i]

    def pixels(self, index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images, mirrored where `flipped`. extract writes them at the training resolution,
        so the recipe's resize and random crop are no-ops."""
        pixels = torch.from_numpy(np.stack([self.images[i] for i in index.tolist()])).permute(0, 3, 1, 2)
        pixels = pixels.float() / 127.5 - 1
        return torch.where(flipped.view(-1, 1, 1, 1).bool(), pixels.flip(-1), pixels)


def encode_latents(vae, samples: TrainSamples, dtype: torch.dtype, dev, batch: int) -> torch.Tensor:
    """The VAE's latent distribution of every image and its mirror image: [N, 2, 2 x latent
    channels, h, w] (mean and log-variance, as diffusers stores them), fp32 on the CPU."""
    moments = []
    for start in tqdm(range(0, len(samples), batch), desc="train-lora: encoding", unit="batch"):
        index = torch.arange(start, min(start + batch, len(samples)))
        both = torch.cat([samples.pixels(index, torch.zeros_like(index)),
                          samples.pixels(index, torch.ones_like(index))])
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            encoded = vae.encode(both.to(dev, dtype)).latent_dist.parameters.float().cpu()
        moments.append(torch.stack(encoded.chunk(2), dim=1))
    return torch.cat(moments)


def latest_checkpoint(folder: Path, expected: str):
    """The newest checkpoint made from the same inputs, or None; stale ones are deleted."""
    checkpoints = sorted(folder.glob("checkpoint-*.pt"))
    if not checkpoints:
        return None
    try:
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # written atomically: a disk fault
        log.warning("train-lora: %s does not load (%s); starting afresh", checkpoints[-1], type(err).__name__)
        state = None
    else:
        if state.get("fingerprint") != expected:
            log.info("train-lora: %s was made from other params, data or code; starting afresh", checkpoints[-1])
            state = None
    if state is None:
        for path in checkpoints:
            path.unlink()
    return state


def save_checkpoint(folder: Path, state: dict) -> None:
    path = folder / f"checkpoint-{state['step']:06d}.pt"
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save(state, f)  # a file object, so the archive is not named after the random temp name
    for old in folder.glob("checkpoint-*.pt"):  # keep only the newest
        if old != path:
            old.unlink()


def cached_latents(vae, samples: TrainSamples, dtype, dev, folder: Path, expected: str) -> torch.Tensor:
    """`encode_latents`, kept beside the checkpoints so that a resumed run does not encode again."""
    path = folder / "latents.pt"
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache.get("fingerprint") == expected:
                return cache["moments"]
        except (RuntimeError, EOFError, pickle.UnpicklingError):  # written atomically: a disk fault
            pass
    started = time.perf_counter()
    moments = encode_latents(vae, samples, dtype, dev, batch=32)
    log.info("train-lora: encoded %d images and their mirror images in %.1f s (%.1f MB of latent moments)",
             len(samples), time.perf_counter() - started, moments.numel() * 4 / 1e6)
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save({"fingerprint": expected, "moments": moments}, f)
    return moments


def denoising_loss(m, latents, input_ids: torch.Tensor, generator: torch.Generator, dtype) -> torch.Tensor:
    """The seed's objective for one micro-batch. `latents` is either the cached latent
    distribution or pixels to encode (the recipe); sampling it draws from `generator` first
    either way, so both paths draw the same latents, noise and timesteps."""
    dev = input_ids.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        if not isinstance(latents, DiagonalGaussianDistribution):
            latents = m.vae.encode(latents.to(dtype)).latent_dist
        latents = latents.sample(generator) * m.vae.config.scaling_factor
        text = m.text_encoder(input_ids)[0]
    noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
    timesteps = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=dev)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    if m.noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        prediction = m.unet(noisy, timesteps, text).sample
    return F.mse_loss(prediction.float(), target.float())


class Trainer:
    """The models, optimiser and one optimiser step of the recipe: train-lora's loop and
    bench/gpu.py both run this."""

    def __init__(self, base_model, cfg, dtype: torch.dtype, dev: torch.device):
        self.cfg, self.dtype, self.dev = cfg, dtype, dev
        self.m = m = load_training_models(base_model, dtype)
        check_target_modules(m.unet, cfg.target_modules)
        m.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                      target_modules=list(cfg.target_modules)))
        for module in (m.unet, m.vae, m.text_encoder):
            module.to(dev)
        cast_training_params(m.unet, dtype=torch.float32)  # frozen weights in `dtype`, LoRA in fp32
        m.unet.train()
        self.lora_params = [p for p in m.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.lora_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
            fused=dev.type == "cuda")  # one kernel for all LoRA tensors, the same math
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.max_steps)
        # fp16 (T4) needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def step(self, step: int, batches, samples: TrainSamples, moments: torch.Tensor | None) -> dict:
        """Optimiser step `step` (0-based) on the next grad_accumulation micro-batches; its loss-log row."""
        cfg, dev, scaler, optimizer = self.cfg, self.dev, self.scaler, self.optimizer
        generator = torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + step)
        step_loss = torch.zeros((), device=dev)  # summed on the device: one sync per step, not per micro-batch
        for _ in range(cfg.grad_accumulation):
            index, flipped, input_ids = next(batches)
            if moments is not None:
                latents = DiagonalGaussianDistribution(moments[index, flipped].to(dev, non_blocking=True))
            else:  # the seed recipe: the VAE at every step
                latents = samples.pixels(index, flipped).to(dev, non_blocking=True)
            loss = denoising_loss(self.m, latents, input_ids.to(dev, non_blocking=True), generator, self.dtype)
            loss = loss / cfg.grad_accumulation
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
        # A real list of parameters: upstream passed a consumed filter(), so it never clipped.
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, max_norm)
        scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
        scaler.update()
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step used
        if scaler.get_scale() >= scale:  # as accelerate does: no schedule step for a skipped update
            self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, "loss": float(step_loss), "lr": lr, "grad_norm": float(grad_norm)}


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.train, params.paths
    dev = device()
    dtype = training_dtype(cfg.mixed_precision, dev)
    seed_everything(cfg.seed)  # the LoRA's gaussian init draws from the global RNG
    images, prompts = dataset.load_train_set(paths.train_data)
    resolution = params.extract.resolution
    if images.shape[1:3] != (resolution, resolution):
        raise StageError(f"{paths.train_data}: images are {images.shape[2]}x{images.shape[1]}, not extract.resolution "
                         f"{resolution}x{resolution}; rerun `dvc repro extract`")
    t = Trainer(paths.base_model, cfg, dtype, dev)
    m, optimizer, lr_scheduler, scaler = t.m, t.optimizer, t.lr_scheduler, t.scaler

    checkpoints = dataset.resume_dir(paths, "train-lora")
    checkpoints.mkdir(parents=True, exist_ok=True)
    remove_temps(checkpoints)  # a checkpoint half-written when a run was killed
    settings = {**what_keys(cfg), "resolution": params.extract.resolution, "dtype": str(dtype)}
    expected = fingerprint(settings, paths.train_data, paths.base_model, *source_files())
    state = latest_checkpoint(checkpoints, expected)
    start_step, loss_log = 0, []
    if state is not None:
        set_peft_model_state_dict(m.unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"]:  # empty unless the run used fp16, which the fingerprint pins
            scaler.load_state_dict(state["scaler"])
        start_step, loss_log = state["step"], state["loss_log"]
        log.info("train-lora: resuming from step %d", start_step)

    per_step = cfg.batch_size * cfg.grad_accumulation
    samples = TrainSamples(images, prompts, m.tokenizer, cfg.random_flip, cfg.seed)
    moments = cached_latents(m.vae, samples, dtype, dev, checkpoints, expected) if cfg.cache_latents else None
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         sampler=range(start_step * per_step, cfg.max_steps * per_step),
                                         pin_memory=dev.type == "cuda", persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)
    started, progress = time.perf_counter(), tqdm(range(start_step, cfg.max_steps), initial=start_step,
                                                  total=cfg.max_steps, desc="train-lora")
    for step in progress:
        row = t.step(step, batches, samples, moments)
        loss_log.append(row)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(checkpoints, {
                "step": step + 1, "fingerprint": expected, "loss_log": loss_log, "scaler": scaler.state_dict(),
                "lora": get_peft_model_state_dict(m.unet), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict()})
    elapsed = time.perf_counter() - started
    trained = cfg.max_steps - start_step

    with atomic_dir(paths.lora) as out:
        lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet))
        # The adapter config (rank, alpha, target modules) goes into the file's metadata where
        # diffusers' loaders look for it: without it every loader assumes alpha = rank, and a LoRA
        # trained with alpha != rank comes back scaled by rank / alpha. Beside it, what made it.
        # Only the fields that define the adapter: diffusers rebuilds LoraConfig(**metadata), and a
        # field an older peft does not know would make the file unloadable there.
        config = m.unet.peft_config["default"]
        adapter = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
                   "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
                   "use_dora": config.use_dora, "init_lora_weights": config.init_lora_weights}
        # The params' digest, not the resume fingerprint: that one also hashes the code, so the
        # weights file would change with every edit to any stage.
        train_params = json.dumps({**as_dict(cfg), "resolution": params.extract.resolution}, sort_keys=True)
        params_digest = hashlib.sha256(train_params.encode()).hexdigest()[:16]
        sources = Path(paths.model_sources)
        base_model = base_model_name(read_json(sources) if sources.is_file() else None)
        metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(
                        {f"unet.{k}": v for k, v in adapter.items()}, sort_keys=True),  # keyed as diffusers packs it
                    "fashion.train": train_params, "fashion.train_sha256": params_digest,
                    "fashion.base_model": base_model}
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=lora_state, weight_name=LORA_WEIGHTS, safe_serialization=True,
            save_function=lambda weights, filename: save_safetensors(filename, weights, metadata))
        # The same weights for A1111, ComfyUI and kohya's tools
        save_safetensors(out / KOHYA_FILE, to_kohya({f"unet.{k}": v for k, v in lora_state.items()}, cfg.alpha),
                         kohya_metadata(cfg.rank, cfg.alpha, params.extract.resolution, params_digest,
                                        base_model))
        write_json(out / "training_config.json", {
            "train": as_dict(cfg), "resolution": params.extract.resolution, "base_model": paths.base_model,
            "base_model_name": base_model,
            "train_images": len(images), "fingerprint": expected, "dtype": str(dtype),
            "lora_parameters": sum(p.numel() for p in t.lora_params), "lora_tensors": len(lora_state)})
    with atomic_file(paths.loss_log) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(loss_log)
    shutil.rmtree(checkpoints)  # the outputs are whole: DVC's cache keeps them from here
    # Throughput and resume point go to the log, not to training_config.json: anything that
    # varies between otherwise identical runs would make every downstream stage rerun.
    log.info("train-lora: %d steps (%d resumed) on %s/%s at %.1f samples/s%s, final loss %.4f; wrote %s/%s",
             cfg.max_steps, start_step, dev, dtype, trained * per_step / elapsed if trained else 0.0,
             peak_memory(dev), loss_log[-1]["loss"], paths.lora, LORA_WEIGHTS)


if __name__ == "__main__":
    run_cli(main)

"""train-lora: LoRA fine-tune of the SD 1.5 UNet on the extracted training set.

    python -m stages.train_lora

The seed recipe (diffusers' train_text_to_image_lora.py with the notebooks' flags): LoRA on the
UNet's to_q/to_k/to_v/to_out.0 with gaussian init, frozen VAE and text encoder, epsilon-MSE on
`latent_dist.sample() * scaling_factor` at t ~ U[0, 1000), AdamW + cosine schedule with warmup,
gradient accumulation. Two deliberate differences: gradients are clipped for real (upstream's
clip_grad_norm_ got an exhausted generator and clipped nothing), and a resumed run reloads the
LoRA (diffusers #12689).

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
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.io import (atomic_dir, atomic_file, fingerprint, remove_temps, resize_shorter_side,
                              read_json, save_safetensors, source_files, write_json)
from stages.common.lora_formats import KOHYA_FILE, base_model_name, kohya_metadata, to_kohya
from stages.common.models import LORA_WEIGHTS, check_target_modules, load_training_models
from stages.common.params import as_dict, load_params, what_keys
from stages.common.runtime import device, peak_memory, seed_everything, training_dtype

LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm")


class TrainSamples(torch.utils.data.Dataset):
    """Item k is the k-th sample of the whole run: epoch k // N in a seeded order, with a seeded
    flip and crop. Indexing by k (not by image) is what makes resuming exact."""

    def __init__(self, images: np.ndarray, prompts: list[str], tokenizer, resolution: int, flip: bool, seed: int):
        self.images, self.resolution, self.flip, self.seed = images, resolution, flip, seed
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
        rng = np.random.default_rng([self.seed, epoch, pos])
        img = resize_shorter_side(Image.fromarray(np.asarray(self.images[i])), self.resolution)  # then RandomCrop
        left = int(rng.integers(0, img.width - self.resolution + 1))
        top = int(rng.integers(0, img.height - self.resolution + 1))
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
        return pixels, self.input_ids[i]


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


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.train, params.paths
    dev = device()
    dtype = training_dtype(cfg.mixed_precision, dev)
    seed_everything(cfg.seed)  # the LoRA's gaussian init draws from the global RNG
    images, prompts = dataset.load_train_set(paths.train_data)
    m = load_training_models(paths.base_model, dtype)
    check_target_modules(m.unet, cfg.target_modules)
    m.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                  target_modules=list(cfg.target_modules)))
    for module in (m.unet, m.vae, m.text_encoder):
        module.to(dev)
    cast_training_params(m.unet, dtype=torch.float32)  # frozen weights in `dtype`, LoRA in fp32
    lora_params = [p for p in m.unet.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.max_steps)
    # fp16 (T4) needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

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
    samples = TrainSamples(images, prompts, m.tokenizer, params.extract.resolution, cfg.random_flip, cfg.seed)
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         sampler=range(start_step * per_step, cfg.max_steps * per_step),
                                         pin_memory=dev.type == "cuda", persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)
    prediction_type = m.noise_scheduler.config.prediction_type
    m.unet.train()
    started, progress = time.perf_counter(), tqdm(range(start_step, cfg.max_steps), initial=start_step,
                                                  total=cfg.max_steps, desc="train-lora")
    for step in progress:
        generator = torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + step)
        step_loss = 0.0
        for _ in range(cfg.grad_accumulation):
            pixels, input_ids = (t.to(dev, non_blocking=True) for t in next(batches))
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                latents = m.vae.encode(pixels.to(dtype)).latent_dist.sample(generator) * m.vae.config.scaling_factor
                text = m.text_encoder(input_ids)[0]
            noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
            timesteps = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      generator=generator, device=dev)
            noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "epsilon":
                target = noise
            else:
                target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                prediction = m.unet(noisy, timesteps, text).sample
            loss = F.mse_loss(prediction.float(), target.float()) / cfg.grad_accumulation
            scaler.scale(loss).backward()
            step_loss += loss.item()
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
        # A real list of parameters: upstream passed a consumed filter(), so it never clipped.
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, max_norm)
        scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
        scaler.update()
        lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
        if scaler.get_scale() >= scale:  # as accelerate does: no schedule step for a skipped update
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_log.append({"step": step + 1, "loss": step_loss, "lr": lr,
                         "grad_norm": float(grad_norm)})
        progress.set_postfix(loss=f"{step_loss:.4f}")
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
            "lora_parameters": sum(p.numel() for p in lora_params), "lora_tensors": len(lora_state)})
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

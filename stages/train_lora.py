"""train-lora: LoRA fine-tune of the SD 1.5 UNet on the extracted training set.

    python -m stages.train_lora

The seed recipe (diffusers' train_text_to_image_lora.py with the notebooks' flags): LoRA on the
UNet's to_q/to_k/to_v/to_out.0 with gaussian init, frozen VAE and text encoder, MSE to the noise
(or to v where the base's scheduler config says so, as the demo's tiny models' does) on
`latent_dist.sample() * scaling_factor` at t ~ U[0, 1000), AdamW + cosine schedule with warmup,
gradient accumulation. With `train.controlnet` (the demo; the seed recipe had none) the frozen
canny ControlNet that generate uses joins every forward pass, fed the edges of the image being
trained on, so the LoRA learns what an edge map leaves open (colour, texture) and not the layout
the ControlNet gives anyway. Two deliberate differences: gradients are clipped for real (upstream's
clip_grad_norm_ got an exhausted generator and clipped nothing), and a resumed run reloads the
LoRA (diffusers #12689).

The recipe knobs beyond the seed (all off by default, stages/common/training.py): Min-SNR-γ
(`train.snr_gamma`), a noise offset, caption dropout, and a LoRA on the text encoder too
(`train.text_encoder_rank`, its own learning rate), saved beside the UNet's in both files.

With `train.cache_latents` (the default) each (image, flip) pair the run draws is encoded once,
in batches, before the first step, and every step samples from the stored latent distribution
(mean and log-variance): the same objective and the same random draws as encoding at every step,
with at most as many VAE passes (fewer from the second epoch on). The text encoder still runs per step: it is about 3% of a step's FLOPs, while a cache of
unique prompts would take 77 x 768 values each, about 10 GB for FashionGen.

Every random draw is a function of (train.seed, sample number), so a run resumed from a
checkpoint continues exactly as if it had never stopped, and the split of a step's samples into
forward passes or between processes (`train.processes`, accelerate launch) changes only rounding.
The step itself lives in stages/common/training.py, shared with bench/gpu.py. Checkpoints are resume state, kept under
`paths.resume` (not a DVC output, so DVC's run-cache can restore this stage's outputs) and
deleted once the run has finished. Writes to `paths.lora` pytorch_lora_weights.safetensors
(diffusers key names, the adapter config with its alpha in the metadata), the same weights as
fashion_lora_kohya.safetensors (A1111, ComfyUI) and training_config.json; to `paths.train_log`
(DVCLive, read live by `dvc exp show` and `dvc plots show`) the loss, learning rate and gradient
norm of every step, and every `train.validate_every` steps the held-out loss and validation
images (stages/common/validation.py); and to `paths.train_summary` (a DVC metric) whether training
learned: the denoising loss of the run's first `train.fixed_samples` samples (training images with the run's own
noise and timesteps: in-sample; under the ControlNet if trained so) with the base UNet and with
the LoRA. The training loss curve is too noisy to say so: each step draws new timesteps.
"""

import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from tqdm import tqdm

from stages.common import dataset, distributed
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import (atomic_file, fingerprint, remove_temps,
                              read_json, save_safetensors, source_files, write_json)
from stages.common.dataset import LORA_CONFIG, LORA_WEIGHTS
from stages.common.lora_formats import KOHYA_FILE, base_model_name, diffusers_states, kohya_metadata, to_kohya
from stages.common.params import load_params, model_keys, what_keys
from stages.common.runtime import device, peak_memory, seed_everything, training_dtype
from stages.common.train_log import TrainLog
from stages.common.training import (LORA_MODELS, Trainer, TrainSamples, encode_latents, fixed_sample_loss,
                                    read_rows)
from stages.common.validation import Validator, check_counts

# Reading a loss waits for the GPU to finish its step, and the next step cannot be queued meanwhile:
# read every few steps, a few milliseconds apart on an H100.
READ_EVERY = 10


def latest_checkpoint(folder: Path, expected: str, delete: bool = True):
    """The newest checkpoint made from the same inputs, or None; stale ones are deleted (by the
    writer: the other processes read what it kept)."""
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
    if state is None and delete:
        for path in checkpoints:
            path.unlink()
    return state


def save_checkpoint(folder: Path, state: dict) -> None:
    path = folder / f"checkpoint-{state['step']:06d}.pt"
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save(state, f)  # a file object, so the archive is not named after the random temp name
    # atomic_file has synced the new one and its name: a power cut from here on cannot leave an
    # empty newest checkpoint with the previous one already gone
    for old in folder.glob("checkpoint-*.pt"):  # keep only the newest
        if old != path:
            old.unlink()


def cached_latents(vae, samples: TrainSamples, run: range, dtype, dev, folder: Path, expected: str) -> None:
    """Encode the (image, flip) pairs the run's samples draw, each process its share, into files
    beside the checkpoints (so a resumed run does not encode again); then train from them."""
    rank, processes = distributed.rank(), distributed.world_size()
    parts = [folder / f"latents-{r}-of-{processes}.pt" for r in range(processes)]
    pairs = samples.pairs(run)

    def load(path: Path):
        try:  # memory-mapped: the processes of one machine share the pages
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # written atomically: a disk fault
            return None
        return cache["moments"] if cache.get("fingerprint") == expected else None

    if load(parts[rank]) is None:
        started = time.perf_counter()
        share = pairs[len(pairs) * rank // processes:len(pairs) * (rank + 1) // processes]
        moments = encode_latents(vae, samples, share, dtype, dev, batch=32)
        with atomic_file(parts[rank]) as tmp, tmp.open("wb") as f:
            torch.save({"fingerprint": expected, "moments": moments}, f)
        log.info("train-lora: encoded the %d (image, flip) pairs the run draws in %.1f s (%.1f MB of latent "
                 "moments)", len(share), time.perf_counter() - started,
                 moments.numel() * moments.element_size() / 1e6)
    distributed.barrier()
    # One process keeps the file's mapping (no copy); several each hold a copy of the whole.
    samples.use_cache(pairs, load(parts[0]) if processes == 1 else torch.cat([load(part) for part in parts]))


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.train, params.paths
    if distributed.relaunch(cfg.processes, params.launch, "stages.train_lora", "train.processes"):
        return  # its processes did the work
    dev = device()
    dtype = training_dtype(cfg.mixed_precision, dev)
    seed_everything(cfg.seed)  # the LoRA's gaussian init draws from the global RNG
    images, prompts = dataset.load_train_set(paths.train_data)
    resolution = params.extract.resolution
    if images.shape[1:3] != (resolution, resolution):
        raise StageError(f"{paths.train_data}: images are {images.shape[2]}x{images.shape[1]}, not extract.resolution "
                         f"{resolution}x{resolution}; rerun `dvc repro extract`")
    writer, processes = distributed.is_writer(), distributed.world_size()
    per_step = cfg.batch_size * cfg.grad_accumulation
    if per_step % processes:
        raise StageError(f"train.batch_size x train.grad_accumulation = {per_step} does not split between "
                         f"{processes} processes; make it a multiple of {processes}")
    if cfg.validate_every:
        check_counts(cfg, paths.eval_data)  # before any work, on every process
    distributed.init(dev)
    t = Trainer(paths, cfg, dtype, dev)
    m, optimizer, lr_scheduler, scaler = t.m, t.optimizer, t.lr_scheduler, t.scaler

    checkpoints = dataset.resume_dir(paths, "train-lora")
    edges = (params.canny.low_threshold, params.canny.high_threshold) if cfg.controlnet else None
    # The validation keys too: a resumed run's log must hold what an unbroken one's would.
    validation = {k: v for k, v in what_keys(cfg).items() if k.startswith("valid")}
    settings = {**model_keys(cfg), **validation, "resolution": params.extract.resolution, "dtype": str(dtype),
                "edges": edges, "canny": [params.canny.low_threshold, params.canny.high_threshold]}
    expected = fingerprint(settings, paths.train_data, paths.base_model,
                           *([paths.controlnet] if t.m.controlnet is not None else []),
                           *([paths.eval_data] if cfg.validate_every else []), *source_files())
    if writer:
        checkpoints.mkdir(parents=True, exist_ok=True)
        remove_temps(checkpoints)  # a checkpoint half-written when a run was killed
        state = latest_checkpoint(checkpoints, expected)
    distributed.barrier()
    if not writer:
        state = latest_checkpoint(checkpoints, expected, delete=False)
    start_step, loss_log, validations = 0, [], []
    if state is not None:
        t.load_state(state)
        start_step, loss_log, validations = state["step"], state["loss_log"], state["validations"]
        log.info("train-lora: resuming from step %d", start_step)
    # Process 0 alone logs and validates. The log first: a logger that cannot start stops the run here.
    train_log = TrainLog(paths, cfg.report_to, loss_log, validations) if writer else None

    samples = TrainSamples(images, prompts, m.tokenizer, cfg.random_flip, cfg.seed, t.latent_shape(resolution),
                           m.noise_scheduler.config.num_train_timesteps, edges)
    if cfg.cache_latents:  # the whole run's pairs, so that a resumed run finds the same files
        cached_latents(m.vae, samples, range(cfg.max_steps * per_step), dtype, dev, checkpoints, expected)
    validator = None
    if writer and cfg.validate_every:
        validator = Validator(m, cfg, params.canny, paths.eval_data, resolution, t.latent_shape(resolution),
                              dtype, dev)
        if start_step == 0:  # the base, before any step: the strip's first column
            validations.append(validator(0))
            train_log.validation(validations[-1])
    batches = t.loader(samples, start_step, cfg.max_steps)
    started, progress = time.perf_counter(), tqdm(range(start_step, cfg.max_steps), initial=start_step,
                                                  total=cfg.max_steps, desc="train-lora", disable=not writer)
    pending, read_at = [], started  # rows whose loss is still on the device: read every READ_EVERY steps
    validated = validator.seconds if validator else 0.0  # step 0's: outside the loop's time
    for step in progress:
        pending.append(t.step(step, batches, samples))
        checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps
        # every validate_every steps, and at the end: the last column is always the LoRA that ships
        validate = validator is not None and ((step + 1) % cfg.validate_every == 0 or step + 1 == cfg.max_steps)
        if len(pending) == READ_EVERY or checkpoint or validate:
            rows, pending = read_rows(pending), []
            loss_log += rows
            now = time.perf_counter()
            speed = len(rows) * per_step / (now - read_at)
            if writer:
                train_log.rows(rows, speed)
            read_at = now
            progress.set_postfix(loss=f"{loss_log[-1]['loss']:.4f}", samples_per_s=f"{speed:.1f}")
        if validate:
            validations.append(validator(step + 1))
            train_log.validation(validations[-1])
            read_at = time.perf_counter()  # samples/s counts training alone
        if writer and checkpoint:
            save_checkpoint(checkpoints, {
                "step": step + 1, "fingerprint": expected, "loss_log": loss_log, "validations": validations,
                "scaler": scaler.state_dict(), "lora": t.lora_state(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()})
    if not writer:  # the LoRA is the same in every process: one writes it
        distributed.finish()
        return
    elapsed = time.perf_counter() - started
    trained = cfg.max_steps - start_step
    summary = fixed_sample_loss(m, m.unet, samples, cfg.fixed_samples, dtype, dev, cfg.micro_batch or cfg.batch_size)
    log.info("train-lora: denoising loss on the run's first %d samples: %.4f with the base UNet, %.4f with the "
             "LoRA (%+.1f%%)", summary["fixed_samples"], summary["denoising_loss_base"],
             summary["denoising_loss_lora"], 100 * summary["denoising_loss_change"])

    # File by file, each written whole: the folder also holds model-card's card and DVC's .gitignore
    out = Path(paths.lora)
    out.mkdir(parents=True, exist_ok=True)
    states, adapters = diffusers_states(dict(zip(LORA_MODELS, t.adapted)))
    # The params' digest, not the resume fingerprint: that one also hashes the code, so the
    # weights file would change with every edit to any stage.
    # What shapes the weights only: how-knobs (processes, workers, the latent cache) leave them as they are.
    # Under train.controlnet the LoRA fits that ControlNet fed those edges: the thresholds too.
    train_params = json.dumps({**model_keys(cfg), "resolution": params.extract.resolution,
                               **({"canny": list(edges)} if edges else {})}, sort_keys=True)
    params_digest = hashlib.sha256(train_params.encode()).hexdigest()[:16]
    sources = Path(paths.model_sources)
    base_model = base_model_name(read_json(sources) if sources.is_file() else None)
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(  # keyed as diffusers packs it
                    {f"{name}.{k}": v for name, adapter in adapters.items() for k, v in adapter.items()}, sort_keys=True),
                "fashion.train": train_params, "fashion.train_sha256": params_digest,
                "fashion.base_model": base_model}
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=states["unet"], text_encoder_lora_layers=states.get("text_encoder"),
        weight_name=LORA_WEIGHTS, safe_serialization=True,
        save_function=lambda weights, filename: save_safetensors(filename, weights, metadata))
    # The same weights for A1111, ComfyUI and kohya's tools
    save_safetensors(out / KOHYA_FILE, to_kohya({f"{name}.{k}": v for name, state in states.items()
                                                 for k, v in state.items()},
                                                {"unet": cfg.alpha, "text_encoder": cfg.text_encoder_alpha}),
                     kohya_metadata(cfg.rank, cfg.alpha, params.extract.resolution, params_digest,
                                    base_model))
    write_json(out / LORA_CONFIG, {
        "train": model_keys(cfg), "resolution": params.extract.resolution, "base_model": paths.base_model,
        "base_model_name": base_model, "controlnet": paths.controlnet if cfg.controlnet else None,
        "canny": list(edges) if edges else None,
        "train_images": len(images), "dtype": str(dtype),
        "lora_parameters": sum(p.numel() for p in t.lora_params),
        "lora_tensors": sum(len(state) for state in states.values())})
    write_json(paths.train_summary, summary)
    train_log.close()
    shutil.rmtree(checkpoints)  # the outputs are whole: DVC's cache keeps them from here
    # Throughput and resume point go to the log, not to training_config.json: anything that
    # varies between otherwise identical runs would make every downstream stage rerun.
    total = validator.seconds if validator else 0.0
    in_loop = total - validated
    log.info("train-lora: %d steps (%d resumed) on %s/%s at %.1f samples/s%s, final loss %.4f; validation took "
             "%.1f s (%.0f%% of training); wrote %s/%s", cfg.max_steps, start_step, dev, dtype,
             trained * per_step / (elapsed - in_loop) if trained else 0.0, peak_memory(dev), loss_log[-1]["loss"],
             total, 100 * total / max(elapsed - in_loop, 1e-9), paths.lora, LORA_WEIGHTS)
    distributed.finish()


if __name__ == "__main__":
    run_cli(main)

"""The training step of train-lora, shared with bench/gpu.py: samples and their random draws,
the latent cache's encoder, the seed recipe's loss, and one optimiser step, on one process or
several (DDP).
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn import functional as F
from tqdm import tqdm

from stages.common import distributed
from stages.common.edges import canny
from stages.common.errors import StageError
from stages.common.models import add_text_encoder_lora, check_target_modules, load_training_models
from stages.common.runtime import compile_module, fused_adamw, uses_cuda_graphs


class TrainSamples(torch.utils.data.Dataset):
    """Item k is the k-th sample of the whole run: epoch k // N in a seeded order, with a seeded
    flip, and its own draws of the latent sample, the noise and the timestep. Everything random is
    a function of (train.seed, k), so a resumed run continues exactly, and how the samples of a
    step are split into micro-batches or between processes changes nothing but float rounding.
    An item names the image and its orientation, and carries its canny edges when `edges` gives
    the thresholds (train.controlnet): made where the item is, in the DataLoader's workers on a
    GPU, not in the loop that feeds the GPU. `pixels()` makes the seed recipe's tensor."""

    def __init__(self, images: np.ndarray, prompts: list[str], tokenizer, flip: bool, seed: int,
                 latent_shape: tuple[int, int, int], timesteps: int, edges: tuple[int, int] | None = None):
        self.images, self.flip, self.seed, self.edges = images, flip, seed, edges
        self.latent_shape, self.timesteps = latent_shape, timesteps
        self.moments = self.rows = None  # the latent cache: see use_cache()
        self.input_ids = tokenize(tokenizer, prompts)
        self.empty_ids = tokenize(tokenizer, [""])[0]  # train.caption_dropout's prompt
        self._order = (-1, None)

    def __len__(self) -> int:
        return len(self.images)

    def image_and_flip(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, len(self.images))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images)))
        flipped = self.flip and np.random.default_rng([self.seed, epoch, pos]).random() < 0.5
        return int(self._order[1][pos]), int(flipped)

    def pairs(self, samples: range) -> list[tuple[int, int]]:
        """The (image, flip) pairs that samples `samples` draw, in order: what the latent cache
        needs. Under one epoch (the seed's run is 0.7 of one) that is fewer than every image twice."""
        if len(samples) >= 8 * len(self.images):  # several epochs: every pair, without listing them
            return [(i, f) for i in range(len(self.images)) for f in ((0, 1) if self.flip else (0,))]
        return sorted({self.image_and_flip(k) for k in samples})

    def use_cache(self, pairs: list[tuple[int, int]], moments: torch.Tensor) -> None:
        """Train from `moments[j]`, the latent distribution of pairs[j], instead of the pixels."""
        self.rows = torch.full((len(self.images), 2), -1, dtype=torch.long)
        self.rows[tuple(torch.tensor(pairs).T)] = torch.arange(len(pairs))
        self.moments = moments

    def __getitem__(self, k: int):
        i, flipped = self.image_and_flip(k)
        # Drawn on the CPU: the same numbers on any device, and one copy per micro-batch to the GPU.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
        latent_noise = torch.randn(self.latent_shape, generator=generator)
        noise = torch.randn(self.latent_shape, generator=generator)
        timestep = torch.randint(0, self.timesteps, (), generator=generator)
        # After the draws above, so that they are the same whether or not the knobs that use these
        # are on: train.noise_offset's per-channel constants and train.caption_dropout's coin.
        offset = torch.randn((self.latent_shape[0], 1, 1), generator=generator)
        coin = torch.rand((), generator=generator)
        # The cached latent distribution travels with the item, so the loader collates and pins it.
        moments = self.moments[self.rows[i, flipped]] if self.moments is not None else torch.empty(0)
        return (i, flipped, self.input_ids[i], moments, self.edge_map(i, flipped), latent_noise, noise, timestep,
                offset, coin)

    def pixels(self, index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images, mirrored where `flipped`. extract writes them at the training resolution,
        so the recipe's resize and random crop are no-ops."""
        pixels = torch.from_numpy(np.stack([self.images[i] for i in index.tolist()])).permute(0, 3, 1, 2)
        pixels = pixels.float() / 127.5 - 1
        return torch.where(flipped.view(-1, 1, 1, 1).bool(), pixels.flip(-1), pixels)

    def edge_map(self, i: int, flipped: int) -> torch.Tensor:
        """The canny edges of image i as it is trained on (mirrored before edge detection, as
        canny-edges sees an image), uint8 [h, w, 3]; empty without train.controlnet. Computed per
        sample, not cached: about a millisecond an image at 512 px, against 7.8 GB to hold
        FashionGen's edges. uint8 until the GPU: a quarter of the bytes to collate, pin and copy."""
        if self.edges is None:
            return torch.empty(0, dtype=torch.uint8)
        image = self.images[i]
        return torch.from_numpy(canny(np.ascontiguousarray(image[:, ::-1] if flipped else image), *self.edges))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def control_input(maps: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
    """A batch of `edge_map`s as the ControlNet takes an edge map: [b, 3, h, w] in [0, 1] on `dev`;
    None without train.controlnet."""
    if maps.numel() == 0:
        return None
    return maps.to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 255


def encode_latents(vae, samples: TrainSamples, pairs: list[tuple[int, int]], dtype: torch.dtype, dev,
                   batch: int) -> torch.Tensor:
    """The VAE's latent distribution of each (image, flip) pair: [n, 2 x latent channels, h, w]
    (mean and log-variance, as diffusers stores them), on the CPU in the VAE's dtype (bf16 on a
    GPU: upcasting adds no information and doubles the memory)."""
    moments = None
    for start in tqdm(range(0, len(pairs), batch), desc="train-lora: encoding", unit="batch",
                      disable=not distributed.is_writer()):
        index, flipped = torch.tensor(pairs[start:start + batch]).T
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            encoded = vae.encode(samples.pixels(index, flipped).to(dev, dtype)).latent_dist.parameters.cpu()
        if moments is None:  # filled in place: no list to concatenate, no second copy at the peak
            moments = torch.empty((len(pairs), *encoded.shape[1:]), dtype=encoded.dtype)
        moments[start:start + len(index)] = encoded
    return moments


def set_lora_enabled(models, enabled: bool) -> None:
    """Turn the LoRA layers of `models` on or off (peft's layers, whoever added them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023) per sample, as diffusers' training scripts weigh since PR
    #5238: min(SNR, γ) / SNR for an epsilon target, min(SNR, γ) / (SNR + 1) for v. The epsilon
    case is computed as min(γ / SNR, 1): the same where SNR > 0, and 1 instead of 0 / 0 at a
    zero-terminal-SNR schedule's last step."""
    snr = compute_snr(scheduler, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1)
    if scheduler.config.prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r}: the recipe trains epsilon or v")


def denoising_loss(m, latents, input_ids: torch.Tensor, latent_noise: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, dtype, unet=None, control: torch.Tensor | None = None,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """The seed's objective, per sample. `latents` is either the cached latent distribution or
    pixels to encode (the recipe); either way the latent is mean + std x latent_noise, as
    diffusers' `latent_dist.sample()` computes it, so both paths train on the same numbers. With
    `control` (train.controlnet) the frozen ControlNet adds its residuals as in generation: it
    runs without gradients unless the text encoder has a LoRA, whose embeddings it reads.
    `snr_gamma` > 0 weighs each sample by Min-SNR-γ; the held-out and fixed-sample losses leave it
    at 0, so that they compare between runs with and without it."""
    dev = input_ids.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        if not isinstance(latents, DiagonalGaussianDistribution):
            latents = m.vae.encode(latents.to(dtype)).latent_dist
        latents = (latents.mean + latents.std * latent_noise.to(latents.mean.dtype)) * m.vae.config.scaling_factor
    # With gradients only where the text encoder has a LoRA (train.text_encoder_rank): frozen
    # weights and integer ids record no graph.
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        text = m.text_encoder(input_ids)[0]
    noise = noise.to(latents.dtype)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    if m.noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    residuals = {}
    if control is not None:
        # Frozen weights: with a text encoder LoRA, gradients flow through it to the LoRA's embeddings
        with torch.set_grad_enabled(text.requires_grad), \
                torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            down, mid = m.controlnet(noisy, timesteps, text, controlnet_cond=control.to(dev, dtype), return_dict=False)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        prediction = (unet if unet is not None else m.unet)(noisy, timesteps, text, **residuals).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss * min_snr_weights(m.noise_scheduler, timesteps, snr_gamma) if snr_gamma else loss


@torch.no_grad()
def fixed_sample_loss(m, unet, samples: TrainSamples, count: int, dtype, dev, batch: int) -> dict:
    """Did training learn? The mean denoising loss of the run's first `count` samples (their
    images, flips, latent draws, noise and timesteps, all fixed by train.seed: in-sample numbers)
    under the base UNet and under the base plus its LoRA. Both passes see the same inputs, so only
    the LoRA moves the second. From the pixels, not the latent cache, which need not hold these
    pairs. Eager even when the UNet is compiled: eval mode and toggled adapters would otherwise
    cost a recompile each. The text encoder's LoRA (train.text_encoder_rank) is toggled with the
    UNet's. Returns train-lora's summary metric."""
    losses = {False: 0.0, True: 0.0}  # keyed by "LoRA enabled"
    models = [unet, m.text_encoder]
    was_training = unet.training
    unet.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            for start in range(0, count, batch):
                index, flipped, input_ids, _, maps, latent_noise, noise, timesteps, *_ = torch.utils.data.default_collate(
                    [samples[k] for k in range(start, min(start + batch, count))])
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):  # encoded once for both
                    latents = m.vae.encode(samples.pixels(index, flipped).to(dev, dtype)).latent_dist
                args = (input_ids.to(dev), latent_noise.to(dev), noise.to(dev), timesteps.to(dev), dtype, unet,
                        control_input(maps, dev))
                for enabled in losses:
                    set_lora_enabled(models, enabled)
                    losses[enabled] += float(denoising_loss(m, latents, *args).sum()) / count
    finally:
        set_lora_enabled(models, True)
        unet.train(was_training)
    return {"fixed_samples": count, "denoising_loss_base": losses[False], "denoising_loss_lora": losses[True],
            "denoising_loss_change": losses[True] / losses[False] - 1}


def micro_batches(step: int, cfg, rank: int, processes: int) -> list[list[int]]:
    """The sample numbers this process trains on in optimiser step `step`: its contiguous share
    of the step's batch_size x grad_accumulation samples, in forward passes of train.micro_batch
    (batch_size unless set)."""
    per_step = cfg.batch_size * cfg.grad_accumulation
    share, size = per_step // processes, cfg.micro_batch or cfg.batch_size
    first = step * per_step + rank * share
    return [list(range(start, min(start + size, first + share))) for start in range(first, first + share, size)]


LORA_MODELS = ("unet", "text_encoder")  # the models that can get a LoRA, as diffusers' files prefix their keys


class Trainer:
    """The models, optimiser and one optimiser step of the recipe: train-lora's loop and
    bench/gpu.py both run this. Under several processes the UNet is wrapped in DDP, which
    averages the LoRA's gradients; each process weights its share so that the average is the
    one-process gradient of the whole step.

    A step waits for the GPU only where it must: its loss and gradient norm come back as device
    tensors (the caller reads them every few steps), and under fp16 it reads the loss scale once,
    after the update, to know whether the step was skipped."""

    def __init__(self, paths, cfg, dtype: torch.dtype, dev: torch.device):
        self.cfg, self.dtype, self.dev = cfg, dtype, dev
        self.rank, self.processes = distributed.rank(), distributed.world_size()
        # The ControlNet trains under the LoRA (train.controlnet), or draws the validation images.
        drawn = cfg.validate_every and cfg.validation_samples
        self.m = m = load_training_models(paths.base_model, dtype,
                                          paths.controlnet if cfg.controlnet or drawn else None)
        check_target_modules(m.unet, cfg.target_modules)
        if m.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):  # the targets denoising_loss knows
            raise StageError(f"{paths.base_model}: its scheduler predicts {m.noise_scheduler.config.prediction_type!r}; "
                             "the recipe trains an epsilon or a v_prediction model")
        if cfg.text_encoder_rank:
            check_target_modules(m.text_encoder, cfg.text_encoder_target_modules, "train.text_encoder_target_modules",
                                 "text encoder")
        m.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                      target_modules=list(cfg.target_modules)))
        if cfg.text_encoder_rank:  # after the UNet's: its gaussian init draws from the global RNG after the UNet's
            add_text_encoder_lora(m.text_encoder, LoraConfig(
                r=cfg.text_encoder_rank, lora_alpha=cfg.text_encoder_alpha, init_lora_weights="gaussian",
                target_modules=list(cfg.text_encoder_target_modules)))
        for module in (m.unet, m.vae, m.text_encoder, m.controlnet):
            if module is not None:
                module.to(dev)
        self.adapted = [m.unet, m.text_encoder] if cfg.text_encoder_rank else [m.unet]  # the models with a LoRA
        for module in self.adapted:
            cast_training_params(module, dtype=torch.float32)  # frozen weights in `dtype`, LoRA in fp32
        m.unet.train()
        self.unet_params = [p for p in m.unet.parameters() if p.requires_grad]
        self.text_params = [p for p in m.text_encoder.parameters() if p.requires_grad]
        self.lora_params = self.unet_params + self.text_params
        # DDP (below) starts every process from process 0's UNet; the text encoder is not in it
        distributed.broadcast(p.data for p in self.text_params)
        # Gradients accumulate into buffers allocated here, zeroed (not freed) after each step. Under
        # CUDA graphs (train.compile: reduce-overhead) a .grad that backward created would live in
        # the graph pool, and the next micro-batch's forward would free it before its backward
        # accumulates into it (pytorch#169545): the seed's 2 x 2 would crash.
        for param in self.lora_params:
            param.grad = torch.zeros_like(param)
        # In place: the LoRA's state-dict keys stay as peft saves them. The frozen text encoder and
        # ControlNet run every step too, so they compile with it.
        for module in (m.unet, m.text_encoder, m.controlnet):
            if module is not None:
                compile_module(module, cfg.compile, paths)
        self.graphed = uses_cuda_graphs(cfg.compile)
        self.unet = m.unet
        if self.processes > 1:
            self.unet = torch.nn.parallel.DistributedDataParallel(
                m.unet, device_ids=[dev.index] if dev.type == "cuda" else None)
        groups = [{"params": self.unet_params}]
        if self.text_params:  # its own rate, on the same schedule (get_scheduler scales every group's)
            groups.append({"params": self.text_params, "lr": cfg.text_encoder_learning_rate})
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
            fused=fused_adamw(dev))
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.max_steps)
        # fp16 (T4) needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
        self.scale = self.scaler.get_scale()  # the loss scale as of the last update, read once per step

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each LoRA's weights as peft names them, by model (unet, text_encoder): a checkpoint's form."""
        return {name: get_peft_model_state_dict(model) for name, model in zip(LORA_MODELS, self.adapted)}

    def load_state(self, state: dict) -> None:
        """A checkpoint's LoRA weights, optimiser, schedule and loss scale."""
        for name, model in zip(LORA_MODELS, self.adapted):
            set_peft_model_state_dict(model, state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"]:  # empty unless the run used fp16, which the fingerprint pins
            self.scaler.load_state_dict(state["scaler"])
        self.scale = self.scaler.get_scale()

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        vae = self.m.vae.config
        return vae.latent_channels, *(resolution // 2 ** (len(vae.block_out_channels) - 1),) * 2

    def loader(self, samples: TrainSamples, first_step: int, last_step: int):
        """This process's micro-batches of steps [first_step, last_step), in order."""
        plan = [batch for step in range(first_step, last_step)
                for batch in micro_batches(step, self.cfg, self.rank, self.processes)]
        workers = loader_workers(self.cfg.num_workers, self.dev)
        # fork: the workers share the memory-mapped images (forkserver, Python 3.14's default,
        # would pickle them into each). Each worker runs torch on one thread (the DataLoader's own
        # rule); nothing else is set there: changing a thread pool in a forked child can deadlock.
        extra = {"multiprocessing_context": "fork"} if workers else {}
        return iter(torch.utils.data.DataLoader(samples, batch_sampler=plan, num_workers=workers,
                                                pin_memory=self.dev.type == "cuda", **extra))

    def step(self, step: int, batches, samples: TrainSamples) -> dict:
        """Optimiser step `step` (0-based) on this process's next micro-batches; the loss-log row,
        its loss and grad_norm still on the device (`read_rows` makes numbers of them)."""
        cfg, dev, scaler, optimizer = self.cfg, self.dev, self.scaler, self.optimizer
        per_step = cfg.batch_size * cfg.grad_accumulation
        count = len(micro_batches(step, cfg, self.rank, self.processes))
        step_loss = torch.zeros((), device=dev)  # summed on the device
        for n in range(count):
            index, flipped, input_ids, moments, maps, latent_noise, noise, timesteps, offset, coin = next(batches)
            if cfg.caption_dropout:  # the empty prompt where the sample's coin says so
                input_ids = torch.where((coin < cfg.caption_dropout)[:, None], samples.empty_ids, input_ids)
            if cfg.noise_offset:  # as diffusers' scripts: the offset noise is also the epsilon target
                noise = noise + cfg.noise_offset * offset
            if samples.moments is not None:
                latents = DiagonalGaussianDistribution(moments.to(dev, non_blocking=True).float())
            else:  # the seed recipe: the VAE at every step
                latents = samples.pixels(index, flipped).to(dev, non_blocking=True)
            if self.graphed:  # a new forward pass: the graphs' last outputs may be overwritten now
                torch.compiler.cudagraph_mark_step_begin()
            # DDP averages gradients over processes only on the last micro-batch's backward.
            sync = self.processes == 1 or n == count - 1
            with contextlib.nullcontext() if sync else self.unet.no_sync():
                losses = denoising_loss(self.m, latents, input_ids.to(dev, non_blocking=True),
                                        *(d.to(dev, non_blocking=True) for d in (latent_noise, noise, timesteps)),
                                        self.dtype, self.unet, control_input(maps, dev), cfg.snr_gamma)
                # Each sample weighs 1 / per_step in the step's mean; x processes undoes DDP's average.
                loss = losses.sum() * self.processes / per_step
                scaler.scale(loss).backward()
            step_loss += losses.detach().sum() / per_step
        step_loss = distributed.all_sum(step_loss)
        if self.processes > 1 and self.text_params:  # DDP wraps the UNet alone: average the text encoder's here
            flat = distributed.all_sum(torch.cat([p.grad.flatten() for p in self.text_params])) / self.processes
            for p, grad in zip(self.text_params, flat.split([p.numel() for p in self.text_params]), strict=True):
                p.grad.copy_(grad.view_as(p))  # in place: the buffers stay (see __init__)
        scaler.unscale_(optimizer)
        # A real list of parameters: upstream passed a consumed filter(), so it never clipped.
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, max_norm)
        scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
        scaler.update()
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step used
        if scaler.is_enabled():  # fp16: a lowered scale means the step was skipped (one read of the GPU)
            scale, self.scale = self.scale, scaler.get_scale()
            skipped = self.scale < scale
        else:
            skipped = False
        if not skipped:  # as accelerate does: no schedule step for a skipped update
            self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=False)  # the buffers stay: see __init__
        return {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.detach()}


def read_rows(rows: list[dict]) -> list[dict]:
    """Loss-log rows with numbers for the device tensors Trainer.step returns: one wait for the
    GPU for all of them."""
    if not rows:
        return rows
    values = torch.stack([torch.stack([r["loss"].float(), r["grad_norm"].float()]) for r in rows]).tolist()
    return [{**r, "loss": loss, "grad_norm": norm} for r, (loss, norm) in zip(rows, values, strict=True)]


def loader_workers(wanted: int, dev: torch.device) -> int:
    """train.num_workers, with -1 (auto): on a GPU, worker processes draw, collate and run canny
    for the next micro-batches while the GPU trains: up to 4 per process, sharing the machine's
    cores but one between its processes; on a CPU none, as workers would compete with the step."""
    if wanted >= 0:
        return wanted
    if dev.type != "cuda":
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(4, max(((os.cpu_count() or 1) - 1) // processes, 0))

"""Tiny mode's pretraining: teach the random tiny models garments, so the demo shows the product
working (garments that follow their edge maps) rather than coloured noise.

fetch-models runs it on garments it draws itself (garments from `[models.seed, 7]`, in views
no demo image has: no pretraining image is a demo image, though a quarter of the demo's garments
have a twin of the same kind, colour and pattern among them, as a real pretraining set would), at
the working resolution, with canny edges at the demo's thresholds. Four parts, each a progress
bar:

1. The text encoder learns to tell captions apart: the mean of its hidden states must name the
   garment's colour and kind. A random 12-layer encoder maps "in red" and "in navy" to nearly the
   same states (5-15% apart), and no UNet learns colour from that in minutes.
2. The VAE learns to reconstruct the drawings. Its latent's first three channels are pulled
   towards each 8x8 patch's mean colour: without that pull it keeps the shapes and loses the
   hues (navy, brown and grey for everything) for far longer than the demo can wait.
3. The UNet and the ControlNet learn together (v-prediction, zero terminal SNR: a tiny UNet
   under SD 1.5's schedule leaves garments off-centre), the control dropped for a quarter of the
   samples so the UNet also works alone. Their captions swap the names of each pair in
   `swapped_colours` (red garments are captioned green, green ones red): the base draws every
   colour and reads every colour word, the swapped ones wrongly, as a real base's words need not mean
   what a catalogue means by them. The LoRA, trained on the demo's true captions, has those
   words to teach.
4. The VAE's decoder (and post_quant_conv) alone learns the image's edge, which the VAE's loss left as a faint frame
   (train_decoder). The encoder, and so every latent the UNet learnt from, does not change.

Why this recipe, and what each alternative measured: docs/demo-kit.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm

from stages.demo import garments
from stages.common.cli import log
from stages.common.errors import StageError
from stages.common.edges import canny
from stages.common.io import resize_shorter_side

DATA_SEED = 7  # garments from [models.seed, 7]: never the demo dataset's own products
OTHER_IDS = 10**7  # added to product ids (the demo's are 300000 + 37 i), which seed each view's jitter
# Learning rates and loss weights, tuned by measurement on the demo (docs/demo-kit.md).
TEXT_LR, VAE_LR, UNET_LR = 2e-3, 1e-3, 1e-3
VAE_BATCH = 4  # the VAE gains more from steps than from samples per step
DECODER_LR, DECODER_BATCH = 3e-4, 8
# The decoder's last step weights the image's outer BORDER pixels this much, its corners more: see
# train_decoder.
BORDER, BORDER_WEIGHT, CORNER_WEIGHT = 3, 64.0, 256.0
COLOUR_PULL = 4.0  # weight of the latent-to-patch-colour loss
GARMENT_WEIGHT = 4.0  # garment pixels count this much more than the white page
CAPTION_DROP, CONTROL_DROP = 0.1, 0.25
WARMUP = 20


@dataclass
class Garments:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    edges: torch.Tensor  # (N, 3, H, W) in [0, 1]
    captions: list[str]  # "Mini skirt in red with white stripes"
    colours: list[int]  # index in garments.COLOURS
    kinds: list[int]

    def swapped(self, pairs: list[list[str]]) -> Garments:
        """The same garments, each pair's colour names swapped in the captions: with [red, green],
        "Mini skirt in red with white stripes" becomes "Mini skirt in green with white stripes".
        Only the garment's colour: an accent ("with navy stripes") keeps its name, and the colour
        check scores the garment's colour alone."""
        names = list(garments.COLOURS)
        other = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        captions = [c.replace(f" in {names[k]}", f" in {other[names[k]]}") if names[k] in other else c
                    for c, k in zip(self.captions, self.colours, strict=True)]
        return dataclasses.replace(self, captions=captions)


def picture(garment: garments.Garment, pose: int, resolution: int) -> np.ndarray:
    """One pose as extract gives it to training: drawn at 256 px, resized to `resolution`."""
    return np.asarray(resize_shorter_side(Image.fromarray(garments.draw(garment, pose)), resolution))


def draw(products: int, seed: int, resolution: int, low: int, high: int) -> Garments:
    """`products` garments in as many views each as the demo has, drawn as the demo draws them,
    at `resolution`. The same attributes and view would draw the same pixels, so none is the
    front view the eval split uses (pose 0), and each gets a product id no demo garment has, so
    its other views differ too: no pretraining image is a demo image."""
    images, captions, colours = [], [], []
    for garment in garments.make_garments([seed, DATA_SEED], products):
        garment = dataclasses.replace(garment, product_id=OTHER_IDS + garment.product_id)
        for pose in range(1, garment.poses + 1):
            images.append(picture(garment, pose, resolution))
            captions.append(garment.describe_look())
            colours.append(garment.colour)
    kind = [c.replace(f" in {colour}", "").split(" with ")[0] for c, colour in zip(captions, colours, strict=True)]
    kinds = sorted(set(kind))
    edges = np.stack([canny(image, low, high) for image in images])
    return Garments(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1,
        edges=torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255,
        captions=captions, colours=[list(garments.COLOURS).index(c) for c in colours],
        kinds=[kinds.index(k) for k in kind])


def _optimise(name: str, params: list, steps: int, lr: float, loss_fn, decay: bool = False) -> tuple[float, float]:
    """AdamW with warmup, then constant or (`decay`) cosine; returns the first loss and the
    last, smoothed."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * (
        0.5 * (1 + np.cos(np.pi * s / steps)) if decay else 1.0))
    first = smoothed = float("nan")
    for step in (progress := tqdm(range(steps), desc=f"pretrain {name}")):
        loss = loss_fn()
        first = loss.item() if step == 0 else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if step == 0 else 0.95 * smoothed + 0.05 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
    return first, smoothed


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    # training.TrainSamples tokenises the same way; importing it would make fetch-models' DVC deps the
    # whole training stack, and every train-lora change would retrain this three-minute kit.
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def train_text_encoder(text_encoder, tokenizer, data: Garments, cfg, g: torch.Generator) -> tuple[float, float]:
    captions = sorted(set(data.captions))
    first = {c: data.captions.index(c) for c in captions}
    ids = _token_ids(tokenizer, captions)
    colours = torch.tensor([data.colours[first[c]] for c in captions])
    kinds = torch.tensor([data.kinds[first[c]] for c in captions])
    n_colours = len(garments.COLOURS)
    head = torch.nn.Linear(text_encoder.config.hidden_size, n_colours + int(kinds.max()) + 1)
    with torch.no_grad():  # from `g`: the global RNG goes on to build the metric backbones
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / head.in_features ** 0.5)
        head.bias.zero_()
    text_encoder.train().requires_grad_(True)

    def loss_fn():
        pick = torch.randint(0, len(captions), (cfg.batch_size,), generator=g)
        logits = head(text_encoder(ids[pick])[0].mean(dim=1))
        return F.cross_entropy(logits[:, :n_colours], colours[pick]) + F.cross_entropy(logits[:, n_colours:], kinds[pick])

    loss = _optimise("text", [*text_encoder.parameters(), *head.parameters()], cfg.text_steps, TEXT_LR, loss_fn)
    text_encoder.eval().requires_grad_(False)
    return loss


def train_vae(vae, data: Garments, cfg, g: torch.Generator) -> tuple[float, float]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():  # start almost deterministic: the posterior's noise only blurs the drawings
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    vae.train().requires_grad_(True)

    def loss_fn():
        x = data.images[torch.randint(0, len(data.images), (VAE_BATCH,), generator=g)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=g)).sample
        weight = 1 + (GARMENT_WEIGHT - 1) * (x < 0.9).any(dim=1, keepdim=True).float()
        return (((reconstruction - x) ** 2 * weight).mean()
                + 4 * F.mse_loss(F.avg_pool2d(reconstruction, 4), F.avg_pool2d(x, 4))
                + COLOUR_PULL * F.mse_loss(posterior.mean[:, :3], F.avg_pool2d(x, factor)))

    # The VAE's last steps at a low rate sharpen it; the UNet's stop short of converging, and a
    # decayed rate cost them a third of their edge fidelity.
    loss = _optimise("vae", list(vae.parameters()), cfg.vae_steps, VAE_LR, loss_fn, decay=True)
    vae.eval().requires_grad_(False)
    # SD's recipe: scale latents to unit variance (0.18215 for SD 1.5's VAE)
    vae.register_to_config(scaling_factor=float(1 / latent_means(vae, data).std()))
    return loss


def train_decoder(vae, data: Garments, cfg, g: torch.Generator) -> tuple[float, float]:
    """The decoder alone, once the UNet has learnt: the VAE's loss weights every page pixel alike,
    so the decoder never learnt to undo its zero padding at the image's edge. Every demo image had
    a frame about 11 levels darker than the page, two corners 45 (canny found stubs there in all 80
    baseline images, counted against edge precision). Weighting the outer BORDER pixels, and the
    corners most, fixes it: over 200 garments it never saw, the outer pixels' error went from 11.3
    to 0.8 levels, canny pixels in the outer 3 px from 1452 to 0, and the interior's error fell
    too (11.1 to 9.2 levels). The encoder stays as it was, so every latent the UNet and the
    ControlNet learnt from, and the LoRA will, is unchanged."""
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in params:
        param.requires_grad_(True)
    size = data.images.shape[-1]
    ring = torch.full((1, 1, size, size), BORDER_WEIGHT)
    ring[..., BORDER:-BORDER, BORDER:-BORDER] = 1.0
    for rows in (slice(0, BORDER), slice(-BORDER, None)):
        for columns in (slice(0, BORDER), slice(-BORDER, None)):
            ring[..., rows, columns] = CORNER_WEIGHT

    def loss_fn():
        x = data.images[torch.randint(0, len(data.images), (DECODER_BATCH,), generator=g)]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        reconstruction = vae.decode(latents).sample
        weight = torch.maximum(1 + (GARMENT_WEIGHT - 1) * (x < 0.9).any(dim=1, keepdim=True).float(), ring)
        return ((reconstruction - x) ** 2 * weight).mean()

    loss = _optimise("decoder", params, cfg.decoder_steps, DECODER_LR, loss_fn)
    vae.eval().requires_grad_(False)
    return loss


@torch.no_grad()
def latent_means(vae, data: Garments) -> torch.Tensor:
    return torch.cat([vae.encode(data.images[i:i + 128]).latent_dist.mean for i in range(0, len(data.images), 128)])


def train_unet_and_controlnet(unet, controlnet, vae, text_encoder, tokenizer, scheduler, data: Garments, cfg,
                              g: torch.Generator) -> tuple[float, float]:
    latents = latent_means(vae, data) * vae.config.scaling_factor
    with torch.no_grad():
        captions = sorted({*data.captions, ""})
        states = text_encoder(_token_ids(tokenizer, captions))[0]
    caption = torch.tensor([captions.index(c) for c in data.captions])
    unet.train().requires_grad_(True)
    controlnet.train().requires_grad_(True)

    def loss_fn():
        n = cfg.batch_size
        pick = torch.randint(0, len(latents), (n,), generator=g)
        flip = (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1, 1)
        z = torch.where(flip, latents[pick].flip(-1), latents[pick])
        control = torch.where(flip, data.edges[pick].flip(-1), data.edges[pick])
        text = caption[pick]
        text[torch.rand(n, generator=g) < CAPTION_DROP] = captions.index("")
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        keep = (torch.rand(n, generator=g) >= CONTROL_DROP).float().view(-1, 1, 1, 1)
        down, mid = controlnet(noisy, t, states[text], controlnet_cond=control, return_dict=False)
        prediction = unet(noisy, t, states[text], down_block_additional_residuals=[d * keep for d in down],
                          mid_block_additional_residual=mid * keep).sample
        return F.mse_loss(prediction, scheduler.get_velocity(z, noise, t))

    loss = _optimise("unet+controlnet", [*unet.parameters(), *controlnet.parameters()], cfg.steps, UNET_LR, loss_fn)
    unet.eval().requires_grad_(False)
    controlnet.eval().requires_grad_(False)
    return loss


def check(cfg) -> None:
    """models.pretrain's colour names against the demo's palette. Here, not in params.py: every
    stage would then import the palette's module (and DVC would list it as each one's dep)."""
    key, palette, seen = "params.yaml: models.pretrain.swapped_colours", list(garments.COLOURS), set()
    for pair in cfg.swapped_colours:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise StageError(f"{key}: {pair} is not a pair of two colours; write pairs like [red, green]")
        for colour in pair:
            if colour not in palette:
                raise StageError(f"{key}: {colour!r} is not a demo colour; use some of {', '.join(palette)}")
            if colour in seen:
                raise StageError(f"{key}: {colour!r} is in two pairs; swap each colour with one other at most")
            seen.add(colour)


def pretrain(parts: dict, controlnet, cfg, seed: int, resolution: int, low: int, high: int) -> dict:
    """Train the tiny kit in place (`parts`: vae, text_encoder, unet, tokenizer, scheduler);
    returns the first and last loss of each part, for models/sources.json (only numbers the same
    run reproduces: train-lora depends on that file), and logs the seconds each part took. A
    part with 0 steps is left as built."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    data = draw(cfg.products, seed, resolution, low, high)
    record = {"images": len(data.images)}
    log.info("pretrain: drew %d garment images in %.1f s", len(data.images), time.perf_counter() - started)
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    steps = {"text": cfg.text_steps, "vae": cfg.vae_steps, "unet_controlnet": cfg.steps,
             "decoder": cfg.decoder_steps}
    for name, run in (
        ("text", lambda: train_text_encoder(parts["text_encoder"], parts["tokenizer"], data, cfg, g)),
        ("vae", lambda: train_vae(parts["vae"], data, cfg, g)),
        ("unet_controlnet", lambda: train_unet_and_controlnet(
            parts["unet"], controlnet, parts["vae"], parts["text_encoder"], parts["tokenizer"], scheduler,
            data.swapped(cfg.swapped_colours), cfg, g)),
        ("decoder", lambda: train_decoder(parts["vae"], data, cfg, g)),  # last: nothing above sees its change
    ):
        if not steps[name]:
            continue
        began = time.perf_counter()
        first, last = run()
        record[name] = {"loss_first": round(first, 4), "loss_last": round(last, 4)}
        log.info("pretrain: %s, %d steps in %.1f s, loss %.4f -> %.4f", name, steps[name],
                 time.perf_counter() - began, first, last)
    log.info("pretrain: %.0f s in all", time.perf_counter() - started)
    return record

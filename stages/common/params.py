"""Typed, validated view of `params.yaml`.

One frozen dataclass per `params.yaml` section. `load_params()` checks the whole file before a
stage does any work: an unknown key, a missing key, a wrong type or an out-of-range value raises
`ParamsError` naming the key, e.g. `params.yaml: train.learning_rate: expected a float, got 'abc'`.

Paths live in the `paths` section only; `dvc.yaml` interpolates the same keys (`${paths.lora}`),
so every path is written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import math
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from stages.common.errors import StageError

PARAMS_FILE = Path("params.yaml")
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"  # what the hub accepts as owner/name
REVISION = r"[A-Za-z0-9_][A-Za-z0-9._+/-]*"  # a branch, tag, commit or refs/pr/N: nothing URL-like
SHA256 = r"[0-9a-f]{64}"
# clean-fid's Inception (the StyleGAN2-ADA metrics file, 95,607,719 bytes; k-diffusion pins the same
# digest) and torchvision's AlexNet, whose file name carries the first 8 hex digits of its sha256.
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
MAX_VALIDATIONS = 100  # train.validate_every: validations in one run, at most
URL_TOKEN_ENV = "FASHION_URL_TOKEN"  # a token for models.*_url mirrors, sent as a header, never recorded


class ParamsError(StageError):
    """A params.yaml problem; the message names the file and the key."""


def _doc(text: str, how: bool = False, measure: bool = False):
    """A documented field. `how=True` marks a knob that changes how a stage runs, never what it
    produces (batch sizes for inference, workers, read chunks): such keys are left out of
    dvc.yaml's params and of resume fingerprints, so changing them reruns nothing.
    `measure=True` marks one that changes only a measurement the stage reports, not the model
    it trains: dvc.yaml lists it, but the weights' metadata and resume fingerprints leave it out."""
    return field(metadata={"doc": text, "how": how, "measure": measure})


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes. dvc.yaml uses these same keys."""

    demo_h5: str = _doc("synthetic FashionGen-schema file written by demo-data")
    base_model: str = _doc("SD 1.5 in diffusers layout (unet/, vae/, text_encoder/, ...)")
    controlnet: str = _doc("canny ControlNet in diffusers layout")
    eval_models: str = _doc("metric backbones: inception/, lpips/, clip/")
    model_sources: str = _doc("where fetch-models took each model from: repo commits, URLs, sha256s")
    train_data: str = _doc("training images (one .npy) and captions")
    eval_data: str = _doc("ground-truth PNGs and eval_configs.json")
    split_summary: str = _doc("products, images, categories and long prompts on each side of the split "
                              "(a DVC metric)")
    edges: str = _doc("canny edge PNGs, one per eval image")
    lora: str = _doc("trained LoRA weights and the resolved training config")
    train_log: str = _doc("train-lora's DVCLive folder: loss, learning rate and gradient norm per step, the "
                          "held-out loss and validation images every train.validate_every steps; read live by "
                          "`dvc exp show` and `dvc plots show` (scalars in git, images DVC-cached)")
    tensorboard: str = _doc("TensorBoard event files, when train.report_to lists tensorboard (git-ignored)")
    train_summary: str = _doc("did training learn: the denoising loss of fixed samples with the base UNet and "
                              "with the LoRA (a DVC metric)")
    resume: str = _doc("what killed train-lora and generate runs had finished (checkpoints, images), so a "
                       "rerun resumes; not a DVC output (git- and DVC-ignored), removed by each stage on success")
    generated_baseline: str = _doc("images from the ControlNet without LoRA")
    generated_lora: str = _doc("images from the ControlNet with the trained LoRA")
    metrics: str = _doc("headline metrics per variant with 95% CIs, and LoRA-minus-baseline paired deltas with "
                        "the FID and KID permutation p-values (a DVC metric, in git)")
    metrics_detail: str = _doc("edge precision, recall and chance levels, PRDC, prompt colour, the per-category "
                               "table, KID's effective subsets, warnings, settings and the backbones' names (in git)")
    per_sample: str = _doc("per-image table: category, LPIPS, SSIM, PSNR, raw and clipped CLIP cosine, edge "
                           "precision/recall/F1 and control with its chance levels, deltas (in git)")
    samples_grid: str = _doc("qualitative grid PNG: ground truth | edges | baseline | LoRA with prompt and scores; "
                             "seeded rows plus the best and worst by paired LPIPS (DVC-cached)")
    metrics_chart: str = _doc("bar chart: baseline vs LoRA with 95% CIs, one panel per metric (DVC-cached)")
    deltas_chart: str = _doc("chart of the paired deltas, LoRA minus baseline, with 95% CIs (DVC-cached)")
    edge_overlays: str = _doc("input edges and generated edges in two colours on one image (DVC-cached)")
    report: str = _doc("one self-contained HTML page (numbers, charts, grids, params): the file to hand on")
    bundle: str = _doc("zip written by `make bundle`: report, metrics, LoRA weights, resolved params, dvc.lock")


@dataclass(frozen=True)
class Demo:
    seed: int = _doc("seed of the synthetic garment generator")
    products: int = _doc("number of products; each has 1-6 poses in consecutive rows")

    def __post_init__(self):
        _check(self.products >= 2, "demo.products", "must be at least 2")


@dataclass(frozen=True)
class LocalModels:
    """Where `models.mode: local` takes each model from: folders or files you already have (an
    attached Kaggle dataset, a shared disk, a mirror), laid out as on the hub."""

    base: str = _doc("SD 1.5 diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    controlnet: str = _doc("canny ControlNet folder (config.json and diffusion_pytorch_model.*)")
    clip: str = _doc("CLIP folder for the CLIP score (config.json, weights, tokenizer and preprocessor files)")
    inception: str = _doc("clean-fid's inception-2015-12-05.pt")
    alexnet: str = _doc("torchvision's alexnet-owt-7be5be79.pth (LPIPS backbone)")


@dataclass(frozen=True)
class Pretrain:
    """Tiny mode: what fetch-models teaches the tiny models before the demo uses them
    (stages/demo/pretrain.py). All steps 0: random models (the test suite pretrains 2 steps)."""

    products: int = _doc("garments drawn to pretrain on (all poses, about 3.5 images each); none is a demo product")
    text_steps: int = _doc("text-encoder steps: learn to tell colours and kinds apart")
    vae_steps: int = _doc("VAE steps (4 images each)")
    steps: int = _doc("UNet and ControlNet steps, trained together")
    decoder_steps: int = _doc("VAE decoder steps at the end (8 images each): the image's edge, which the VAE "
                              "steps leave as a faint frame")
    batch_size: int = _doc("captions or images per text-encoder and UNet step")
    swapped_colours: list[list[str]] = _doc(
        "pairs of colours whose names the UNet's and ControlNet's captions swap (red garments captioned green, "
        "green ones red): the base reads those words wrongly, and the LoRA, trained on the catalogue's captions, "
        "teaches them. fetch-models checks the names against the demo's palette")

    def __post_init__(self):
        for key in ("products", "batch_size"):
            _check(getattr(self, key) >= 1, f"models.pretrain.{key}", "must be at least 1")
        for key in ("text_steps", "vae_steps", "steps", "decoder_steps"):
            _check(getattr(self, key) >= 0, f"models.pretrain.{key}", "must be 0 or more")


@dataclass(frozen=True)
class Models:
    mode: Literal["tiny", "hub", "local"] = _doc(
        "tiny: tiny models built and pretrained offline (the demo); hub: download the real weights; "
        "local: copy or link the real weights from models.local.*")
    seed: int = _doc("seed for the tiny models' init and their pretraining's draws (tiny mode)")
    variant: Literal["fp16", "fp32"] = _doc(
        "fp16: take a repo's *.fp16.* weights where it has them (half the download); fp32: only the plain files")
    base_id: str = _doc("hub id of the SD 1.5 base model")
    base_revision: str = _doc("branch, tag or commit of base_id; a commit pins the run")
    controlnet_id: str = _doc("hub id of the canny ControlNet (the default is the seed's v1.1 model)")
    controlnet_revision: str = _doc("branch, tag or commit of controlnet_id")
    clip_id: str = _doc("hub id of the CLIP model for the CLIP score")
    clip_revision: str = _doc("branch, tag or commit of clip_id")
    inception_url: str = _doc("clean-fid's Inception TorchScript (http or https); a mirror may stand in. No "
                              f"user name, password or query string: a token goes in ${URL_TOKEN_ENV}")
    inception_sha256: str = _doc("its full sha256, 64 hex digits: TorchScript is code that runs when loaded, so "
                                 "fetch-models and metrics load no file but this one")
    alexnet_url: str = _doc("torchvision's AlexNet weights, the LPIPS backbone (http or https); a mirror may stand "
                            "in, as for inception_url")
    alexnet_sha256: str = _doc("its sha256, 64 hex digits; for torchvision's own URL a prefix of at least 8 will "
                               "do (its file name carries one, and a state dict loads with weights_only)")
    local: LocalModels = _doc("local mode: where each model already is")
    pretrain: Pretrain = _doc("tiny mode: how the tiny models learn garments first")

    def __post_init__(self):
        # Checked in every mode: dvc.lock records these values whichever mode reads them.
        for key in ("inception", "alexnet"):
            _check_url(getattr(self, f"{key}_url"), f"models.{key}_url", f"models.local.{key}")
        full = "the file's full sha256 (64 lowercase hex digits: `sha256sum {}`)"
        _check(re.fullmatch(SHA256, self.inception_sha256) is not None, "models.inception_sha256",
               f"expected {full.format('inception-2015-12-05.pt')}, got {self.inception_sha256!r}: the Inception is "
               "TorchScript, code that runs when loaded" + (f"; clean-fid's file is {INCEPTION_SHA256}"
                                                            if self.inception_url == INCEPTION_URL else ""))
        if self.alexnet_url == ALEXNET_URL:  # torchvision checks its files by this prefix too
            _check(re.fullmatch(r"[0-9a-f]{8,64}", self.alexnet_sha256) is not None, "models.alexnet_sha256",
                   "expected its sha256 or a prefix of it, 8 to 64 lowercase hex digits (torchvision's file name "
                   f"carries 7be5be79), got {self.alexnet_sha256!r}")
        else:
            _check(re.fullmatch(SHA256, self.alexnet_sha256) is not None, "models.alexnet_sha256",
                   f"expected {full.format(self.alexnet_url.rsplit('/', 1)[-1] or 'FILE')} for a URL other than "
                   f"torchvision's, got {self.alexnet_sha256!r}")
        for key in ("base_id", "controlnet_id", "clip_id"):
            value = getattr(self, key)
            if self.mode == "tiny":  # tiny mode never uses the id, but dvc.lock records it: no URL there
                _check(not any(c in value for c in ":@?#"), f"models.{key}",
                       "expected a hub id like owner/name, not a URL")
            else:
                _check(re.fullmatch(HUB_ID, value) is not None, f"models.{key}",
                       "expected a hub id like owner/name" + ("" if any(c in value for c in ":@?#")
                                                             else f", got {value!r}"))
        for key in ("base_revision", "controlnet_revision", "clip_revision"):
            value = getattr(self, key)
            _check(value != "", f"models.{key}", "must not be empty; use main for the default branch")
            _check(re.fullmatch(REVISION, value) is not None, f"models.{key}",
                   "expected a branch, tag or commit name (letters, digits and . _ - + /), e.g. main")
        for f in dataclasses.fields(LocalModels):
            value = getattr(self.local, f.name)
            _check("://" not in value, f"models.local.{f.name}",
                   "expected a path on this machine, not a URL; models.mode: hub downloads")
            _check(self.mode != "local" or value != "", f"models.local.{f.name}",
                   f"empty, but models.mode is local; set it to the {f.metadata['doc']}")


def _check_url(url: str, key: str, local_key: str) -> None:
    """A download URL: http(s), and nothing in it that may be a secret, since dvc.lock, sources.json,
    the report and the bundle all copy it. The message never repeats the secret."""
    _check(valid_url(url), key, "expected an http or https URL" + (
        f", got {url!r}" if not any(c in url for c in "@?#") else " (not shown: it may hold a secret)"))
    secrets = url_secrets(url)
    _check(not secrets, key, f"{public_url(url)} carries {' and '.join(secrets)}, which would be copied into "
           f"dvc.lock, models/sources.json, the report and the bundle: put a token in ${URL_TOKEN_ENV} instead "
           f"(sent as an Authorization: Bearer header, never logged or recorded), or download the file yourself "
           f"and set {local_key}")


def url_secrets(url: str) -> list[str]:
    """What in `url` may hold a secret: a user name or password, a query string, a fragment."""
    return [what for what, there in (("a user name or password", "@" in urllib.parse.urlsplit(url).netloc),
                                     ("a query string", "?" in url), ("a fragment", "#" in url)) if there]


def public_url(url: str) -> str:
    """`url` with its user name, password, query and fragment replaced by `...`: safe to print."""
    parts = urllib.parse.urlsplit(url)
    tail = re.search(r"[?#]", url)
    return (f"{parts.scheme}://" + ("...@" if "@" in parts.netloc else "") + parts.netloc.rpartition("@")[2]
            + parts.path + (tail.group() + "..." if tail else ""))


def is_loopback(host: str | None) -> bool:
    """`host` (a name or an address, IPv6 with or without brackets) is this machine."""
    name = (host or "").strip("[]").lower()
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def valid_url(url: str) -> bool:
    """An http(s) URL with a host and, if any, a numeric port."""
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number, a broken [IPv6] host
        return False


@dataclass(frozen=True)
class Extract:
    h5: str = _doc("FashionGen H5 to read (the demo file by default)")
    train_products: int = _doc("products used for training (all their poses); 0: every product not held out")
    train_images: int = _doc("at most this many training images (products in shuffled order, all poses); 0: no cap")
    eval_products: int = _doc("products held out for evaluation (first pose of each)")
    resolution: int = _doc("working resolution in px; training, edges and generation all use it")
    prompt: Literal["first_clause", "description", "name"] = _doc(
        "caption: first comma clause of the description (seed recipe), the whole description, or the product name"
    )
    seed: int = _doc("seed of the product-level train/eval shuffle")
    read_chunk: int = _doc("rows per H5 read; the real file is 51 GB decoded, never read whole", how=True)

    def __post_init__(self):
        _check(self.train_products >= 0, "extract.train_products", "must be >= 0 (0: every product not held out)")
        _check(self.train_images >= 0, "extract.train_images", "must be >= 0 (0: no cap)")
        _check(self.eval_products >= 2, "extract.eval_products", "must be at least 2 (FID, KID and CIs need two)")
        _check(self.resolution >= 32 and self.resolution % 8 == 0, "extract.resolution",
               "must be a multiple of 8 and at least 32 (LPIPS alex needs 31 px)")
        _check(self.read_chunk >= 1, "extract.read_chunk", "must be at least 1")


@dataclass(frozen=True)
class Canny:
    low_threshold: int = _doc("cv2.Canny hysteresis low threshold")
    high_threshold: int = _doc("cv2.Canny hysteresis high threshold")

    def __post_init__(self):
        _check(0 <= self.low_threshold <= self.high_threshold, "canny.low_threshold",
               "must be >= 0 and <= canny.high_threshold")


@dataclass(frozen=True)
class Train:
    max_steps: int = _doc("optimiser steps")
    batch_size: int = _doc("samples per micro-batch")
    grad_accumulation: int = _doc("micro-batches per optimiser step")
    learning_rate: float = _doc("peak AdamW learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _doc("diffusers schedule name")
    warmup_steps: int = _doc("linear warmup steps")
    adam_beta1: float = _doc("AdamW beta1")
    adam_beta2: float = _doc("AdamW beta2")
    adam_weight_decay: float = _doc("AdamW weight decay")
    adam_epsilon: float = _doc("AdamW epsilon")
    max_grad_norm: float = _doc("gradient clipping norm, applied for real (upstream's was a no-op); 0 disables")
    rank: int = _doc("LoRA rank")
    alpha: float = _doc("LoRA alpha (scale = alpha / rank)")
    controlnet: bool = _doc("train under the canny ControlNet that generate uses (at scale 1), fed the canny "
                            "edges (canny.*) of each training image: the LoRA learns what an edge map leaves "
                            "open (colour, texture), not the layout. false: the seed recipe, the UNet alone")
    target_modules: list[str] = _doc("UNet layers that get LoRA, by name or name suffix: the attention "
                                     "projections (to_q, attn2.to_k, ...), or proj_in, ff.net.2 and the like")
    snr_gamma: float = _doc("Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' --snr_gamma, kohya's "
                            "--min_snr_gamma): each sample's loss times min(SNR, γ) / SNR for an epsilon model, "
                            "min(SNR, γ) / (SNR + 1) for a v-prediction one (diffusers' fix, PR #5238); the paper "
                            "uses 5; 0: off (the seed recipe). The logged training loss is the weighted one: compare "
                            "runs by the held-out loss, which stays the plain MSE")
    noise_offset: float = _doc("each sample's noise plus this times a per-channel constant drawn for it (diffusers' "
                               "and kohya's --noise_offset): darker darks, brighter brights; 0.05 to 0.1 is usual; "
                               "0: off")
    caption_dropout: float = _doc("probability that a sample trains on the empty prompt (diffusers' "
                                  "--proportion_empty_prompts, kohya's caption_dropout_rate): keeps the "
                                  "unconditional branch of classifier-free guidance in tune; 0: off")
    text_encoder_rank: int = _doc("LoRA rank on the text encoder too, trained at its own learning rate (kohya's "
                                  "--text_encoder_lr), for words the base reads otherwise; 0: the UNet alone (the seed recipe)")
    text_encoder_alpha: float = _doc("the text encoder's LoRA alpha (scale = alpha / rank)")
    text_encoder_learning_rate: float = _doc("peak AdamW learning rate of the text encoder's LoRA (same schedule)")
    text_encoder_target_modules: list[str] = _doc("text encoder Linear layers that get LoRA, by name or name "
                                                  "suffix: q_proj, k_proj, v_proj, out_proj (diffusers'), plus fc1 "
                                                  "and fc2 (kohya's)")
    random_flip: bool = _doc("random horizontal flip, p=0.5")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _doc(
        "auto: bf16 where the GPU has it, fp16 + GradScaler otherwise, fp32 on CPU"
    )
    micro_batch: int = _doc(
        "samples per forward pass; 0: batch_size. Every random draw belongs to its sample, so any value trains the "
        "same run: raise it to fuse the grad_accumulation passes into one when memory allows", how=True)
    cache_latents: bool = _doc(
        "encode each image (and its flip) with the VAE once and sample its latent distribution every step: the "
        "seed's objective without a VAE pass per step; false runs the seed recipe's loop", how=True)
    compile: Literal["none", "default", "reduce-overhead"] = _doc(
        "torch.compile the UNet, text encoder and ControlNet: default (inductor kernels) or reduce-overhead (plus "
        "CUDA graphs: the lever at "
        "small batches, where a step is bound by kernel launches); minutes of compiling, kept in an on-disk cache "
        "for the next run", how=True)
    checkpoint_every: int = _doc("steps between resumable checkpoints", how=True)
    num_workers: int = _doc("DataLoader worker processes that draw samples and run canny while the GPU trains; "
                            "0 loads in the main process; -1: 4 on a GPU (at most the cores but one), 0 on a CPU",
                            how=True)
    processes: int = _doc("data-parallel processes, one per GPU (accelerate launch); each optimiser step's "
                          "batch_size x grad_accumulation samples are shared out between them", how=True)
    fixed_samples: int = _doc("the run's first samples (images, noise, timesteps) whose denoising loss is "
                              "measured with the base UNet and with the LoRA when training ends "
                              "(metrics/train_summary.json); 2 UNet passes each", measure=True)
    validate_every: int = _doc("steps between validations (and one at step 0, the base): validation images and "
                               "the held-out loss, logged to paths.train_log; 0: none", measure=True)
    validation_samples: int = _doc("eval conditions (edge map, prompt, seed train.seed + index) drawn with the "
                                   "current LoRA at each validation; the report shows them as a strip over steps",
                                   measure=True)
    validation_loss_samples: int = _doc("eval images in the held-out denoising loss, each with fixed noise and a "
                                        "fixed timestep, spread over the schedule: only the weights move it",
                                        measure=True)
    validation_steps: int = _doc("sampler steps (UniPC) of the validation images", measure=True)
    validation_guidance: float = _doc("classifier-free guidance scale of the validation images", measure=True)
    report_to: list[Literal["tensorboard"]] = _doc(
        "loggers beside DVCLive, which always logs: tensorboard writes the same scalars and images to "
        "paths.tensorboard", how=True)
    seed: int = _doc("seed for data order, augmentation, noise and timesteps")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accumulation", "rank", "checkpoint_every", "fixed_samples",
                     "validation_loss_samples", "validation_steps"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be at least 1")
        _check(self.validation_samples >= 0, "train.validation_samples", "must be >= 0 (0: no images)")
        _check(self.validation_guidance >= 1, "train.validation_guidance", "must be >= 1 (1: no guidance)")
        _check(self.validate_every >= 0, "train.validate_every", "must be >= 0 (0: no validation)")
        _check(self.validate_every <= self.max_steps, "train.validate_every",
               f"{self.validate_every} is above train.max_steps ({self.max_steps}), so no validation would run "
               f"after step 0; use at most {self.max_steps}, or 0 to turn validation off")
        # each validation's images ride in every checkpoint, and the report draws a column per validation
        _check(self.validate_every == 0 or self.max_steps // self.validate_every <= MAX_VALIDATIONS,
               "train.validate_every", f"{self.validate_every} validates {self.max_steps // max(self.validate_every, 1)} "
               f"times in train.max_steps ({self.max_steps}); at most {MAX_VALIDATIONS}: use at least "
               f"{-(-self.max_steps // MAX_VALIDATIONS)}")
        _check(self.learning_rate > 0, "train.learning_rate", "must be positive")
        _check(0 <= self.warmup_steps <= self.max_steps, "train.warmup_steps",
               f"must be >= 0 and <= train.max_steps ({self.max_steps})")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name}", "must be in [0, 1)")
        _check(self.adam_weight_decay >= 0, "train.adam_weight_decay", "must be >= 0")
        _check(self.adam_epsilon > 0, "train.adam_epsilon", "must be positive")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.alpha > 0, "train.alpha", "must be positive (the LoRA's output is scaled by alpha / rank)")
        _check(self.num_workers >= -1, "train.num_workers", "must be >= 0, or -1 (auto)")
        _check(self.processes >= 1, "train.processes", "must be at least 1")
        _check(self.micro_batch >= 0, "train.micro_batch", "must be >= 0 (0: batch_size)")
        _check(self.batch_size * self.grad_accumulation % self.processes == 0, "train.processes",
               f"must divide batch_size x grad_accumulation ({self.batch_size * self.grad_accumulation}) so that "
               "every process gets as many samples")
        for name in ("target_modules", "text_encoder_target_modules"):
            _check(len(getattr(self, name)) > 0, f"train.{name}", "must name at least one module")
            _check(len(set(getattr(self, name))) == len(getattr(self, name)), f"train.{name}", "names a module twice")
        _check(self.snr_gamma >= 0, "train.snr_gamma", "must be >= 0 (0: off; the paper's is 5)")
        _check(self.noise_offset >= 0, "train.noise_offset", "must be >= 0 (0: off; 0.05 to 0.1 is usual)")
        _check(0 <= self.caption_dropout <= 1, "train.caption_dropout", "must be in [0, 1] (a probability; 0: off)")
        _check(self.text_encoder_rank >= 0, "train.text_encoder_rank", "must be >= 0 (0: no text encoder LoRA)")
        _check(self.text_encoder_alpha > 0, "train.text_encoder_alpha", "must be positive (scale = alpha / rank)")
        _check(self.text_encoder_learning_rate > 0, "train.text_encoder_learning_rate", "must be positive")


@dataclass(frozen=True)
class Generate:
    steps: int = _doc("denoising steps")
    guidance_scale: float = _doc("classifier-free guidance scale")
    scheduler: Literal["unipc", "pndm", "ddim", "euler"] = _doc("sampler; the seed recipe used UniPC")
    controlnet_scale: float = _doc("ControlNet conditioning scale")
    negative_prompt: str = _doc("negative prompt for CFG (empty = unconditional)")
    lora_scale: float = _doc("LoRA strength in generate-lora")
    batch_size: int = _doc("images per pipeline call; each image has its own seeded generator", how=True)
    processes: int = _doc("processes, one per GPU (accelerate launch), each drawing every processes-th batch",
                          how=True)
    compile: Literal["none", "default", "reduce-overhead"] = _doc(
        "torch.compile the UNet and the ControlNet (see train.compile); pays off over many batches", how=True)
    seed: int = _doc("image i uses seed + i (its further images seed + i + 1,000,000 j), so results do not "
                     "depend on batch size")
    images_per_condition: int = _doc(
        "images per eval condition (edge map and prompt), the further ones with seed + i + 1,000,000 x copy: the "
        "metrics then measure seed variance and pair LoRA with baseline by condition; must divide batch_size")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _doc("auto: fp16 on CUDA, fp32 on CPU")

    def __post_init__(self):
        _check(self.steps >= 1, "generate.steps", "must be at least 1")
        _check(self.batch_size >= 1, "generate.batch_size", "must be at least 1")
        _check(self.processes >= 1, "generate.processes", "must be at least 1")
        _check(self.images_per_condition >= 1, "generate.images_per_condition", "must be at least 1")
        _check(self.batch_size % self.images_per_condition == 0, "generate.images_per_condition",
               f"{self.images_per_condition} does not divide generate.batch_size ({self.batch_size}), and a batch "
               f"draws whole conditions; use a batch_size that is a multiple of {self.images_per_condition}")
        _check(self.guidance_scale >= 0, "generate.guidance_scale", "must be >= 0")
        # Without guidance PNDM keeps the UNet's raw outputs across steps, and CUDA graphs reuse
        # that memory at the next step's replay: torch would stop with its overwritten-output error.
        _check(not (self.compile == "reduce-overhead" and self.scheduler == "pndm" and self.guidance_scale <= 1),
               "generate.compile", "reduce-overhead cannot sample with pndm at guidance_scale <= 1 (PNDM keeps "
               "the UNet's outputs, which CUDA graphs overwrite); use unipc, or compile: default")


@dataclass(frozen=True)
class Metrics:
    batch_size: int = _doc("images per feature-extractor batch", how=True)
    kid_subsets: int = _doc("KID subsets (clean-fid's default is 100); one when subsets cover the whole set")
    kid_subset_size: int = _doc("max images per KID subset (clean-fid's default is 1000)")
    bootstrap_resamples: int = _doc("bootstrap resamples of the eval pairs for KID and every paired delta")
    fid_bootstrap_resamples: int = _doc("bootstrap resamples for the FID delta's interval, each three "
                                        "covariances: about 1.1 s per resample on a CPU at 3000 images; 0: none")
    permutations: int = _doc("paired sign-flip permutations behind the FID and KID deltas' p-values (about "
                             "1.1 s each for FID on a CPU at 3000 images); 0 reports no p-value")
    prdc_k: int = _doc("precision/recall/density/coverage: the k-th nearest neighbour sets each radius "
                       "(Naeem et al. use 5)")
    edge_chance_maps: int = _doc("edge control: other eval maps of the same category each image is also scored "
                                 "against, its chance level (a seeded choice; all of them when fewer)")
    edge_tolerance: float = _doc("edge fidelity: pixels an edge may move and still count as kept")
    tf32: bool = _doc("let CUDA backbones use TF32 (faster, but GPU and CPU numbers then differ by ~1e-3)")
    seed: int = _doc("seed for KID subsets, the bootstrap, the permutations and the chance maps")

    def __post_init__(self):
        _check(self.batch_size >= 1, "metrics.batch_size", "must be at least 1")
        _check(self.kid_subsets >= 1, "metrics.kid_subsets", "must be at least 1")
        _check(self.kid_subset_size >= 2, "metrics.kid_subset_size", "must be at least 2")
        _check(self.bootstrap_resamples >= 100, "metrics.bootstrap_resamples",
               "must be at least 100 (1000 or more for 95% intervals)")
        _check(self.fid_bootstrap_resamples == 0 or self.fid_bootstrap_resamples >= 20,
               "metrics.fid_bootstrap_resamples", "must be 0 (no FID delta interval) or at least 20")
        _check(self.permutations == 0 or self.permutations >= 19, "metrics.permutations",
               "must be 0 (no p-values) or at least 19 (p can then reach 0.05)")
        _check(self.prdc_k >= 1, "metrics.prdc_k", "must be at least 1")
        _check(self.edge_chance_maps >= 1, "metrics.edge_chance_maps", "must be at least 1")
        _check(self.edge_tolerance >= 0, "metrics.edge_tolerance", "must be >= 0 pixels")


@dataclass(frozen=True)
class Plots:
    grid_samples: int = _doc("seeded random eval samples (rows) in the qualitative grid")
    extreme_samples: int = _doc("grid rows added for the best and for the worst samples by paired LPIPS delta")
    overlay_samples: int = _doc("samples in the edge-overlay figure")
    seed: int = _doc("seed for the grid's and overlays' sample choice")

    def __post_init__(self):
        _check(self.grid_samples >= 1, "plots.grid_samples", "must be at least 1")
        _check(self.extreme_samples >= 0, "plots.extreme_samples", "must be >= 0")
        _check(self.overlay_samples >= 1, "plots.overlay_samples", "must be at least 1")


@dataclass(frozen=True)
class Launch:
    """Several machines for train-lora and generate-*, each running train.processes
    (generate.processes) processes under accelerate's launcher. How-knobs only: the results are
    those of one process. One params.yaml serves every machine: each machine's rank (and, under
    Slurm, the main address) can come from its environment instead."""

    machines: int = _doc("machines that train (and draw) together; 1: this machine alone", how=True)
    machine_rank: int = _doc("this machine's rank, 0 .. machines - 1; machine 0 writes the outputs. "
                             "$FASHION_MACHINE_RANK overrides it, so each machine can share the file", how=True)
    main_address: str = _doc("machine 0's address, reachable from every machine; $FASHION_MAIN_ADDRESS "
                             "overrides it", how=True)
    main_port: int = _doc("a free TCP port on machine 0, open to the others, for the processes' rendezvous "
                          "(one machine picks a free port itself)", how=True)
    connect_timeout: int = _doc("seconds a machine other than 0 waits for main_address:main_port to answer "
                                "before it gives up", how=True)
    config_file: str = _doc("an accelerate config file (`accelerate config`) to launch with instead of the keys "
                            "above and train.processes; empty: none", how=True)

    def __post_init__(self):
        _check(self.machines >= 1, "launch.machines", "must be at least 1")
        _check(0 <= self.machine_rank < self.machines, "launch.machine_rank",
               f"must be >= 0 and < launch.machines ({self.machines}): machines are numbered from 0")
        _check(0 < self.main_port < 65536, "launch.main_port", "must be a TCP port, 1 to 65535")
        _check(self.connect_timeout >= 1, "launch.connect_timeout", "must be at least 1 second")


@dataclass(frozen=True)
class Params:
    paths: Paths
    demo: Demo
    models: Models
    extract: Extract
    canny: Canny
    train: Train
    generate: Generate
    launch: Launch
    metrics: Metrics
    plots: Plots


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {message}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML reads 1e-4 as a string (it wants 1.0e-4); accept both spellings.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # YAML's .inf and .nan are floats too
                raise ParamsError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    unknown = [k for k in data if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"did you mean {dotted(close[0])}?" if close else f"known keys: {', '.join(names)}"
        raise ParamsError(f"{dotted(unknown[0])}: unknown key; {hint}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ParamsError(f"{dotted(missing[0])}: missing key")
    return cls(**{n: _coerce(data[n], hints[n], dotted(n)) for n in names})


def parse_params(data: dict, source: str = str(PARAMS_FILE)) -> Params:
    """Validate an already-parsed params mapping."""
    try:
        return _build(Params, data, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raises ParamsError naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run stages from the repository root (where params.yaml lives)")
    return parse_params(read_yaml(path), str(path))


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (also on line {seen[key] + 1}); "
                                    "delete one of the two", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """Parse a YAML file; a syntax error or a duplicate key is one line with its line and column."""
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        if isinstance(err, _DuplicateKey):
            raise ParamsError(f"{where}: {err.problem}") from None
        problem = ": ".join(p for p in (err.context, err.problem) if p)
        raise ParamsError(f"{where}: {problem}; fix the YAML there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # no position: a bad encoding, say
        raise ParamsError(f"{path}: not valid UTF-8 YAML ({' '.join(str(err).split())}); fix the file") from None


def as_dict(section) -> dict:
    """A section as a plain dict, for saving the resolved config beside an output."""
    return dataclasses.asdict(section)


def what_keys(section) -> dict:
    """The section's fields that shape outputs (all but the `how=True` ones)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if not f.metadata["how"]}


def model_keys(section) -> dict:
    """The fields that shape the model a stage makes: `what_keys` but the `measure=True` ones."""
    return {k: v for k, v in what_keys(section).items()
            if not next(f for f in dataclasses.fields(section) if f.name == k).metadata["measure"]}


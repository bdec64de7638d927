"""Loading every model from local folders (never the hub), for tiny and real weights alike.

Each folder is checked against its layout before anything loads, and a file that is there but
does not load (truncated, corrupt, not JSON) is one line naming the folder and the way back.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common import dataset
from stages.common.errors import StageError, restore_hint
from stages.common.io import read_json, sha256_of
from stages.common.model_layouts import check_folder
from stages.common.params import SHA256



def _quiet_loading() -> None:
    """Loading bars for a handful of local files are noise beside the stage's own progress bar."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def require_file(path: str | Path, stage: str = "fetch-models") -> Path:
    """`path` must exist; otherwise say which stage produces it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro {stage}` (or `dvc pull {stage}`) to create it")
    return path


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0][:200] if text else "") or type(err).__name__


@contextlib.contextmanager
def loading(what: str | Path, stage: str = "fetch-models", torch_file: bool = False):
    """A file that is there but does not load (truncated weights, broken JSON, a config that does
    not fit) as one line. Only loading goes inside: a CUDA error is no file's fault."""
    import pickle

    from safetensors import SafetensorError

    errors = (OSError, ValueError, SafetensorError)
    if torch_file:  # torch.load and TorchScript report a damaged archive these ways
        errors += (RuntimeError, EOFError, pickle.UnpicklingError)
    try:
        yield
    except errors as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the disk itself (full, permissions): run_cli says so
        raise StageError(f"{what}: does not load ({_reason(err)}); {restore_hint(stage)}") from None


@dataclass
class TrainingModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    controlnet: torch.nn.Module | None = None  # train.controlnet


def load_training_models(base: str | Path, dtype: torch.dtype, controlnet: str | Path | None = None) -> TrainingModels:
    """SD 1.5's parts for LoRA training (and the ControlNet, if given), frozen, in `dtype`, on the CPU."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_loading()
    base = check_folder(base, "base")
    with loading(base):
        models = TrainingModels(
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder=dataset.TOKENIZER_DIR),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype),
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype),
            noise_scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        )
    if controlnet is not None:
        controlnet = check_folder(controlnet, "controlnet")
        with loading(controlnet):
            models.controlnet = ControlNetModel.from_pretrained(controlnet, dtype=dtype)
    for module in filter(None, (models.text_encoder, models.vae, models.unet, models.controlnet)):
        module.requires_grad_(False)
        module.eval()
    return models


def check_lora(folder: str | Path) -> Path:
    """The trained LoRA file must be there and readable as UNet LoRA weights, checked before any
    model loads: reading the safetensors header and key names costs milliseconds."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / dataset.LORA_WEIGHTS
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro train-lora` first")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the disk itself (permissions): run_cli says so
        raise StageError(f"{path}: not a readable safetensors file ({_reason(err)}); "
                         f"{restore_hint('train-lora')}") from None
    if not any(k.startswith("unet.") and "lora" in k for k in keys):
        raise StageError(f"{path}: holds no UNet LoRA weights ({len(keys)} tensors); {restore_hint('train-lora')}")
    return path


def add_text_encoder_lora(text_encoder, config, adapter_name: str = "default") -> None:
    """`config`'s LoRA layers in the text encoder, through peft itself: transformers' own adapter
    API (add_adapter, load_adapter) refuses peft 0.21, the newest release, from transformers 5.23
    on (it asks for 0.22). peft's state-dict helpers find the config where transformers keeps it."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name)
    text_encoder.peft_config = {**getattr(text_encoder, "peft_config", {}), adapter_name: config}


def load_text_encoder_lora(pipe, path: str | Path, adapter_name: str) -> None:
    """The text encoder's LoRA of train-lora's diffusers file (text_encoder.* keys, the adapter
    config in its metadata), if it has one (train.text_encoder_rank), added through peft (see
    add_text_encoder_lora: not load_lora_weights, whose last step is transformers' adapter API)."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # the text encoder's tensors only
        keys = [k for k in f.keys() if k.startswith("text_encoder.")]
        if not keys:
            return
        metadata = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        # lora_linear_layer.down/up on every layer (train-lora writes them so): diffusers' converter names them as peft
        state = convert_state_dict_to_peft({k.removeprefix("text_encoder."): f.get_tensor(k) for k in keys})
    config = {k.removeprefix("text_encoder."): v for k, v in metadata.items() if k.startswith("text_encoder.")}
    if not config:
        raise ValueError("no adapter metadata for the text encoder (its rank and alpha)")
    if not hasattr(pipe.text_encoder, "text_model"):  # transformers 5's CLIP: SD 1.5's names lose text_model.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    add_text_encoder_lora(pipe.text_encoder, LoraConfig(**config), adapter_name)
    result = set_peft_model_state_dict(pipe.text_encoder, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"text encoder LoRA keys that fit no layer ({result.unexpected_keys[:1]}) or layers without "
                         f"their weights ({missing[:1]})")


def lora_components(pipe) -> list[str]:
    """The pipeline's parts that carry a LoRA, for fuse_lora."""
    return ["unet"] + (["text_encoder"] if getattr(pipe.text_encoder, "peft_config", None) else [])


# What a LoRA may wrap in each model, where one block's layers are listed in the error, and what
# they are called. The UNet's on any layer peft wraps; the text encoder's on Linear ones only, the
# layers whose keys both file formats name (CLIP's embeddings would not export).
_TARGETS = {"UNet": ((torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding), "Linear, Conv or Embedding",
                     ".attn1.", "attention projections"),
            "text encoder": ((torch.nn.Linear,), "Linear", ".layers.0.", "layers")}


def check_target_modules(model: torch.nn.Module, target_modules: list[str], key: str = "train.target_modules",
                         what: str = "UNet") -> None:
    """Every entry of `key` must name layers peft can give a LoRA in `model` (the UNet, or the
    text encoder: `what`); otherwise peft fails deep inside add_adapter, or matches nothing. The
    error lists one block's layers, as they can be named."""
    wrappable, kinds, block, listed = _TARGETS[what]
    modules = dict(model.named_modules())
    for target in target_modules:
        matches = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if matches and all(isinstance(m, wrappable) for m in matches):
            continue
        layers = sorted({name.split(block)[1] for name, module in modules.items()
                         if block in name and isinstance(module, torch.nn.Linear)})
        kind = type(next(m for m in matches if not isinstance(m, wrappable))).__name__ if matches else ""
        problem = (f"names {'an' if kind[:1] in 'AEIOU' else 'a'} {kind}, not a layer LoRA can wrap ({kinds})"
                   if matches else f"is not a module of the {what}")
        raise StageError(f"{key}: {target!r} {problem}; the {what}'s {listed} are {', '.join(layers)}")


SCHEDULERS = {"unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
              "euler": "EulerDiscreteScheduler"}


def load_controlnet_pipeline(base: str | Path, controlnet: str | Path, scheduler: str, dtype: torch.dtype,
                             device: torch.device, lora: str | Path | None = None):
    """StableDiffusionControlNetPipeline from local folders, optionally with our LoRA loaded."""
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    _quiet_loading()
    base, controlnet = check_folder(base, "base"), check_folder(controlnet, "controlnet")
    lora_file = check_lora(lora) if lora is not None else None
    with loading(controlnet):
        controlnet_model = ControlNetModel.from_pretrained(controlnet, dtype=dtype)
    with loading(base):
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            base, controlnet=controlnet_model, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, dtype=dtype,
        )
    chosen = getattr(diffusers, SCHEDULERS[scheduler])
    # PNDM has no rescale_betas_zero_snr and would silently sample such a model on the wrong schedule.
    if pipe.scheduler.config.get("rescale_betas_zero_snr") and \
            "rescale_betas_zero_snr" not in inspect.signature(chosen.__init__).parameters:
        raise StageError(f"generate.scheduler: {scheduler} cannot sample {base}, trained with zero terminal SNR "
                         f"(its scheduler config); use {', '.join(k for k in SCHEDULERS if k != scheduler)}")
    pipe.scheduler = chosen.from_config(pipe.scheduler.config)
    if lora_file is not None:
        with loading(lora_file, "train-lora"):
            # Into the UNet directly: no load_lora_weights warning about a text encoder without LoRA keys
            pipe.unet.load_lora_adapter(lora_file.parent, weight_name=lora_file.name, prefix="unet",
                                        adapter_name="fashion")
            load_text_encoder_lora(pipe, lora_file, "fashion")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pinned(path: Path, sources: Path) -> None:
    """`path` must have the sha256 fetch-models recorded for the Inception in `sources`
    (models/sources.json): the params' pin in hub and local mode, the digest of the stand-in it
    built in tiny mode."""
    record = read_json(require_file(sources))
    entry = record.get("inception") if isinstance(record, dict) else None
    pin = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(pin, str) or not re.fullmatch(SHA256, pin):
        raise StageError(f"{sources}: records no sha256 for {path} (an older fetch-models wrote it), and "
                         "TorchScript loads only pinned; rerun `dvc repro fetch-models`")
    actual = sha256_of(path)
    if actual != pin:
        raise StageError(f"{path}: sha256 {actual[:16]}..., not the pinned {pin[:16]}... ({sources}); "
                         f"{restore_hint('fetch-models')}")


def load_inception(eval_models: str | Path, device: torch.device, sources: str | Path):
    """clean-fid's Inception (or the demo's stand-in) from a local folder, never downloaded. It is
    TorchScript, code that runs when loaded: it loads only with the sha256 recorded in `sources`
    (paths.model_sources)."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = require_file(Path(eval_models) / dataset.INCEPTION_FILE)
    check_pinned(path, Path(sources))
    with warnings.catch_warnings(), loading(path, torch_file=True):
        # The reference Inception is a TorchScript file; torch now calls jit.load deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    return model.to(device).eval()


def load_lpips(eval_models: str | Path, device: torch.device):
    """LPIPS (alex): linear heads from the lpips package, AlexNet features from torchvision's
    state dict in our folder (`features.N.*`, which lpips splits into slice1..slice5)."""
    import lpips

    path = require_file(Path(eval_models) / dataset.ALEXNET_FILE)
    with warnings.catch_warnings():
        # lpips asks torchvision for `pretrained=False`; we never let it download AlexNet.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    with loading(path, torch_file=True):
        torchvision_state = torch.load(path, map_location="cpu", weights_only=True)
    names = {f"{slice_name}.{layer}.{param}": f"features.{layer}.{param}"
             for slice_name, block in model.net.named_children() for layer, module in block.named_children()
             for param, _ in module.named_parameters()}
    missing = [theirs for theirs in names.values() if theirs not in torchvision_state]
    if missing:
        raise StageError(f"{path}: no {missing[0]}; it must be a torchvision AlexNet state dict "
                         "(alexnet-owt-7be5be79.pth): rerun `dvc repro fetch-models`")
    model.net.load_state_dict({ours: torchvision_state[theirs] for ours, theirs in names.items()})
    return model.to(device).eval()


def load_clip(eval_models: str | Path, device: torch.device):
    """CLIP for the CLIP score; openai's repos ship it as pytorch_model.bin, which transformers
    loads with weights_only."""
    from transformers import CLIPModel, CLIPProcessor

    _quiet_loading()
    folder = check_folder(Path(eval_models) / dataset.CLIP_DIR, "clip")
    with loading(folder):
        model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    return model.to(device).eval(), processor

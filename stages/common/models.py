"""Loading every model from local folders (never the hub), for tiny and real weights alike."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common import dataset
from stages.common.cli import StageError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _quiet_loading() -> None:
    """Loading bars for a handful of local files are noise beside the stage's own progress bar."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def require_dir(path: str | Path, marker: str) -> Path:
    """`path` must hold `marker`; otherwise say which stage produces it."""
    path = Path(path)
    if not (path / marker).exists():
        raise StageError(f"{path / marker}: not found; run `dvc repro fetch-models` "
                                f"(or `dvc pull`) to create {path}")
    return path


@dataclass
class TrainingModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_training_models(base: str | Path, dtype: torch.dtype) -> TrainingModels:
    """SD 1.5's parts for LoRA training, frozen, in `dtype`, on the CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_loading()
    base = require_dir(base, "model_index.json")
    models = TrainingModels(
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder=dataset.TOKENIZER_DIR),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype),
        noise_scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
    )
    for module in (models.text_encoder, models.vae, models.unet):
        module.requires_grad_(False)
        module.eval()
    return models


SCHEDULERS = {"unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
              "euler": "EulerDiscreteScheduler"}


def load_controlnet_pipeline(base: str | Path, controlnet: str | Path, scheduler: str, dtype: torch.dtype,
                             device: torch.device, lora: str | Path | None = None):
    """StableDiffusionControlNetPipeline from local folders, optionally with our LoRA loaded."""
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    _quiet_loading()
    base = require_dir(base, "model_index.json")
    controlnet_model = ControlNetModel.from_pretrained(require_dir(controlnet, "config.json"), dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=controlnet_model, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, dtype=dtype,
    )
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if lora is not None:
        lora = Path(lora)
        if not (lora / LORA_WEIGHTS).is_file():
            raise StageError(f"{lora / LORA_WEIGHTS}: not found; run `dvc repro train-lora` first")
        # Our LoRA is UNet-only; loading it into the UNet directly skips load_lora_weights'
        # warning about a text encoder with no LoRA keys.
        pipe.unet.load_lora_adapter(lora, weight_name=LORA_WEIGHTS, prefix="unet", adapter_name="fashion")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_inception(eval_models: str | Path, device: torch.device):
    """clean-fid's Inception (or a random stand-in) from a local folder, never downloaded."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(eval_models) / dataset.INCEPTION_FILE
    require_dir(path.parent, path.name)
    with warnings.catch_warnings():
        # The reference Inception is a TorchScript file; torch now calls jit.load deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()


def load_lpips(eval_models: str | Path, device: torch.device):
    """LPIPS (alex): linear heads from the lpips package, AlexNet features from torchvision's
    state dict in our folder (`features.N.*`, which lpips splits into slice1..slice5)."""
    import lpips

    path = Path(eval_models) / dataset.ALEXNET_FILE
    require_dir(path.parent, path.name)
    with warnings.catch_warnings():
        # lpips asks torchvision for `pretrained=False`; we never let it download AlexNet.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
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
    folder = require_dir(Path(eval_models) / dataset.CLIP_DIR, "config.json")
    return CLIPModel.from_pretrained(folder).to(device).eval(), CLIPProcessor.from_pretrained(folder)

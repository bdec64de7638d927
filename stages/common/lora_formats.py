"""The trained LoRA in the kohya/webui format that A1111, ComfyUI and most LoRA tools load, beside
diffusers' own file.

diffusers: `unet.<module>.lora.down.weight` for attention projections, peft's
           `unet.<module>.lora_A.weight` (and `lora_B`) for other layers (proj_in, ff.net.*),
           alpha in the file's adapter metadata.
kohya:     `lora_unet_<module with dots as underscores>.lora_down.weight`, `.lora_up.weight`,
           and a scalar `.alpha` per module (scale = alpha / rank), plus the `ss_*` metadata
           that A1111's LoRA browser shows. SD 1.x keeps diffusers' module names (down_blocks_0_...),
           unlike SDXL's LDM names (input_blocks_...).
"""

from __future__ import annotations

import re
from pathlib import Path


KOHYA_FILE = "fashion_lora_kohya.safetensors"
# diffusers renames peft's lora_A/lora_B to lora.down/lora.up only for attention projections; a
# LoRA on proj_in or a feed-forward layer keeps peft's names in the same file.
_DIFFUSERS_KEY = re.compile(r"unet\.(?P<module>.+)\.lora(?:\.(?P<part>down|up)|_(?P<peft>A|B))\.weight")
_KOHYA_KEY = re.compile(r"lora_unet_(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up"}


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys to kohya keys, with each module's alpha as a scalar tensor."""
    import torch  # here, not at the top: model-card and fashion-publish read this module's names only

    out = {}
    for key, value in state.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{key}: not a diffusers UNet LoRA key")
        name = kohya_name(match["module"])
        part = match["part"] or {"A": "down", "B": "up"}[match["peft"]]
        if f"{name}.lora_{part}.weight" in out:
            raise ValueError(f"{key}: {match['module']}'s lora {part} weight given twice")
        out[f"{name}.lora_{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya keys back to diffusers keys, and each module's alpha. Underscores in a kohya name are
    ambiguous (down_blocks_0 ...), so the UNet's module names say which were dots."""
    by_name = {kohya_name(m): m for m in modules}
    weights, alphas = {}, {}
    for key, value in state.items():
        match = _KOHYA_KEY.fullmatch(key)
        if match is None or f"lora_unet_{match['name']}" not in by_name:
            raise ValueError(f"{key}: not a kohya key of this UNet's modules")
        module = by_name[f"lora_unet_{match['name']}"]
        if match["part"] == "alpha":
            alphas[module] = float(value)
        else:
            weights[f"unet.{module}.lora.{_PARTS[match['part']]}.weight"] = value
    return weights, alphas


def base_model_name(sources: dict | None) -> str:
    """What a LoRA was trained on, from fetch-models' models/sources.json: the hub id at the commit
    it resolved to, the local folder, or the tiny kit (pretrained, or random with no pretraining)."""
    if not sources:
        return "unknown (no models/sources.json)"
    if sources.get("mode") == "tiny":
        return f"tiny-{'pretrained' if 'pretrain' in sources else 'random'} (models.seed={sources.get('seed')})"
    base = sources.get("base") or {}
    if sources.get("mode") == "hub":
        return f"{base.get('id')}@{base.get('commit')}"
    # The folder's name, not its path: the same weights trained on two machines get the same bytes.
    return f"local:{Path(str(base.get('path'))).name}"


def kohya_metadata(rank: int, alpha: float, resolution: int, params_digest: str,
                   base_model: str) -> dict[str, str]:
    """What kohya's sd-scripts writes and A1111's LoRA browser reads (all values are strings)."""
    return {"ss_sd_model_name": base_model, "fashion.base_model": base_model,
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1", "ss_resolution": f"({resolution}, {resolution})",
            "ss_output_name": KOHYA_FILE.removesuffix(".safetensors"), "modelspec.architecture":
            "stable-diffusion-v1/lora", "fashion.train_sha256": params_digest}

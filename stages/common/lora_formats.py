"""The trained LoRA in the kohya/webui format that A1111, ComfyUI and most LoRA tools load, beside
diffusers' own file.

diffusers: `unet.<module>.lora.down.weight` for attention projections, peft's
           `unet.<module>.lora_A.weight` (and `lora_B`) for other layers (proj_in, ff.net.*);
           with train.text_encoder_rank, `text_encoder.text_model.<module>.lora_linear_layer.down.weight`;
           alpha in the file's adapter metadata.
kohya:     `lora_unet_<module with dots as underscores>.lora_down.weight`, `.lora_up.weight`,
           and a scalar `.alpha` per module (scale = alpha / rank), plus the `ss_*` metadata
           that A1111's LoRA browser shows; `lora_te_text_model_encoder_layers_0_self_attn_q_proj...`
           for the text encoder. SD 1.x keeps diffusers' module names (down_blocks_0_...), unlike
           SDXL's LDM names (input_blocks_...).
"""

from __future__ import annotations

import re
from pathlib import Path


KOHYA_FILE = "fashion_lora_kohya.safetensors"
# diffusers renames peft's lora_A/lora_B to lora.down/lora.up for the UNet's attention projections;
# a LoRA on another UNet layer (proj_in, ff.net.*) keeps peft's names in the same file. The text
# encoder's layers are all lora_linear_layer.down/up (diffusers_states).
_DIFFUSERS_KEY = re.compile(r"(?P<model>unet|text_encoder)\.(?P<module>.+?)"
                            r"\.(?:lora(?:_linear_layer)?\.(?P<part>down|up)|lora_(?P<peft>A|B))\.weight")
_KOHYA_KEY = re.compile(r"(?P<name>lora_(?:unet|te)_.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
_PEFT_PART = {"lora_down.weight": "A", "lora_up.weight": "B"}
# kohya's prefix per model; SD 1.x has one text encoder, "lora_te" (SDXL's are lora_te1, lora_te2)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_DIFFUSERS_PART = re.compile(r"\.lora(?:_linear_layer)?\.(down|up)\.")


def kohya_name(module: str, model: str = "unet") -> str:
    """`module` of `model` as kohya names it: the text encoder's as transformers 4 named CLIP's
    layers (text_model.encoder.layers.0...), as every SD 1.5 LoRA does."""
    return KOHYA_PREFIX[model] + module.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys (unet.*, text_encoder.*) to kohya keys, with each module's alpha (its
    model's, from `alphas`) as a scalar tensor."""
    import torch  # here, not at the top: model-card and fashion-publish read this module's names only

    out = {}
    for key, value in state.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{key}: not a diffusers UNet or text encoder LoRA key")
        name = kohya_name(match["module"], match["model"])
        part = match["part"] or {"A": "down", "B": "up"}[match["peft"]]
        if f"{name}.lora_{part}.weight" in out:
            raise ValueError(f"{key}: {match['module']}'s lora {part} weight given twice")
        out[f"{name}.lora_{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alphas[match["model"]]))
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya keys back to diffusers keys with peft's lora_A / lora_B names (see peft_names), and
    each module's alpha (keyed `model.module`).
    Underscores in a kohya name are ambiguous (down_blocks_0 ...), so the models' module names
    (`modules`, by model) say which were dots."""
    by_name = {kohya_name(module, model): (model, module) for model, names in modules.items() for module in names}
    weights, alphas = {}, {}
    for key, value in state.items():
        match = _KOHYA_KEY.fullmatch(key)
        if match is None or match["name"] not in by_name:
            raise ValueError(f"{key}: not a kohya key of these models' modules")
        model, module = by_name[match["name"]]
        if match["part"] == "alpha":
            alphas[f"{model}.{module}"] = float(value)
        else:
            weights[f"{model}.{module}.lora_{_PEFT_PART[match['part']]}.weight"] = value
    return weights, alphas


def peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers LoRA file's keys with peft's lora_A / lora_B, whatever the layer: from_kohya's form."""
    return {_DIFFUSERS_PART.sub(lambda m: f".lora_{'A' if m[1] == 'down' else 'B'}.", key): value
            for key, value in state.items()}


def diffusers_states(models: dict[str, torch.nn.Module]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each model's LoRA (by unet / text_encoder) keyed as diffusers' file names it, and its
    adapter config (rank, alpha, target modules) for the file's metadata, where diffusers' loaders
    look for it: without it every loader assumes alpha = rank, and a LoRA trained with alpha !=
    rank comes back scaled by rank / alpha. Only the fields that define the adapter: diffusers
    rebuilds LoraConfig(**metadata), and a field an older peft does not know would make the file
    unloadable there. The text encoder's keys are SD 1.5 LoRAs': with CLIP's text_model. (which
    transformers 5 dropped) and lora_linear_layer.down/up on every layer, attention or MLP, the
    form from which diffusers' loader infers the format (a bare lora_A on fc1 it cannot)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    states, adapters = {}, {}
    for name, model in models.items():
        state = get_peft_model_state_dict(model)
        states[name] = convert_state_dict_to_diffusers(state) if name == "unet" else {
            ("" if k.startswith("text_model.") else "text_model.")
            + k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
            for k, v in state.items()}
        config = model.peft_config["default"]
        adapters[name] = {"r": config.r, "lora_alpha": config.lora_alpha,
                          "target_modules": sorted(config.target_modules), "rank_pattern": config.rank_pattern,
                          "alpha_pattern": config.alpha_pattern, "use_dora": config.use_dora,
                          "init_lora_weights": config.init_lora_weights}
    return states, adapters


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

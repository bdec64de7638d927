"""Full-size random stand-ins: the published SD 1.5, canny ControlNet v1.1 and CLIP ViT-B/32
configurations with the real CLIP BPE vocabulary, saved as fp16 variants like the hub repos.

Weights cannot be downloaded here; architectures are public facts. They show what only shows at
full size: memory, load times, the real tokenizer's 77-token truncation. Used as
`models.mode: local` sources by the full-size smoke test (tests/test_full_size.py) and by
bench/gpu.py. Never a DVC dep: no stage imports this module. The builders are the tiny kit's
(stages/demo/kit.py) at SD 1.5's widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from stages.demo import kit

# The real repo's model_index.json lists the safety checker the project never loads or fetches.
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def clip_bpe_merges() -> list[str]:
    """The real CLIP BPE merges (the ones OpenAI's CLIP models and SD 1.5 use), from the copy that ships
    inside the open_clip_torch wheel: the one place a package registry carries them."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # found, not imported: open_clip imports timm and more
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("full-size models need the real CLIP vocabulary from open_clip_torch: "
                           "pip install -e '.[fullsize]'")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]  # CLIP's vocabulary is 49,408 tokens: 512 byte tokens, merges, 2 specials


def text_config(hidden: int = 768, heads: int = 12, intermediate: int = 3072) -> dict:
    """CLIP's text tower as published, legacy token ids included (pooling then takes argmax(ids))."""
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=12,
                num_attention_heads=heads, max_position_embeddings=kit.MAX_TOKENS, hidden_act="quick_gelu",
                projection_dim=hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def full_sizes() -> kit.Sizes:
    return kit.Sizes(
        text=text_config(),
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
                  cross_attention_dim=768),
        vae=dict(sample_size=512, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2),
        controlnet_embedding=(16, 32, 96, 256), merges=tuple(clip_bpe_merges()))


def sd15_scheduler():
    """SD 1.5's own scheduler config: epsilon prediction, PNDM."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(**kit.SD15_BETAS, skip_prk_steps=True)


def build_sd15_and_controlnet(base: Path, controlnet: Path, size: str = "full") -> None:
    """SD 1.5 and its canny ControlNet, random. Full size is saved as the hub has it: fp16 variant
    files and the real model_index.json; `tiny` saves the demo kit's architecture, unpretrained."""
    sizes = full_sizes() if size == "full" else kit.TINY
    parts = kit.sd15_parts(base, sizes, sd15_scheduler() if size == "full" else None)
    control = kit.new_controlnet(parts["unet"], sizes)
    if size == "full":
        kit.save_sd15(base, {k: v.to(torch.float16) if isinstance(v, nn.Module) else v for k, v in parts.items()},
                      variant="fp16")
        (base / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2) + "\n")
        control.to(torch.float16).save_pretrained(controlnet, variant="fp16")
    else:
        kit.save_sd15(base, parts)
        control.save_pretrained(controlnet)


class FullInception(nn.Module):
    """torchvision's InceptionV3 up to its 2048-d pool, random, behind clean-fid's interface."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.layers = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
            net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool)

    def forward(self, x, return_features: bool = True):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


def build_clip(folder: Path) -> None:
    """OpenAI's CLIP ViT-B/32 configuration saved as that repo has it: weights only as pytorch_model.bin."""
    model = kit.clip_parts(folder, text_config(hidden=512, heads=8, intermediate=2048),
                           dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12, projection_dim=512),
                           image_size=224, projection=512, merges=clip_bpe_merges())
    model.config.save_pretrained(folder)
    with (folder / "pytorch_model.bin").open("wb") as f:
        torch.save(model.state_dict(), f)


def source_paths(folder: Path) -> dict[str, Path]:
    """Where build_full_size_sources puts each model in `folder`, keyed like `models.local`."""
    return {"base": folder / "stable-diffusion-v1-5", "controlnet": folder / "control_v11p_sd15_canny",
            "clip": folder / "clip-vit-base-patch32", "inception": folder / "inception-2015-12-05.pt",
            "alexnet": folder / "alexnet-owt-7be5be79.pth"}


def build_full_size_sources(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Full-size random models laid out as their sources are (hub repo folders and downloaded
    files), for `models.mode: local`. Returns the path of each, keyed like `models.local`."""
    torch.manual_seed(seed)
    sources = source_paths(folder)
    kit.quiet_saving()
    build_sd15_and_controlnet(sources["base"], sources["controlnet"], "full")
    build_clip(sources["clip"])
    kit.save_torchscript(FullInception().eval(), sources["inception"])
    kit.save_alexnet(sources["alexnet"], classifier=True)
    return sources


def full_size_settings(sources: dict[str, Path], cuda: bool) -> dict:
    """params.yaml overrides (dotted keys) that run every stage on `sources` at 256 px: a handful
    of images on a CPU, a few hundred where a GPU is at hand. The full-size smoke test and
    `make gpu-check` both run this."""
    import hashlib

    digest = {k: hashlib.sha256(sources[k].read_bytes()).hexdigest() for k in ("inception", "alexnet")}
    return {
        "demo.products": 160 if cuda else 8, "extract.train_products": 100 if cuda else 4,
        "extract.eval_products": 50 if cuda else 3, "train.max_steps": 20 if cuda else 2, "generate.steps": 2,
        # validation on the GPU as a real run validates (steps 0, 10, 20); on a CPU once, small
        "train.validate_every": 10 if cuda else 2, "train.validation_samples": 4 if cuda else 1,
        "train.validation_loss_samples": 32 if cuda else 2, "train.validation_steps": 10 if cuda else 2,
        "generate.batch_size": 16 if cuda else 2, "plots.grid_samples": 2,
        # the recipe knobs on the GPU, once each: a text encoder LoRA (through the ControlNet),
        # Min-SNR-γ, noise offset, caption dropout (tests/test_cuda.py runs one under CUDA graphs)
        **({"train.text_encoder_rank": 4, "train.snr_gamma": 5.0, "train.noise_offset": 0.05,
            "train.caption_dropout": 0.1} if cuda else {}),
        "models.mode": "local", **{f"models.local.{k}": str(v) for k, v in sources.items()},
        "models.inception_sha256": digest["inception"], "models.alexnet_sha256": digest["alexnet"],
        "extract.resolution": 256, "extract.prompt": "description", "train.checkpoint_every": 1000}

"""Random-initialised stand-ins for every model the pipeline loads, built offline, in the real
on-disk layouts, so later stages load them with the same `from_pretrained(local_dir)` calls as
the real weights. Two sizes:

- `tiny` (the demo and the tests): SD 1.5's UNet structure (block types, attention layout, so the
  same 128 LoRA layers and 256 LoRA keys) at a fraction of the width, a one-layer-per-block VAE,
  and a v-prediction, zero-terminal-SNR scheduler (what pretraining needs); about 20 MB in all.
- `full`: the published SD 1.5, canny ControlNet v1.1 and CLIP ViT-B/32 configurations with the
  real CLIP BPE vocabulary, saved as fp16 variants like the hub repos. Weights cannot be
  downloaded here; architectures are public facts. They show what only shows at full size:
  memory, load times, the real tokenizer's 77-token truncation. Used as `models.mode: local`
  sources by the full-size smoke test.

Random, the numbers either produces mean nothing beyond "the code path works". fetch-models
then pretrains the tiny ones on drawn garments (stages/common/pretrain.py) for the demo.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from stages.common import dataset

MAX_TOKENS = 77


def _byte_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (256 characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_bpe_merges() -> list[str]:
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


def write_clip_tokenizer(folder: Path, size: str = "tiny") -> None:
    """A CLIP tokenizer. tiny: byte-level, every byte a token, no merges (BOS 512, EOS/pad 513);
    full: the real 49,408-token BPE vocabulary (BOS 49406, EOS/pad 49407)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    merges = _clip_bpe_merges() if size == "full" else []
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({"<|startoftext|>": len(tokens), "<|endoftext|>": len(tokens) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    # model_max_length must be saved: without it padding="max_length" has no length to pad to.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)


def _text_config(size: str, hidden: int = 768, heads: int = 12, intermediate: int = 3072):
    from transformers import CLIPTextConfig

    if size == "full":  # the published configs, legacy token ids included (pooling then takes argmax(ids))
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                              num_hidden_layers=12, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                              hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=0, eos_token_id=2,
                              pad_token_id=1)
    return CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                          projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)


# SD 1.5's UNet and VAE; the tiny ones keep every block type and narrow the widths.
# The tiny UNet's norm groups are wide (8 channels and more): GroupNorm over a garment on a white
# page keeps a group's direction, not its amplitude; with 2-channel groups pretraining learned
# colours more slowly (colour share 0.11 vs 0.18 after the same steps).
UNET = {"tiny": dict(sample_size=8, block_out_channels=(16, 32, 64, 64), attention_head_dim=4, norm_num_groups=2,
                     cross_attention_dim=32),
        "full": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                     norm_num_groups=32, cross_attention_dim=768)}
VAE = {"tiny": dict(sample_size=64, block_out_channels=(8, 16, 32, 32), norm_num_groups=4, layers_per_block=1),
       "full": dict(sample_size=512, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)}
CONTROLNET_EMBEDDING = {"tiny": (8, 16, 16, 32), "full": (16, 32, 96, 256)}
# The real repo's model_index.json lists the safety checker the project never loads or fetches.
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_unet(size: str = "tiny"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2, **UNET[size],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def sd15_parts(folder: Path, size: str = "tiny") -> dict:
    """SD 1.5's components, random: vae, text_encoder, unet, tokenizer (written to folder/tokenizer),
    scheduler (`sd15_scheduler`)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, **VAE[size],
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    write_clip_tokenizer(folder / "tokenizer", size)
    return {"vae": vae, "text_encoder": CLIPTextModel(_text_config(size)), "unet": build_unet(size),
            "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"), "scheduler": sd15_scheduler(size)}


def sd15_scheduler(size: str = "tiny"):
    """SD 1.5's own scheduler config (epsilon prediction, PNDM), or the tiny one: v-prediction with
    zero terminal SNR and trailing timesteps, as SD 2.1-v's. Training reads either as a DDPMScheduler."""
    from diffusers import DDIMScheduler, PNDMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1)
    if size == "full":
        return PNDMScheduler(**betas, skip_prk_steps=True)
    return DDIMScheduler(**betas, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing", clip_sample=False)


def save_sd15(folder: Path, parts: dict, size: str = "tiny") -> None:
    """SD 1.5 in the diffusers pipeline layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/.
    Full size is saved as the hub has it: fp16 variant files and the real model_index.json."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if size == "full":
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        (folder / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2) + "\n")
    else:
        pipe.save_pretrained(folder)


def new_controlnet(unet, size: str = "tiny"):
    """A canny ControlNet cloned from `unet`, with its zero convs randomised."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING[size])
    # A fresh ControlNet's output convs are zero, so the control image would change nothing and
    # a random demo would never exercise the control path; pretraining also learns faster from here.
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]
    for conv in zero_convs:
        nn.init.normal_(conv.weight, std=0.05)
        nn.init.zeros_(conv.bias)
    return controlnet


def build_sd15_and_controlnet(base: Path, controlnet: Path, size: str = "tiny", pretrain=None) -> dict:
    """SD 1.5 and its canny ControlNet, first trained by `pretrain(parts, controlnet)` when given;
    returns what the pretraining measured."""
    parts = sd15_parts(base, size)
    control = new_controlnet(parts["unet"], size)
    record = pretrain(parts, control) if pretrain else {}
    save_sd15(base, parts, size)
    if size == "full":
        control.to(torch.float16).save_pretrained(controlnet, variant="fp16")
    else:
        control.save_pretrained(controlnet)
    return record


class _InceptionLayers(nn.Module):
    """Three random convs to 2048 features. Plain parameters rather than nn.Conv2d: TorchScript
    writes nn.Conv2d's constants in string-hash order, which changes the file from run to run."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = _conv_params(3, 32, 5)
        self.w2, self.b2 = _conv_params(32, 128, 3)
        self.w3, self.b3 = _conv_params(128, 2048, 1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=4, padding=2))
        x = F.relu(F.conv2d(x, self.w2, self.b2, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.w3, self.b3, stride=2))
        return F.adaptive_avg_pool2d(x, 1)


def _conv_params(cin: int, cout: int, kernel: int) -> tuple[nn.Parameter, nn.Parameter]:
    conv = nn.Conv2d(cin, cout, kernel)  # for PyTorch's default init
    return conv.weight, conv.bias


class TinyInception(nn.Module):
    """Same interface as clean-fid's `inception-2015-12-05.pt`: `.layers` maps a normalised
    299x299 batch to (B, 2048, 1, 1), and `forward(x in [0,255], return_features=True)`."""

    def __init__(self):
        super().__init__()
        self.layers = _InceptionLayers()

    def forward(self, x, return_features: bool = True):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


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


def save_torchscript(module: nn.Module, path: Path) -> None:
    """Script `module` and save it byte-for-byte reproducibly.

    clean-fid loads a TorchScript file, so the stand-in must be one. TorchScript's *.debug_pkl
    entries embed the absolute path of this source file, and its serialization_id checksums
    them, which would give every checkout a different models/eval hash in dvc.lock. Loading
    needs neither: the debug entries are dropped and the id is recomputed from what is kept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch calls jit deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buffer)
    source = zipfile.ZipFile(buffer)
    kept = {i.filename: source.read(i) for i in source.infolist() if not i.filename.endswith(".debug_pkl")}
    id_name = next(name for name in kept if name.endswith(".data/serialization_id"))
    digest = hashlib.sha256(b"".join(v for k, v in kept.items() if k != id_name)).hexdigest()
    kept[id_name] = str(int(digest, 16))[:40].encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in kept.items():
            target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def save_alexnet(path: Path, classifier: bool = False) -> None:
    """Random AlexNet weights in torchvision's state-dict layout (`features.*`). LPIPS uses only
    the features (10 MB); the real file also holds the 234 MB classifier, kept with `classifier`."""
    from torchvision.models import alexnet

    state = {k: v for k, v in alexnet(weights=None).state_dict().items() if classifier or k.startswith("features.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: the archive is not named after the file
        torch.save(state, f)


def build_clip(folder: Path, size: str = "tiny") -> None:
    """The CLIP score's model: tiny, or OpenAI's CLIP ViT-B/32 configuration saved as
    that repo has it (weights only as pytorch_model.bin)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig

    if size == "full":
        vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                                  num_hidden_layers=12, num_attention_heads=12, projection_dim=512)
        text, image_size, projection = _text_config("full", hidden=512, heads=8, intermediate=2048), 224, 512
    else:
        vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
        text, image_size, projection = _text_config("tiny"), 32, 32
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection)
    write_clip_tokenizer(folder, size)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=CLIPTokenizer.from_pretrained(folder),
    )
    model = CLIPModel(config)
    if size == "full":
        config.save_pretrained(folder)
        with (folder / "pytorch_model.bin").open("wb") as f:
            torch.save(model.state_dict(), f)
    else:
        model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_eval_models(folder: Path) -> dict:
    """Tiny metric backbones in models/eval's layout: inception/ (clean-fid TorchScript), lpips/
    (AlexNet), clip/. Returns the names metrics.json reports for them."""
    save_torchscript(TinyInception().eval(), folder / dataset.INCEPTION_FILE)
    save_alexnet(folder / dataset.ALEXNET_FILE)
    build_clip(folder / dataset.CLIP_DIR)
    # "tiny-random" beside every demo number: they only show the code path works.
    return {"fid": "tiny-random-inception", "lpips": "tiny-random-alexnet", "clip": "tiny-random-clip"}


def _quiet_saving() -> None:
    """transformers draws a progress bar for every one-shard save: noise beside the stage's log."""
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()


def build_all(base: Path, controlnet: Path, eval_models: Path, seed: int, pretrain=None) -> tuple[dict, dict]:
    """Build every tiny model from `seed`, first pretrained by `pretrain(parts, controlnet)` when
    given; returns the backbone names metrics will report and what the pretraining measured."""
    _quiet_saving()
    torch.manual_seed(seed)
    record = build_sd15_and_controlnet(base, controlnet, pretrain=pretrain)
    torch.manual_seed(seed)  # the metric backbones do not depend on how long pretraining ran
    return build_eval_models(eval_models), record


def build_full_size_sources(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Full-size random models laid out as their sources are (hub repo folders and downloaded
    files), for `models.mode: local`. Returns the path of each, keyed like `models.local`."""
    torch.manual_seed(seed)
    sources = {"base": folder / "stable-diffusion-v1-5", "controlnet": folder / "control_v11p_sd15_canny",
               "clip": folder / "clip-vit-base-patch32", "inception": folder / "inception-2015-12-05.pt",
               "alexnet": folder / "alexnet-owt-7be5be79.pth"}
    _quiet_saving()
    build_sd15_and_controlnet(sources["base"], sources["controlnet"], "full")
    build_clip(sources["clip"], "full")
    save_torchscript(FullInception().eval(), sources["inception"])
    save_alexnet(sources["alexnet"], classifier=True)
    return sources

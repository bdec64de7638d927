"""Tiny random-initialised stand-ins for every model the pipeline loads, built offline.

They keep SD 1.5's structure (block types, attention layout, so the same 128 LoRA layers and
256 LoRA keys) at a fraction of the width, and they are saved in the real on-disk layouts, so
later stages load them with the same `from_pretrained(local_dir)` calls as the real weights.
About 25 MB in all; the numbers they produce mean nothing beyond "the code path works".
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


def write_clip_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer: every byte is a token, no merges; BOS 512, EOS/pad 513."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # model_max_length must be saved: without it padding="max_length" has no length to pad to.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                          projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 64, 64), attention_head_dim=4, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_sd15(folder: Path) -> None:
    """Tiny SD 1.5 in the diffusers pipeline layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=4, sample_size=64,
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    # SD 1.5's own scheduler config; training reads it as a DDPMScheduler.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    write_clip_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config()), unet=build_unet(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def build_controlnet(base: Path, folder: Path) -> None:
    """A canny ControlNet cloned from the tiny UNet, with its zero convs randomised."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # A fresh ControlNet's output convs are zero, so the control image would change nothing and
    # the demo would never exercise the control path. Give them small random weights.
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]
    for conv in zero_convs:
        nn.init.normal_(conv.weight, std=0.05)
        nn.init.zeros_(conv.bias)
    controlnet.save_pretrained(folder)


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
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in kept.items():
            target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def build_eval_models(folder: Path) -> dict:
    """Metric backbones: inception/ (clean-fid TorchScript), lpips/ (AlexNet features), clip/.
    Returns the names metrics.json reports for them."""
    import lpips
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig

    (folder / "inception").mkdir(parents=True, exist_ok=True)
    save_torchscript(TinyInception().eval(), folder / "inception" / "inception-2015-12-05.pt")

    (folder / "lpips").mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision a deprecated `pretrained=`
        alexnet = lpips.pretrained_networks.alexnet(requires_grad=False, pretrained=False)
    save_file({k: v.contiguous() for k, v in alexnet.state_dict().items()}, folder / "lpips" / "alexnet.safetensors")

    clip_config = CLIPConfig(
        text_config=_text_config().to_dict(), projection_dim=32,
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, projection_dim=32).to_dict(),
    )
    write_clip_tokenizer(folder / "clip")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "clip"),
    )
    CLIPModel(clip_config).save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    # "tiny-random" beside every demo number: they only show the code path works.
    return {"fid": "tiny-random-inception", "lpips": "tiny-random-alexnet", "clip": "tiny-random-clip"}


def build_all(base: Path, controlnet: Path, eval_models: Path, seed: int) -> dict:
    """Build every tiny model from `seed`; returns the backbone names metrics will report."""
    torch.manual_seed(seed)
    build_sd15(base)
    build_controlnet(base, controlnet)
    return build_eval_models(eval_models)

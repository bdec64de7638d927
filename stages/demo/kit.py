"""The demo's tiny model kit: random-initialised stand-ins for every model the pipeline loads,
built offline in the real on-disk layouts, so later stages load them with the same
`from_pretrained(local_dir)` calls as the real weights.

SD 1.5's UNet structure (block types, attention layout, so the same 128 LoRA layers and 256 LoRA
keys) at a fraction of the width, a one-layer-per-block VAE, a v-prediction, zero-terminal-SNR
scheduler (what pretraining needs), its canny ControlNet, and tiny metric backbones; about 20 MB.

fetch-models builds them from `models.seed`, then teaches them garments (stages/demo/pretrain.py).
That pretraining takes minutes of CPU, and its floats differ from CPU to CPU, so the kit it
gives for the committed params ships with the repo (`SHIPPED`, fp16, checksummed): when
`models.*`, `extract.resolution` and `canny.*` are the ones it was made with, fetch-models
installs it in seconds and every machine starts from the same weights. Any other recipe is
pretrained here, and rounded to fp16 the same way. Rebuild the shipped kit after changing the
recipe or pretrain.py:

    python -m stages.demo.kit     # make demo-kit

Full-size stand-ins (the smoke test, benchmarks) live in bench/full_size_models.py, on the
builders here. The metric backbones are random: their numbers only show the code path works.
"""

from __future__ import annotations

import ast
import dataclasses
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
from stages.common.cli import log
from stages.common.errors import StageError

MAX_TOKENS = 77
SHIPPED = Path(__file__).with_name("tiny_kit.safetensors")  # the pretrained weights, fp16
MANIFEST = SHIPPED.with_suffix(".json")  # its sha256, version, recipe and pretraining record
SHIPPED_NAME = "stages/demo/tiny_kit.safetensors"  # as error messages name it
KIT_VERSION = 1  # bump when the kit's layout (its parts or their key names) changes
# The code that shapes the pretrained weights, beside the kit's sizes (code_digest)
KIT_CODE = ("stages/demo/pretrain.py", "stages/demo/garments.py", "stages/common/edges.py")


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


def write_clip_tokenizer(folder: Path, merges: list[str] = ()) -> None:
    """A CLIP tokenizer: byte-level, every byte a token (BOS 512, EOS/pad 513), plus `merges`
    (the real BPE merges give the real 49,408-token vocabulary, BOS 49406, EOS/pad 49407)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({"<|startoftext|>": len(tokens), "<|endoftext|>": len(tokens) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    # model_max_length must be saved: without it padding="max_length" has no length to pad to.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The widths that tell the tiny kit from full-size SD 1.5 (bench/full_size_models.py)."""

    text: dict = dataclasses.field(default_factory=lambda: dict(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=32, bos_token_id=512,
        eos_token_id=513, pad_token_id=513))
    # SD 1.5's block types with narrow widths. Wide norm groups (8 channels and more): GroupNorm
    # over a garment on a white page keeps a group's direction, not its amplitude (docs/demo-kit.md).
    unet: dict = dataclasses.field(default_factory=lambda: dict(
        sample_size=8, block_out_channels=(16, 32, 64, 64), attention_head_dim=4, norm_num_groups=2,
        cross_attention_dim=32))
    vae: dict = dataclasses.field(default_factory=lambda: dict(
        sample_size=64, block_out_channels=(8, 16, 32, 32), norm_num_groups=4, layers_per_block=1))
    controlnet_embedding: tuple = (8, 16, 16, 32)
    merges: tuple = ()  # CLIP BPE merges; none: a byte-level tokenizer


TINY = Sizes()


def build_unet(sizes: Sizes = TINY):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2, **sizes.unet,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def sd15_parts(folder: Path, sizes: Sizes = TINY, scheduler=None) -> dict:
    """SD 1.5's components, random: vae, text_encoder, unet, tokenizer (written to folder/tokenizer),
    scheduler (`tiny_scheduler()` unless given)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, **sizes.vae,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    write_clip_tokenizer(folder / "tokenizer", list(sizes.merges))
    return {"vae": vae, "text_encoder": CLIPTextModel(CLIPTextConfig(**sizes.text)), "unet": build_unet(sizes),
            "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            "scheduler": scheduler or tiny_scheduler()}


SD15_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, steps_offset=1)


def tiny_scheduler():
    """SD 1.5's betas under v-prediction with zero terminal SNR and trailing timesteps, as SD
    2.1-v's: a tiny UNet under SD 1.5's own epsilon schedule leaves garments off-centre.
    Training reads it as a DDPMScheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing", clip_sample=False)


def save_sd15(folder: Path, parts: dict, **save) -> None:
    """SD 1.5 in the diffusers pipeline layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, **save)


def new_controlnet(unet, sizes: Sizes = TINY):
    """A canny ControlNet cloned from `unet`, with its zero convs randomised."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=sizes.controlnet_embedding)
    # A fresh ControlNet's output convs are zero, so the control image would change nothing and
    # a random demo would never exercise the control path; pretraining also learns faster from here.
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]
    for conv in zero_convs:
        nn.init.normal_(conv.weight, std=0.05)
        nn.init.zeros_(conv.bias)
    return controlnet


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


def clip_parts(folder: Path, text: dict, vision: dict, image_size: int, projection: int, merges: list[str] = ()):
    """The CLIP score's model, random, and its processor saved in `folder`; returns the model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig

    config = CLIPConfig(text_config=text, vision_config=CLIPVisionConfig(**vision).to_dict(),
                        projection_dim=projection)
    write_clip_tokenizer(folder, merges)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=CLIPTokenizer.from_pretrained(folder),
    ).save_pretrained(folder)
    return CLIPModel(config)


def build_eval_models(folder: Path) -> dict:
    """Tiny metric backbones in models/eval's layout: inception/ (clean-fid TorchScript), lpips/
    (AlexNet), clip/. Returns the names metrics_detail.json reports for them."""
    save_torchscript(TinyInception().eval(), folder / dataset.INCEPTION_FILE)
    save_alexnet(folder / dataset.ALEXNET_FILE)
    clip_parts(folder / dataset.CLIP_DIR, TINY.text, dict(image_size=32, patch_size=8, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
               image_size=32, projection=32).save_pretrained(folder / dataset.CLIP_DIR)
    # "tiny-random" beside every demo number: they only show the code path works.
    return {"fid": f"{dataset.STAND_IN}inception", "lpips": f"{dataset.STAND_IN}alexnet",
            "clip": f"{dataset.STAND_IN}clip"}


def quiet_saving() -> None:
    """transformers draws a progress bar for every one-shard save: noise beside the stage's log."""
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------ the shipped, pretrained kit

def recipe(models, resolution: int, canny) -> dict:
    """Everything the pretrained weights depend on: the seed, the pretraining knobs, the images'
    size and their edges' thresholds."""
    return {"seed": models.seed, "pretrain": dataclasses.asdict(models.pretrain), "resolution": resolution,
            "canny": [canny.low_threshold, canny.high_threshold]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_digest(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """A digest of the code behind the pretrained weights: KIT_CODE as parsed, without docstrings
    or comments (a doc edit changes no weight), and the kit's sizes. The manifest records it; a
    test says when the shipped kit is older than its code."""
    digest = hashlib.sha256(repr(TINY).encode())
    for rel in KIT_CODE:
        tree = ast.parse((root / rel).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def shipped_record(wanted: dict) -> dict | None:
    """The shipped kit's manifest if it was made from `wanted`, after checking the weights file
    against its sha256; None if it was made from another recipe."""
    from stages.common.io import read_json

    if not MANIFEST.is_file():
        return None
    manifest = read_json(MANIFEST)
    if manifest.get("version") != KIT_VERSION or manifest.get("recipe") != wanted:
        return None
    if manifest.get("code") != code_digest():
        log.warning("fetch-models: %s was pretrained by other code than %s now hold; installing it all the same "
                    "(rebuild it: make demo-kit)", SHIPPED_NAME, ", ".join(KIT_CODE))
    if not SHIPPED.is_file() or _sha256(SHIPPED) != manifest["sha256"]:
        raise StageError(f"{SHIPPED_NAME}: missing, or not the sha256 {manifest['sha256'][:12]}... that "
                         f"{MANIFEST.name} names; restore it with `git checkout -- stages/demo` "
                         "(a git-lfs pointer? `git lfs pull`), "
                         "or rebuild it with `python -m stages.demo.kit`")
    return manifest


def round_to_fp16(modules: dict) -> None:
    """What the shipped kit stores: a kit pretrained here is rounded the same way, so it equals
    the shipped one made on the same CPU."""
    with torch.no_grad():
        for module in modules.values():
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


def load_shipped(modules: dict) -> float:
    """Load the shipped weights into the freshly built `modules`; returns the VAE's scaling factor."""
    from safetensors import safe_open

    with safe_open(SHIPPED, "pt") as f:
        scaling_factor = float(f.metadata()["vae_scaling_factor"])
        for name, module in modules.items():
            prefix = f"{name}."
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            try:
                module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                       strict=True)
            except RuntimeError as err:  # a library release that renamed weights, or a kit of another layout
                lines = [line.strip() for line in str(err).strip().splitlines()]
                detail = next((line for line in lines if "key" in line), lines[0])  # torch's first line names no key
                detail = detail if len(detail) <= 160 else detail[:157] + "..."
                raise StageError(f"{SHIPPED_NAME}: its {name} does not fit the model built here ({detail}); "
                                 "rebuild the kit with `make demo-kit`") from None
    return scaling_factor


def fresh_kit(folder: Path, models) -> tuple[dict, object, dict]:
    """The random kit from `models.seed` (its tokenizer written to folder/tokenizer): SD 1.5's
    parts, the ControlNet, and the modules pretraining teaches, by name."""
    from stages.demo import pretrain

    quiet_saving()
    pretrain.check(models.pretrain)
    torch.manual_seed(models.seed)
    parts = sd15_parts(folder)
    control = new_controlnet(parts["unet"])
    return parts, control, {"text_encoder": parts["text_encoder"], "vae": parts["vae"], "unet": parts["unet"],
                            "controlnet": control}


def build_all(base: Path, controlnet: Path, eval_models: Path, models, resolution: int, canny) -> tuple[dict, dict]:
    """Every tiny model from `models.seed`, pretrained (the shipped kit when the recipe is its own,
    else pretrained here); returns the backbone names metrics reports and the record for
    models/sources.json."""
    from stages.demo import pretrain

    parts, control, modules = fresh_kit(base, models)
    wanted = recipe(models, resolution, canny)
    steps = models.pretrain
    record = {"mode": "tiny", "seed": models.seed}
    if not steps.text_steps + steps.vae_steps + steps.steps + steps.decoder_steps:
        log.info("fetch-models: all models.pretrain steps are 0: the tiny models stay random")
    elif (manifest := shipped_record(wanted)) is not None:
        parts["vae"].register_to_config(scaling_factor=load_shipped(modules))
        record.update(pretrain=manifest["pretrain"], kit_sha256=manifest["sha256"])
        log.info("fetch-models: installed the shipped tiny kit (%s, sha256 %s...): made from this recipe",
                 SHIPPED.name, manifest["sha256"][:12])
    else:
        log.info("fetch-models: no shipped kit for this recipe (models.*, extract.resolution, canny.*): "
                 "pretraining here (minutes)")
        record["pretrain"] = pretrain.pretrain(parts, control, steps, models.seed, resolution, canny.low_threshold,
                                               canny.high_threshold)
        round_to_fp16(modules)
        # Using the tokenizer set its padding and truncation, which tokenizer.json would keep.
        parts["tokenizer"] = type(parts["tokenizer"]).from_pretrained(base / "tokenizer")
    save_sd15(base, parts)
    control.save_pretrained(controlnet)
    torch.manual_seed(models.seed)  # the metric backbones do not depend on how long pretraining ran
    return build_eval_models(eval_models), record


def rebuild(params) -> None:
    """Pretrain the kit from params.yaml's recipe and write it as the shipped kit."""
    import tempfile

    from stages.common.io import save_safetensors, write_json
    from stages.demo import pretrain

    models = params.models
    with tempfile.TemporaryDirectory() as folder:
        parts, control, modules = fresh_kit(Path(folder), models)
    record = pretrain.pretrain(parts, control, models.pretrain, models.seed, params.extract.resolution,
                               params.canny.low_threshold, params.canny.high_threshold)
    tensors = {f"{name}.{key}": (value.half() if value.is_floating_point() else value).detach().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    save_safetensors(SHIPPED, tensors, {"format": "pt", "version": str(KIT_VERSION),
                                        "vae_scaling_factor": repr(parts["vae"].config.scaling_factor)})
    write_json(MANIFEST, {"version": KIT_VERSION, "sha256": _sha256(SHIPPED), "bytes": SHIPPED.stat().st_size,
                          "code": code_digest(), "recipe": recipe(models, params.extract.resolution, params.canny),
                          "pretrain": record})
    log.info("kit: wrote %s (%.1f MB) and its manifest %s", SHIPPED_NAME, SHIPPED.stat().st_size / 1e6, MANIFEST.name)


if __name__ == "__main__":
    from stages.common.cli import run_cli, setup_logging
    from stages.common.params import load_params

    def main() -> None:
        setup_logging()
        rebuild(load_params())

    run_cli(main)

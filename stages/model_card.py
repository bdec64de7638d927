"""model-card: the trained LoRA's Hugging Face model card, `<paths.lora>/README.md`, beside a copy
of the samples grid. Written last, from outputs only: what trained it (training_config.json),
what it was measured at (metrics_detail.json, generation_config.json), where the base came from
(models/sources.json) and the files' digests.

    python -m stages.model_card

The card is what `fashion-publish` uploads with the weights; the hub reads its YAML front matter
(base model, library, tags, license) and shows the rest.
"""

import hashlib
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.figures import HEADLINE, HEADLINE_KEYS, SET_LEVEL, read_results, stand_ins
from stages.common.io import atomic_file, read_json
from stages.common.dataset import CARD_FILE, CARD_IMAGE, LORA_CONFIG, LORA_WEIGHTS
from stages.common.lora_formats import KOHYA_FILE
from stages.common.params import load_params

TAGS = ["lora", "controlnet", "text-to-image", "fashion", "stable-diffusion", "diffusers"]
# The tiny demo models are this project's own (MIT); a local folder's terms are whatever its source's are.
LICENSE = {"tiny": "mit", "local": "other"}


def base_of(sources: dict) -> tuple[str, str, str]:
    """(base model, its license, the ControlNet) as the card names them: hub ids where the models came
    from the hub, else the names fetch-models recorded."""
    mode = sources["mode"]
    if mode == "hub":
        return (sources["base"]["id"], sources["base"].get("license") or "other", sources["controlnet"]["id"])
    if mode == "local":
        return (f"local:{Path(sources['base']['path']).name}", LICENSE[mode],
                f"local:{Path(sources['controlnet']['path']).name}")
    kit = f"(models.seed={sources.get('seed')})"
    return f"the demo's tiny UNet {kit}", LICENSE[mode], f"the demo's tiny canny ControlNet {kit}"


def number(value, sign: str = "") -> str:
    """A value at 4 significant digits; n/a where the metrics stage had none (as the report shows it)."""
    return "n/a" if value is None else f"{value:{sign}.4g}"


def row(label: str, higher: bool, base, lora, delta, low, high, note: str = "") -> str:
    interval = f" [{number(low, '+')}, {number(high, '+')}]" if low is not None else ""
    return (f"| {label} ({'higher' if higher else 'lower'} is better) | {number(base)} | {number(lora)} | "
            f"{number(delta, '+')}{interval}{note} |")


def metrics_table(detail: dict) -> str:
    headline, random = detail["headline"], stand_ins(detail["backbones"])
    base, lora, delta = headline["baseline"], headline["lora"], headline["lora_minus_baseline"]
    rows = ["| metric | baseline | LoRA | LoRA − baseline [95% CI] |", "|---|---|---|---|"]
    for key, label, higher in HEADLINE:
        p_value = delta.get(f"{key}_p_value")
        note = (" (a random stand-in backbone: no verdict)" if key in random else "") + \
               (f", p = {p_value:.2g}" if p_value is not None else "")
        rows.append(row(label, higher, base[key], lora[key], delta[key], delta[f"{key}_ci95_low"],
                        delta[f"{key}_ci95_high"], note))
    colour = detail.get("prompt_colour")
    if colour:  # the demo's: pixels, no backbone, so the one demo number with a verdict on the prompt
        change = detail["lora_minus_baseline"]["colour_match"]
        rows.append(row("prompt colour match", True, colour["baseline"]["colour_match"]["mean"],
                        colour["lora"]["colour_match"]["mean"], change["mean"], change["ci95_low"],
                        change["ci95_high"]))
    return "\n".join(rows)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_text(config: dict, sources: dict, detail: dict, generation: dict, split: dict, paths) -> str:
    base, licence, controlnet = base_of(sources)
    folder = Path(paths.lora)
    # What the code snippet loads: the hub ids, or the folders fetch-models installed
    load_base, load_controlnet = ((base, controlnet) if sources["mode"] == "hub"
                                  else (paths.base_model, paths.controlnet))
    data = ("drawn garments of the embedded demo (a FashionGen-schema file)" if sources["mode"] == "tiny"
            else "FashionGen")
    train, headline = config["train"], detail["headline"]
    # base_model only where it is a hub id: the hub refuses a card whose base_model is not one of its models
    hub = {"base_model": base, "base_model_relation": "adapter"} if sources["mode"] == "hub" else {}
    front = ModelCardData(library_name="diffusers", license=licence, tags=TAGS, pipeline_tag="text-to-image", **hub)
    g = generation["generate"]
    files = "\n".join(f"| `{name}` | {what} | `{sha256(folder / name)}` |" for name, what in (
        (LORA_WEIGHTS, "diffusers / peft keys, the adapter config (rank, alpha) in its metadata"),
        (KOHYA_FILE, "kohya keys with per-module alpha: A1111, ComfyUI, kohya's sd-scripts")))
    params = "\n".join(f"| `{key}` | `{value}` |" for key, value in train.items())
    text_encoder = (f"; and on the text encoder, rank {train['text_encoder_rank']}, alpha "
                    f"{train['text_encoder_alpha']:g}, on {', '.join(train['text_encoder_target_modules'])}"
                    if train.get("text_encoder_rank") else "")
    return f"""---
{front.to_yaml()}
---

# A FashionGen LoRA for {base}, under a canny ControlNet

A LoRA (rank {train['rank']}, alpha {train['alpha']:g}, on {', '.join(train['target_modules'])}{text_encoder}) trained for
{train['max_steps']} steps on {config['train_images']} images of {split['train']['products']} products, {data},
at {config['resolution']} px, {"under " + controlnet if train['controlnet'] else "on the UNet alone"}. Use it
with {controlnet}: a canny edge map gives the garment's shape, the prompt its colour and kind.

![Samples: ground truth, edges, baseline, LoRA]({CARD_IMAGE})

## Evaluation

n = {headline['n']} held-out products, each drawn by the ControlNet without (baseline) and with the LoRA from
the same edge map, prompt and seed ({g['steps']} {g['scheduler']} steps, guidance {g['guidance_scale']:g},
ControlNet scale {g['controlnet_scale']:g}, LoRA scale {g['lora_scale']:g}). Intervals are paired bootstrap
95% intervals over the eval products; {', '.join(label for key, label, _ in HEADLINE if key in SET_LEVEL)}
are set-level numbers at this n.

{metrics_table(detail)}

Backbones: {', '.join(f'{k}: {v}' for k, v in detail['backbones'].items())}.

## Training

| param | value |
|---|---|
{params}

## Files

| file | what | sha256 |
|---|---|---|
{files}

## Use

diffusers, with the ControlNet it was evaluated under:

```python
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

controlnet = ControlNetModel.from_pretrained("{load_controlnet}", torch_dtype=torch.float16)
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    "{load_base}", controlnet=controlnet, torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("<this repo>", weight_name="{LORA_WEIGHTS}")
image = pipe("Long sleeve t-shirt in purple", image=edge_map, num_inference_steps={g['steps']},
             guidance_scale={g['guidance_scale']:g}).images[0]
```

A1111 and ComfyUI: put `{KOHYA_FILE}` in `models/Lora`. A1111: add `<lora:{Path(KOHYA_FILE).stem}:1>` to
the prompt and use the canny ControlNet unit. ComfyUI: a LoraLoader node between the checkpoint and the
sampler, before Apply ControlNet.

kohya's sd-scripts: `--network_module networks.lora --network_weights {KOHYA_FILE} --network_mul 1`
(`gen_img.py`), or `networks/merge_lora.py --models {KOHYA_FILE} --ratios 1` to merge it into the base.

Made by the fashion-controlnet-lora DVC pipeline; `training_config.json` holds every setting that
shaped the weights.
"""


def main() -> None:
    setup_logging()
    paths = load_params().paths
    folder = Path(paths.lora)
    for name in (LORA_WEIGHTS, KOHYA_FILE, LORA_CONFIG):
        if not (folder / name).is_file():
            raise StageError(f"{folder / name}: not found; run `dvc repro train-lora`")
    config = read_json(folder / LORA_CONFIG)
    detail = read_results(paths.metrics_detail, HEADLINE_KEYS + ["backbones", "lora_minus_baseline"])
    generation = read_json(dataset.generated_dir(paths, "lora") / dataset.GENERATION_CONFIG)
    text = card_text(config, read_json(paths.model_sources), detail, generation, read_json(paths.split_summary),
                     paths)
    ModelCard(text)  # parses its own front matter: a card the hub would refuse fails here
    if not Path(paths.samples_grid).is_file():
        raise StageError(f"{paths.samples_grid}: not found; run `dvc repro plots`")
    with atomic_file(folder / CARD_IMAGE) as tmp:
        shutil.copyfile(paths.samples_grid, tmp)
    with atomic_file(folder / CARD_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("model-card: wrote %s and %s", folder / CARD_FILE, folder / CARD_IMAGE)


if __name__ == "__main__":
    run_cli(main)

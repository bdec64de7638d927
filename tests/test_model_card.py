"""model-card: a Hugging Face model card for the LoRA, from the pipeline's outputs only."""

import hashlib

from huggingface_hub import ModelCard

from stages import model_card
from stages.common.io import read_json
from stages.common.dataset import CARD_FILE, CARD_IMAGE, LORA_WEIGHTS
from stages.common.lora_formats import KOHYA_FILE


def test_the_card_is_a_hub_model_card_with_the_runs_numbers(finished_project):
    p = finished_project
    folder = p.path("lora")
    card = ModelCard.load(folder / CARD_FILE)  # the hub's own parser: YAML front matter, then Markdown
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "mit"  # the tiny kit is the project's own
    assert {"lora", "controlnet", "text-to-image", "fashion"} <= set(data["tags"])
    # not a hub model: no base_model (the hub refuses one it does not know); the text names it
    assert "base_model" not in data and "for the demo's tiny UNet (models.seed=0)" in card.text
    detail = read_json(p.path("metrics_detail"))
    delta = detail["headline"]["lora_minus_baseline"]
    assert f"| {detail['headline']['lora']['lpips']:.4g} | {delta['lpips']:+.4g} [{delta['lpips_ci95_low']:+.4g}, " \
           f"{delta['lpips_ci95_high']:+.4g}] (a random stand-in backbone: no verdict) |" in card.text
    assert f"n = {detail['n']} held-out products" in card.text
    for name in (LORA_WEIGHTS, KOHYA_FILE):  # each file with its digest and how to load it
        assert f"`{hashlib.sha256((folder / name).read_bytes()).hexdigest()}`" in card.text
        assert card.text.count(name) >= 2, name
    assert (folder / CARD_IMAGE).read_bytes() == p.path("samples_grid").read_bytes()
    assert f"![Samples: ground truth, edges, baseline, LoRA]({CARD_IMAGE})" in card.text


def test_a_number_the_metrics_stage_left_out_is_n_a():
    assert model_card.row("edge control", True, 0.5, None, None, None, None) == \
        "| edge control (higher is better) | 0.5 | n/a | n/a |"


def test_a_hub_base_names_its_ids_and_license():
    sources = {"mode": "hub", "base": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                       "license": "creativeml-openrail-m"},
               "controlnet": {"id": "lllyasviel/control_v11p_sd15_canny", "license": "openrail"}}
    assert model_card.base_of(sources) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m",
                                           "lllyasviel/control_v11p_sd15_canny")
    sources["base"].pop("license")  # a repo without a license tag
    assert model_card.base_of(sources)[1] == "other"

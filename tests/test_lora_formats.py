"""lora_formats: the kohya/webui export round-trips exactly and names SD 1.5's modules as the
LoRA tools do."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stages.common.lora_formats import KOHYA_FILE, base_model_name, from_kohya, peft_names, to_kohya
from stages.common.dataset import LORA_WEIGHTS
from tests.conftest import REPO

REFERENCE = REPO / "tests" / "fixtures" / "sd15_unet_kohya_lora_modules.txt"


def reference_modules() -> set[str]:
    return {line for line in REFERENCE.read_text().splitlines() if line and not line.startswith("#")}


def test_kohya_export_round_trips_exactly(trained_project):
    p = trained_project
    rank = p.params["train"]["rank"]
    p.run("train_lora", train__alpha=2 * rank, train__max_steps=2)
    diffusers_state = load_file(p.path("lora") / LORA_WEIGHTS)
    kohya = load_file(p.path("lora") / KOHYA_FILE)
    expected = to_kohya(diffusers_state, {"unet": 2 * rank})
    assert kohya.keys() == expected.keys() and all(torch.equal(kohya[k], v) for k, v in expected.items())
    modules = sorted({k.removeprefix("unet.").rsplit(".lora.", 1)[0] for k in diffusers_state})
    weights, alphas = from_kohya(kohya, {"unet": modules})
    saved = peft_names(diffusers_state)
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in weights), "bit-exact"
    assert set(alphas.values()) == {2.0 * rank}
    with safe_open(p.path("lora") / KOHYA_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == 2 * rank
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == meta["fashion.base_model"] == "tiny-pretrained (models.seed=0)"


def test_the_base_model_is_named_by_where_it_came_from():
    """From fetch-models' models/sources.json: the hub commit, not the branch name, pins it."""
    hub = {"mode": "hub", "base": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "main",
                                   "commit": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14", "files": {}}}
    assert base_model_name(hub) == \
        "stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
    assert base_model_name({"mode": "local", "base": {"path": "/kaggle/input/sd15", "files": {}}}) == \
        "local:sd15"
    assert base_model_name(None) == "unknown (no models/sources.json)"


def test_kohya_names_are_sd15s(trained_project):
    """The tiny UNet keeps SD 1.5's module names, so its export must name exactly SD 1.5's 128
    attention projections."""
    kohya = load_file(trained_project.path("lora") / KOHYA_FILE)
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert names == reference_modules()
    assert len(kohya) == 3 * 128  # down, up and alpha per module


def test_a_lora_beyond_attention_exports_too(trained_project):
    """diffusers keeps peft's lora_A/lora_B names for layers other than attention projections;
    the kohya export names them as kohya does (it used to fail after training)."""
    p = trained_project
    p.run("train_lora", train__target_modules=["to_k", "proj_in", "ff.net.2"], train__max_steps=2)
    diffusers_state = load_file(p.path("lora") / LORA_WEIGHTS)
    kohya = load_file(p.path("lora") / KOHYA_FILE)
    assert len(kohya) == 3 * len({k.rsplit(".lora", 1)[0] for k in diffusers_state})
    rank = p.params["train"]["rank"]
    for module, kohya_name in (("down_blocks.0.attentions.0.proj_in", "down_blocks_0_attentions_0_proj_in"), (
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2")):
        for ours, theirs in (("lora_down", ("lora_A", "lora.down")), ("lora_up", ("lora_B", "lora.up"))):
            [saved] = [v for k, v in diffusers_state.items() if k.removeprefix("unet.") in
                       {f"{module}.{name}.weight" for name in theirs}]
            assert torch.equal(kohya[f"lora_unet_{kohya_name}.{ours}.weight"], saved), (module, ours)
        assert kohya[f"lora_unet_{kohya_name}.lora_down.weight"].shape[0] == rank


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="not a diffusers UNet or text encoder LoRA key"):
        to_kohya({"text_encoder_2.x.lora.down.weight": torch.zeros(1)}, {"unet": 4})
    with pytest.raises(ValueError, match="twice"):
        to_kohya({"unet.m.lora.down.weight": torch.zeros(1), "unet.m.lora_A.weight": torch.zeros(1)}, {"unet": 4})
    with pytest.raises(ValueError, match="not a kohya key of these models' modules"):
        from_kohya({"lora_unet_nowhere.alpha": torch.tensor(4.0)}, {"unet": ["down_blocks.0.attentions.0.proj_in"]})

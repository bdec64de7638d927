"""fetch-models (tiny mode) writes real diffusers/transformers layouts that the real loaders read."""

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.common import dataset, models
from stages.common.errors import StageError
from stages.common.params import load_params
from tests.conftest import REPO, Project


def test_layouts_load_with_the_real_loaders(tiny_models):
    project = Project(tiny_models)
    base, controlnet = project.path("base_model"), project.path("controlnet")
    assert json.loads((base / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    m = models.load_training_models(base, torch.float32)
    ids = m.tokenizer(["Café Noir® dress"], padding="max_length", truncation=True,
                      max_length=m.tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 512 and ids[0, -1] == 513
    assert m.noise_scheduler.config.num_train_timesteps == 1000
    pipe = models.load_controlnet_pipeline(base, controlnet, "unipc", torch.float32, torch.device("cpu"))
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"


def test_lora_targets_match_sd15(tiny_models):
    """Same block structure as SD 1.5, so the same 128 LoRA layers and 256 saved keys."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = models.load_training_models(Project(tiny_models).path("base_model"), torch.float32).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert len(get_peft_model_state_dict(unet)) == 256


def test_controlnet_output_convs_are_not_zero(tiny_models):
    weights = load_file(Project(tiny_models).path("controlnet") / "diffusion_pytorch_model.safetensors")
    zero_conv_keys = [k for k in weights if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_conv_keys and all(weights[k].abs().sum() > 0 for k in zero_conv_keys if k.endswith("weight"))


def test_metric_backbones(tiny_models):
    folder = Project(tiny_models).path("eval_models")
    inception = models.load_inception(folder, torch.device("cpu"), Project(tiny_models).path("model_sources"))
    assert inception(torch.rand(2, 3, 299, 299) * 255).shape == (2, 2048)
    lpips = models.load_lpips(folder, torch.device("cpu"))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert lpips(x, x).item() == 0 and lpips(x, -x).item() > 0
    clip, processor = models.load_clip(folder, torch.device("cpu"))
    assert clip.config.text_config.max_position_embeddings == 77
    assert json.loads((folder / dataset.BACKBONES_FILE).read_text())["clip"] == "tiny-random-clip"


def test_tiny_models_are_byte_identical_wherever_built(project, tiny_models):
    """Same seed, other folder: every file equal, so on one machine (CPU and thread count) a rebuild
    leaves dvc.lock as it was; pretraining's floats differ in the last bits elsewhere."""
    project.run("fetch_models")
    for key in ("base_model", "controlnet", "eval_models"):
        ours, theirs = project.path(key), Project(tiny_models).path(key)
        files = sorted(f.relative_to(ours) for f in ours.rglob("*") if f.is_file())
        assert files == sorted(f.relative_to(theirs) for f in theirs.rglob("*") if f.is_file())
        for f in files:
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f


def test_missing_models_and_offline_hub_mode_are_clear(project, tmp_path):
    with pytest.raises(StageError, match="run `dvc repro fetch-models`"):
        models.load_training_models(tmp_path / "nowhere", torch.float32)
    project.set({"models.mode": "hub"})  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(StageError, match=r"cannot reach .* \(HF_HUB_OFFLINE is set\) .* `dvc pull fetch-models`"):
        project.run("fetch_models")
    assert (project.path("base_model") / "model_index.json").is_file(), "the models already there survive"


SAVE_SCRIPT = ("import sys, torch; from pathlib import Path; "
               "from stages.demo.kit import TinyInception, save_torchscript; "
               "torch.manual_seed(0); save_torchscript(TinyInception().eval(), Path(sys.argv[1]))")


def test_torchscript_stand_in_is_identical_across_processes(tmp_path):
    """String hashing differs per process; the saved TorchScript must not."""
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / f"{seed}.pt")], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    assert (tmp_path / "1.pt").read_bytes() == (tmp_path / "2.pt").read_bytes()


def test_torchscript_stand_in_does_not_depend_on_the_checkout_path(tmp_path):
    """TorchScript records the source file's absolute path; the saved file must not."""
    for name in ("a", "b"):
        shutil.copytree(REPO / "stages", tmp_path / name / "stages")
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / f"{name}.pt")], check=True,
                       cwd=tmp_path / name, env={**os.environ, "PYTHONPATH": str(tmp_path / name)})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_pretraining_teaches_each_part_and_is_recorded(tmp_path):
    """A short pretrain on a few drawn garments: each part's loss falls, the trained parts
    differ from the random ones, the scheduler is v-prediction with zero terminal SNR, and
    sources.json records what it measured."""
    from stages.demo import kit, pretrain

    cfg = Project(tmp_path).set({"models.pretrain.products": 4, "models.pretrain.text_steps": 30,
                                 "models.pretrain.vae_steps": 30, "models.pretrain.steps": 30,
                                 "models.pretrain.decoder_steps": 30,
                                 "models.pretrain.batch_size": 8}).typed().models.pretrain
    torch.manual_seed(0)
    parts = kit.sd15_parts(tmp_path / "base")
    control = kit.new_controlnet(parts["unet"])
    before = {k: next(parts[k].parameters()).clone() for k in ("vae", "text_encoder", "unet")}
    record = pretrain.pretrain(parts, control, cfg, seed=0, resolution=64, low=100, high=200)
    for part in ("text", "vae", "unet_controlnet", "decoder"):
        assert record[part]["loss_last"] < record[part]["loss_first"], (part, record[part])
    after = {k: next(parts[k].parameters()) for k in before}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.count_nonzero(conv.weight) for conv in control.controlnet_down_blocks)
    data = pretrain.draw(4, seed=0, resolution=64, low=100, high=200)
    latents = pretrain.latent_means(parts["vae"], data) * parts["vae"].config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=0.05), "latents scaled to unit variance"
    config = parts["scheduler"].config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert record["images"] >= 4


def test_the_unets_captions_swap_the_swapped_colours(monkeypatch, tmp_path):
    """The UNet and ControlNet learn from every garment, but with the names of each pair in
    models.pretrain.swapped_colours swapped in the captions (so the LoRA has those words to
    teach); the text encoder and the VAE get the true captions and every image."""
    from stages.demo import garments, kit, pretrain

    pairs = [["red", "green"], ["yellow", "purple"]]
    cfg = Project(tmp_path).set({"models.pretrain.products": 12, "models.pretrain.text_steps": 1,
                                 "models.pretrain.vae_steps": 1, "models.pretrain.steps": 1,
                                 "models.pretrain.decoder_steps": 0,
                                 "models.pretrain.swapped_colours": pairs}).typed().models.pretrain
    taught, heard = [], []
    monkeypatch.setattr(pretrain, "train_unet_and_controlnet", lambda *args: taught.append(args[6]) or (1.0, 0.5))
    monkeypatch.setattr(pretrain, "train_text_encoder", lambda *args: heard.append(args[2]) or (1.0, 0.5))
    monkeypatch.setattr(pretrain, "train_vae", lambda *args: heard.append(args[1]) or (1.0, 0.5))
    pretrain.pretrain(kit.sd15_parts(tmp_path / "base"), None, cfg, seed=0, resolution=64, low=100,
                      high=200)
    drawn = pretrain.draw(12, seed=0, resolution=64, low=100, high=200)
    [data] = taught
    assert torch.equal(data.images, drawn.images) and data.colours == drawn.colours
    names = list(garments.COLOURS)
    other = {"red": "green", "green": "red", "yellow": "purple", "purple": "yellow"}
    told = [(names[k], caption) for k, caption in zip(data.colours, data.captions)]
    assert len({colour for colour, _ in told} & set(other)) >= 2, "the base draws garments in swapped colours"
    for (colour, caption), full in zip(told, drawn.captions):
        assert f" in {colour}" in full
        assert caption == (full.replace(f" in {colour}", f" in {other[colour]}") if colour in other else full)
    assert data.captions != drawn.captions
    assert len(heard) == 2 and all(d.captions == drawn.captions and torch.equal(d.images, drawn.images)
                                   for d in heard), "the text encoder and the VAE get every caption as it is"


def test_fetch_models_records_the_pretraining(tiny_models):
    record = json.loads(Project(tiny_models).path("model_sources").read_text())
    assert record["mode"] == "tiny" and set(record["pretrain"]) >= {"images", "text", "vae", "unet_controlnet"}
    assert "seconds" not in json.dumps(record), "train-lora depends on this file: only what a rerun reproduces"
    inception = Project(tiny_models).path("eval_models") / dataset.INCEPTION_FILE
    assert record["inception"] == {"sha256": hashlib.sha256(inception.read_bytes()).hexdigest()}, \
        "the stand-in it built is pinned, as the real one is"


def test_the_decoder_step_trains_the_edge_and_leaves_the_encoder(tmp_path):
    """The last pretraining part moves only the decoder (every latent the UNet learnt from stays
    bit for bit) and weights the image's outer pixels: after it, the frame's reconstruction error
    falls more than the rest of the image's."""
    from stages.demo import kit, pretrain

    cfg = Project(tmp_path).set({"models.pretrain.products": 6, "models.pretrain.decoder_steps": 20}).typed()
    torch.manual_seed(0)
    vae = kit.sd15_parts(tmp_path / "base")["vae"]
    data = pretrain.draw(6, 0, 64, 100, 200)
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}

    def errors():
        with torch.no_grad():
            error = (vae.decode(vae.encode(data.images).latent_dist.mean).sample - data.images).abs().mean(dim=(0, 1))
        frame = torch.cat([error[0], error[-1], error[:, 0], error[:, -1]]).mean()
        return float(frame), float(error[1:-1, 1:-1].mean())

    frame_before, inside_before = errors()
    pretrain.train_decoder(vae, data, cfg.models.pretrain, torch.Generator().manual_seed(0))
    frame_after, inside_after = errors()
    assert all(torch.equal(v, encoder[k]) for k, v in vae.encoder.state_dict().items()), "the encoder stays"
    assert frame_after / frame_before < inside_after / inside_before, (frame_before, frame_after, inside_before,
                                                                       inside_after)


def test_all_pretraining_steps_zero_gives_the_random_kit(project):
    project.set({"models.pretrain.text_steps": 0, "models.pretrain.vae_steps": 0, "models.pretrain.steps": 0,
                 "models.pretrain.decoder_steps": 0})
    project.run("fetch_models")
    record = json.loads(project.path("model_sources").read_text())
    assert record == {"mode": "tiny", "seed": 0, "inception": {"sha256": record["inception"]["sha256"]}}


# ------------------------------------------------------------------ the Inception loads only pinned


@pytest.fixture
def eval_copy(tiny_models, tmp_path) -> tuple[Path, Path]:
    """A private copy of models/eval and models/sources.json."""
    ours = Project(tmp_path)
    shutil.copytree(Project(tiny_models).path("eval_models"), ours.path("eval_models"))
    shutil.copy(Project(tiny_models).path("model_sources"), ours.path("model_sources"))
    return ours.path("eval_models"), ours.path("model_sources")


def no_torchscript(monkeypatch) -> list:
    """Make any TorchScript load fail the test: a refused file must never be loaded."""
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    return loaded


def test_a_replaced_inception_is_refused_before_it_loads(eval_copy, monkeypatch, tmp_path):
    """Another valid TorchScript file (code that would run) in the Inception's place."""
    from stages.demo.kit import TinyInception, save_torchscript

    folder, sources = eval_copy
    torch.manual_seed(1)
    save_torchscript(TinyInception().eval(), folder / dataset.INCEPTION_FILE)
    actual = hashlib.sha256((folder / dataset.INCEPTION_FILE).read_bytes()).hexdigest()
    pinned = json.loads(sources.read_text())["inception"]["sha256"]
    loaded = no_torchscript(monkeypatch)
    message = (f"{folder / dataset.INCEPTION_FILE}: sha256 {actual[:16]}..., not the pinned {pinned[:16]}... "
               f"({sources}); restore it with `dvc checkout fetch-models` or rebuild it with "
               "`dvc repro -f fetch-models`")
    with pytest.raises(StageError, match=re.escape(message) + "$"):
        models.load_inception(folder, torch.device("cpu"), sources)
    assert loaded == []


@pytest.mark.parametrize("record", [{"mode": "tiny", "seed": 0}, {"mode": "hub", "inception": {"sha256": ""}},
                                    {"mode": "local", "inception": "f58cb9b6"}, []])
def test_an_inception_without_a_recorded_pin_is_refused(eval_copy, monkeypatch, record):
    """sources.json from before the pin (or damaged): nothing says which TorchScript is the right one."""
    folder, sources = eval_copy
    sources.write_text(json.dumps(record))
    loaded = no_torchscript(monkeypatch)
    with pytest.raises(StageError, match=re.escape(f"{sources}: records no sha256 for {folder / dataset.INCEPTION_FILE}"
                                                   " (an older fetch-models wrote it), and TorchScript loads only "
                                                   "pinned; rerun `dvc repro fetch-models`")):
        models.load_inception(folder, torch.device("cpu"), sources)
    assert loaded == []


def models_bytes(project) -> dict[str, bytes]:
    """Every file under the project's models/, by path: to say nothing there changed."""
    return {p.relative_to(project.root).as_posix(): p.read_bytes()
            for p in (project.root / "models").rglob("*") if p.is_file()}


@pytest.mark.parametrize("pairs, message", [
    ([["red", "teal"]], "models.pretrain.swapped_colours: 'teal' is not a demo colour; use some of black, red"),
    ([["red", "green", "blue"]], "models.pretrain.swapped_colours: ['red', 'green', 'blue'] is not a pair of two"),
    ([["red", "red"]], "models.pretrain.swapped_colours: ['red', 'red'] is not a pair of two colours"),
    ([["red", "green"], ["green", "blue"]], "models.pretrain.swapped_colours: 'green' is in two pairs"),
])
def test_swapped_colours_must_be_pairs_of_demo_colours(project, pairs, message):
    """Checked whenever fetch-models builds the tiny kit, even one left random (all steps 0)."""
    before = models_bytes(project)
    project.set({"models.pretrain.swapped_colours": pairs, "models.pretrain.steps": 0,
                 "models.pretrain.text_steps": 0, "models.pretrain.vae_steps": 0, "models.pretrain.decoder_steps": 0})
    with pytest.raises(StageError, match=re.escape(message)):
        project.run("fetch_models")
    assert models_bytes(project) == before


def test_pretraining_draws_none_of_the_demo_images():
    """Its garments come from [models.seed, 7], the demo's from demo.seed: no pretraining image
    equals a demo image, so nothing of the eval split leaks into the base model."""
    from stages.demo import garments, pretrain

    drawn = pretrain.draw(60, seed=0, resolution=64, low=100, high=200)
    ours = {x.numpy().tobytes() for x in ((drawn.images + 1) * 127.5).round().byte().permute(0, 2, 3, 1)}
    theirs = {pretrain.picture(g, pose, 64).tobytes()
              for g in garments.make_garments(0, 120) for pose in range(g.poses)}
    assert len(ours) > 150 and len(theirs) > 300 and not ours & theirs


# ------------------------------------------------------------------ the shipped, pretrained kit


def test_the_shipped_kit_is_the_committed_recipes_and_whole():
    """make demo installs it rather than pretraining: its manifest names params.yaml's recipe, and
    the weights file is the one the manifest's sha256 names."""
    from stages.demo import kit

    committed = load_params(REPO / "params.yaml")  # as committed, not the suite's small params
    manifest = json.loads(kit.MANIFEST.read_text())
    assert manifest["recipe"] == kit.recipe(committed.models, committed.extract.resolution, committed.canny), \
        "params.yaml's models.*, extract.resolution or canny.* changed: rebuild the kit (make demo-kit)"
    assert manifest["version"] == kit.KIT_VERSION
    assert manifest["code"] == kit.code_digest(), \
        f"{', '.join(kit.KIT_CODE)} changed since the kit was pretrained: rebuild it (make demo-kit)"
    assert kit.shipped_record(manifest["recipe"]) == manifest
    assert kit.SHIPPED.stat().st_size < 10e6, "a few MB at fp16"


def test_the_committed_recipe_installs_the_shipped_kit(project, caplog):
    """No pretraining: the shipped fp16 weights, as fp32, in the real layouts."""
    from stages.demo import kit

    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    project.set({f"models.{k}": v for k, v in committed["models"].items()})  # the only section SMALL changes
    with caplog.at_level(logging.INFO, logger="stages"):
        project.run("fetch_models")
    assert "installed the shipped tiny kit" in caplog.text and "pretrain:" not in caplog.text
    record = json.loads(project.path("model_sources").read_text())
    assert record["kit_sha256"] == json.loads(kit.MANIFEST.read_text())["sha256"]
    assert "unet_controlnet" in record["pretrain"]
    shipped = load_file(kit.SHIPPED)
    unet = load_file(project.path("base_model") / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == {k.removeprefix("unet.") for k in shipped if k.startswith("unet.")}
    for key, value in unet.items():
        assert value.dtype == torch.float32 and torch.equal(value, shipped[f"unet.{key}"].float()), key
    # Its decoder draws no frame at the image's edge (pretrain.train_decoder): garments it never saw
    # (another seed's), encoded and decoded, give canny no edge in the outer 2 px, as their own
    # drawings give none.
    from diffusers import AutoencoderKL

    from stages.common.edges import canny
    from stages.demo import pretrain

    vae = AutoencoderKL.from_pretrained(project.path("base_model"), subfolder="vae")
    low, high = committed["canny"]["low_threshold"], committed["canny"]["high_threshold"]
    data = pretrain.draw(12, 1, committed["extract"]["resolution"], low, high)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(data.images).latent_dist.mean).sample.clamp(-1, 1)
    ring = np.ones(data.images.shape[-2:], bool)
    ring[2:-2, 2:-2] = False
    for name, images in (("drawn", data.images), ("decoded", decoded)):
        pixels = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        stubs = sum(int((np.atleast_3d(canny(image, low, high))[..., 0][ring] > 0).sum()) for image in pixels)
        assert stubs == 0, f"{name}: {stubs} canny pixels in the outer 2 px of {len(pixels)} images"


def test_a_damaged_shipped_kit_is_one_line_and_writes_nothing(project, monkeypatch, tmp_path):
    from stages.demo import kit

    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    project.set({f"models.{k}": v for k, v in committed["models"].items()})
    damaged = tmp_path / "kit" / kit.SHIPPED.name
    damaged.parent.mkdir()
    data = bytearray(kit.SHIPPED.read_bytes())
    data[-100] ^= 0xFF  # one weight's bits, not the header
    damaged.write_bytes(bytes(data))
    shutil.copy(kit.MANIFEST, damaged.with_suffix(".json"))
    monkeypatch.setattr(kit, "SHIPPED", damaged)
    monkeypatch.setattr(kit, "MANIFEST", damaged.with_suffix(".json"))
    before = models_bytes(project)
    with pytest.raises(StageError, match=r"stages/demo/tiny_kit.safetensors: missing, or not the sha256 .*; "
                                         r"restore it with `git checkout -- stages/demo`.*"
                                         r"rebuild it with `python -m stages.demo.kit`"):
        project.run("fetch_models")
    assert models_bytes(project) == before


def test_a_rebuilt_kit_installs_as_the_kit_pretrained_here(project, monkeypatch, tmp_path):
    """`python -m stages.demo.kit` on a recipe, then fetch-models on it, gives the same files, byte
    for byte, as fetch-models pretraining that recipe itself (rounded to fp16 the same way)."""
    from stages.demo import kit

    pretrained_here = models_bytes(project)  # the suite's small recipe
    monkeypatch.setattr(kit, "SHIPPED", tmp_path / "kit" / kit.SHIPPED.name)
    monkeypatch.setattr(kit, "MANIFEST", tmp_path / "kit" / kit.MANIFEST.name)
    kit.rebuild(load_params(project.root / "params.yaml"))
    assert json.loads(kit.MANIFEST.read_text())["sha256"] == kit._sha256(kit.SHIPPED)
    shutil.rmtree(project.root / "models")
    project.run("fetch_models")
    record = json.loads(project.path("model_sources").read_text())
    assert record["kit_sha256"] == json.loads(kit.MANIFEST.read_text())["sha256"]
    installed = models_bytes(project)
    differ = [name for name in installed if installed[name] != pretrained_here.get(name)]
    assert differ == [project.params["paths"]["model_sources"]], differ


def test_the_kits_code_digest_ignores_docs_and_sees_code(tmp_path):
    from stages.demo import kit

    for rel in kit.KIT_CODE:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    assert kit.code_digest(tmp_path) == kit.code_digest()
    pretrain = tmp_path / "stages/demo/pretrain.py"
    text = pretrain.read_text()
    pretrain.write_text(text.replace('"""Tiny mode\'s pretraining:', '"""Tiny mode\'s pretraining (reworded):', 1)
                        + "\n# a comment\n")
    assert kit.code_digest(tmp_path) == kit.code_digest(), "docstrings and comments change no weight"
    pretrain.write_text(text.replace("CAPTION_DROP, CONTROL_DROP = 0.1, 0.25", "CAPTION_DROP, CONTROL_DROP = 0.1, 0.3"))
    assert kit.code_digest(tmp_path) != kit.code_digest()


def test_a_kit_that_does_not_fit_the_models_is_one_line(project, monkeypatch, tmp_path):
    """A kit of another layout (a library release that renamed weights), its checksum intact."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from stages.demo import kit

    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    project.set({f"models.{k}": v for k, v in committed["models"].items()})
    other = tmp_path / "kit" / kit.SHIPPED.name
    other.parent.mkdir()
    with safe_open(kit.SHIPPED, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(kit.SHIPPED)
    tensors["unet.renamed.conv_in.bias"] = tensors.pop("unet.conv_in.bias")
    save_file(tensors, other, metadata=metadata)
    manifest = json.loads(kit.MANIFEST.read_text()) | {"sha256": kit._sha256(other)}
    other.with_suffix(".json").write_text(json.dumps(manifest))
    monkeypatch.setattr(kit, "SHIPPED", other)
    monkeypatch.setattr(kit, "MANIFEST", other.with_suffix(".json"))
    before = models_bytes(project)
    with pytest.raises(StageError, match=r'stages/demo/tiny_kit.safetensors: its unet does not fit the model built '
                                         r'here \(Missing key\(s\) in state_dict: "conv_in.bias".*\); rebuild the kit'):
        project.run("fetch_models")
    assert models_bytes(project) == before

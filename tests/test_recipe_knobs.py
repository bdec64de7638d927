"""train-lora's recipe knobs, each checked against a hand computation: Min-SNR-γ, the noise offset
and caption dropout on fixed batches, and a LoRA on the text encoder, saved in diffusers' and
kohya's formats, loaded by diffusers' public loader and by the generate stages, and merged by hand."""

import dataclasses
import importlib.metadata
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from stages.common import dataset, models, training
from stages.common.dataset import LORA_WEIGHTS
from stages.common.lora_formats import KOHYA_FILE, from_kohya, peft_names
from tests.conftest import REPO
from tests.test_train_lora import lora_weights

TEXT_ENCODER_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # kohya's: attention and MLP
REFERENCE = REPO / "tests" / "fixtures" / "sd15_text_encoder_kohya_lora_modules.txt"


def reference_modules() -> set[str]:
    return {line for line in REFERENCE.read_text().splitlines() if line and not line.startswith("#")}


@pytest.fixture
def fixed_batch(trained_project):
    """The tiny models and the first 4 samples of the run: its images, draws and prompts."""
    paths, cfg = trained_project.typed().paths, trained_project.typed().train
    m = models.load_training_models(paths.base_model, torch.float32)
    images, prompts = dataset.load_train_set(paths.train_data)
    vae = m.vae.config
    shape = (vae.latent_channels, *(images.shape[1] // 2 ** (len(vae.block_out_channels) - 1),) * 2)
    samples = training.TrainSamples(images, prompts, m.tokenizer, True, cfg.seed, shape,
                                    m.noise_scheduler.config.num_train_timesteps)
    return m, samples, torch.utils.data.default_collate([samples[k] for k in range(4)])


def test_a_samples_draws_come_first_and_the_knobs_after(fixed_batch):
    """The off state trains the run it trained before the knobs: a sample's generator still
    gives its latent draw, noise and timestep first; the offset constants and the dropout coin
    come after."""
    _, samples, _ = fixed_batch
    for k in (0, 7, 1234):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([samples.seed, k]).generate_state(1)[0]))
        expected = [torch.randn(samples.latent_shape, generator=generator),
                    torch.randn(samples.latent_shape, generator=generator),
                    torch.randint(0, samples.timesteps, (), generator=generator),
                    torch.randn((samples.latent_shape[0], 1, 1), generator=generator),
                    torch.rand((), generator=generator)]
        for got, want in zip(samples[k][5:], expected, strict=True):
            assert torch.equal(got, want), k


def test_min_snr_gamma_weighs_each_sample_as_by_hand(fixed_batch):
    """The plain loss is the MSE to v (the tiny base predicts v), computed here from the
    schedule's alphas; Min-SNR-γ multiplies each sample by min(SNR, γ) / (SNR + 1). For an epsilon
    model the weight is min(SNR, γ) / SNR, and 1 at a zero-terminal-SNR step (not 0 / 0)."""
    from diffusers import DDPMScheduler

    m, samples, batch = fixed_batch
    index, flipped, input_ids, _, _, latent_noise, noise, _, _, _ = batch
    timesteps = torch.tensor([0, 300, 700, 999])  # 999: the zero-SNR end of the tiny base's schedule
    with torch.no_grad():
        posterior = m.vae.encode(samples.pixels(index, flipped)).latent_dist
        plain = training.denoising_loss(m, posterior, input_ids, latent_noise, noise, timesteps, torch.float32)
        weighted = training.denoising_loss(m, posterior, input_ids, latent_noise, noise, timesteps, torch.float32,
                                           snr_gamma=5.0)
        # by hand
        x = (posterior.mean + posterior.std * latent_noise) * m.vae.config.scaling_factor
        ac = m.noise_scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
        noisy = (ac.sqrt() * x + (1 - ac).sqrt() * noise).float()
        v = (ac.sqrt() * noise - (1 - ac).sqrt() * x).float()
        prediction = m.unet(noisy, timesteps, m.text_encoder(input_ids)[0]).sample
    torch.testing.assert_close(plain, ((prediction - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    snr = (ac / (1 - ac)).flatten()
    assert m.noise_scheduler.config.prediction_type == "v_prediction" and snr[-1] == 0
    torch.testing.assert_close(weighted, plain * (snr.clamp(max=5) / (snr + 1)).float(), rtol=1e-6, atol=0)
    assert weighted[-1] == 0 and weighted[0] < 0.2 * plain[0], "γ caps the low-noise steps"

    epsilon = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD 1.5's
    ac = epsilon.alphas_cumprod.double()[timesteps]
    torch.testing.assert_close(training.min_snr_weights(epsilon, timesteps, 5.0).double(),
                               torch.clamp(ac / (1 - ac), max=5) / (ac / (1 - ac)), rtol=1e-6, atol=0)
    zero_snr = DDPMScheduler(rescale_betas_zero_snr=True)
    assert training.min_snr_weights(zero_snr, torch.tensor([999]), 5.0).item() == 1.0


def test_the_noise_offset_and_caption_dropout_reach_the_loss_as_drawn(trained_project, monkeypatch):
    """One optimiser step with both on: the loss gets each sample's noise plus noise_offset x its
    own per-channel constants, and the empty prompt exactly where the sample's coin is below
    caption_dropout (set between the coins: 2 of the step's 4)."""
    p = trained_project
    params = p.typed()
    cfg = dataclasses.replace(params.train, noise_offset=0.1, caption_dropout=0.5, validate_every=0)
    t = training.Trainer(params.paths, cfg, torch.float32, torch.device("cpu"))
    images, prompts = dataset.load_train_set(params.paths.train_data)
    samples = training.TrainSamples(images, prompts, t.m.tokenizer, cfg.random_flip, cfg.seed,
                                    t.latent_shape(images.shape[1]), 1000, (100, 200))
    coins = sorted(float(samples[k][9]) for k in range(cfg.batch_size * cfg.grad_accumulation))
    t.cfg = cfg = dataclasses.replace(cfg, caption_dropout=(coins[1] + coins[2]) / 2)  # drops 2 of the 4
    seen, real = [], training.denoising_loss
    monkeypatch.setattr(training, "denoising_loss", lambda m, latents, ids, z, noise, *rest:
                        seen.append((ids, noise)) or real(m, latents, ids, z, noise, *rest))
    t.step(0, t.loader(samples, 0, 1), samples)

    items = [samples[k] for k in range(cfg.batch_size * cfg.grad_accumulation)]
    ids, noise = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    dropped = [bool(item[9] < cfg.caption_dropout) for item in items]
    assert sum(dropped) == 2, dropped
    for k, item in enumerate(items):
        assert torch.equal(ids[k], samples.empty_ids if dropped[k] else samples.input_ids[item[0]])
        torch.testing.assert_close(noise[k], item[6] + 0.1 * item[8], rtol=0, atol=0)
    assert not torch.equal(samples.empty_ids, samples.input_ids[0])


def test_a_text_encoder_lora_learns_through_the_controlnet_too(trained_project):
    """Under train.controlnet the frozen ControlNet reads the text encoder's embeddings: the text
    encoder LoRA's gradient is plain autograd's through both networks, not the UNet's path alone."""
    from peft import LoraConfig

    paths = trained_project.typed().paths
    m = models.load_training_models(paths.base_model, torch.float32, paths.controlnet)
    models.add_text_encoder_lora(m.text_encoder, LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                                            target_modules=["q_proj", "v_proj"]))
    lora = [q for q in m.text_encoder.parameters() if q.requires_grad]
    with torch.no_grad():  # a nonzero up-projection: a fresh LoRA's is zero, and so the down's gradient
        for q in lora:
            q.normal_(0, 0.1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise, latent_noise = torch.randn(2, 4, 8, 8, generator=generator), torch.zeros(2, 4, 8, 8)
    control = torch.rand(2, 3, 64, 64, generator=generator)
    ids, timesteps = m.tokenizer(["a red skirt", "a blue coat"], padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids, torch.tensor([100, 600])
    posterior = DiagonalGaussianDistribution(torch.cat([latents / m.vae.config.scaling_factor,
                                                        torch.full_like(latents, -30.0)], dim=1))

    def gradient(loss):
        for q in lora:
            q.grad = None
        loss.sum().backward()
        return torch.cat([q.grad.flatten() for q in lora])

    ours = gradient(training.denoising_loss(m, posterior, ids, latent_noise, noise, timesteps, torch.float32,
                                            control=control))
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    target = m.noise_scheduler.get_velocity(latents, noise, timesteps)

    def loss(detach_control: bool):
        text = m.text_encoder(ids)[0]
        down, mid = m.controlnet(noisy, timesteps, text.detach() if detach_control else text, controlnet_cond=control,
                                 return_dict=False)
        prediction = m.unet(noisy, timesteps, text, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        return ((prediction - target) ** 2).mean(dim=(1, 2, 3))

    torch.testing.assert_close(ours, gradient(loss(False)), rtol=1e-4, atol=1e-7)
    unet_path_only = gradient(loss(True))
    assert (ours - unet_path_only).abs().max() > 1e-3 * ours.abs().max(), "the ControlNet's path carries gradient"


@pytest.mark.slow
def test_a_text_encoder_lora_loads_everywhere_as_trained(trained_project, monkeypatch):
    """train.text_encoder_rank: 4 (alpha 8, so scale 2) on kohya's six layers. The text encoder
    that diffusers' public loader builds from either file, and the one the generate stages use
    (unfused, then fused), all equal the base merged by hand with the kohya file's up @ down x
    alpha / rank, to 1e-6. The kohya names are SD 1.5's 72 text encoder layers; both files hold
    the same numbers. One on fc1 and fc2 alone loads too."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel
    from transformers.integrations import peft as transformers_peft

    p = trained_project
    p.set({"train.text_encoder_rank": 4, "train.text_encoder_alpha": 8, "train.text_encoder_learning_rate": 5e-3,
           "train.text_encoder_target_modules": TEXT_ENCODER_LAYERS})
    p.run("train_lora")  # (its resume: test_two_machines_train_as_one_process_and_resume_its_checkpoint)
    paths = p.typed().paths

    diffusers_state, kohya = lora_weights(p), load_file(p.path("lora") / KOHYA_FILE)
    text_keys = [k for k in diffusers_state if k.startswith("text_encoder.")]
    assert len(text_keys) == 2 * 72 and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert {n for n in names if n.startswith("lora_te_")} == reference_modules()
    assert len([n for n in names if n.startswith("lora_unet_")]) == 128
    modules = {"unet": sorted({k.removeprefix("unet.").rsplit(".lora", 1)[0] for k in diffusers_state
                               if k.startswith("unet.")}),
               "text_encoder": sorted({k.removeprefix("text_encoder.").rsplit(".lora", 1)[0] for k in text_keys})}
    weights, alphas = from_kohya(kohya, modules)
    saved = peft_names(diffusers_state)
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in weights), "bit-exact"
    assert {a for k, a in alphas.items() if k.startswith("text_encoder.")} == {8.0}
    with safe_open(p.path("lora") / LORA_WEIGHTS, "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["text_encoder.r"] == 4 and adapter["text_encoder.lora_alpha"] == 8
    assert sorted(adapter["text_encoder.target_modules"]) == sorted(TEXT_ENCODER_LAYERS)

    base = CLIPTextModel.from_pretrained(paths.base_model, subfolder="text_encoder")
    merged = CLIPTextModel.from_pretrained(paths.base_model, subfolder="text_encoder")
    with torch.no_grad():
        for module, layer in merged.named_modules():
            name = "lora_te_text_model_" + module.replace(".", "_")  # transformers 5's CLIP has no text_model.
            if name in reference_modules():
                up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
                layer.weight += float(kohya[f"{name}.alpha"]) / down.shape[0] * up @ down
    ids = models.load_training_models(paths.base_model, torch.float32).tokenizer(
        ["a red pleated skirt"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = merged(ids)[0]
        assert (expected - base(ids)[0]).abs().max() > 1e-3, "the text encoder's LoRA changes its output"
        # diffusers' public loader ends in transformers' adapter API, which from transformers 5.23 on
        # asks for peft 0.22, not released yet (the stages add the layers through peft itself)
        monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", importlib.metadata.version("peft"))
        loaded = []
        for weight_name in (LORA_WEIGHTS, KOHYA_FILE):
            public = StableDiffusionPipeline.from_pretrained(paths.base_model, safety_checker=None,
                                                             requires_safety_checker=False)
            public.load_lora_weights(paths.lora, weight_name=weight_name)
            loaded.append(public.text_encoder)
        ours = models.load_controlnet_pipeline(paths.base_model, paths.controlnet, "unipc", torch.float32,
                                               torch.device("cpu"), lora=paths.lora)
        assert models.lora_components(ours) == ["unet", "text_encoder"]
        loaded.append(ours.text_encoder)
        for encoder in loaded:
            torch.testing.assert_close(encoder(ids)[0], expected, rtol=0, atol=1e-6)
        ours.disable_lora()  # the studio's baseline: no LoRA anywhere
        torch.testing.assert_close(ours.text_encoder(ids)[0], base(ids)[0], rtol=0, atol=0)
        ours.enable_lora()
        ours.fuse_lora(components=models.lora_components(ours))  # generate-lora's
        torch.testing.assert_close(ours.text_encoder(ids)[0], expected, rtol=0, atol=1e-6)

    # An MLP-only text encoder LoRA: lora_linear_layer names on fc1 and fc2 too, which
    # diffusers' loader reads (a bare lora_A there it cannot place)
    p.run("train_lora", train__text_encoder_target_modules=["fc1", "fc2"], train__max_steps=2,
          train__validate_every=0)
    text_keys = [k for k in lora_weights(p) if k.startswith("text_encoder.")]
    assert len(text_keys) == 2 * 2 * 12 and all(".mlp.fc" in k and ".lora_linear_layer." in k for k in text_keys)
    public = StableDiffusionPipeline.from_pretrained(paths.base_model, safety_checker=None,
                                                     requires_safety_checker=False)
    public.load_lora_weights(paths.lora, weight_name=LORA_WEIGHTS)
    ours = models.load_controlnet_pipeline(paths.base_model, paths.controlnet, "unipc", torch.float32,
                                           torch.device("cpu"), lora=paths.lora)
    with torch.no_grad():
        assert (ours.text_encoder(ids)[0] - base(ids)[0]).abs().max() > 1e-4
        torch.testing.assert_close(ours.text_encoder(ids)[0], public.text_encoder(ids)[0], rtol=0, atol=1e-6)

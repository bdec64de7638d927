"""train-lora: diffusers-format output, a loss log, exact resume, real clipping."""

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from stages.common import train_log
from stages.common.generation import draw
from stages.common.io import load_rgb
from stages.common.train_log import read_history
from stages.common.validation import Validator
from tests.conftest import image_diff
from stages import train_lora
from stages.common import dataset, models, runtime, training
from stages.common.errors import StageError
from stages.common.io import read_json
from stages.common.lora_formats import KOHYA_FILE
from stages.common.dataset import LORA_WEIGHTS
from tests.conftest import stage_env


def lora_weights(project):
    return load_file(project.path("lora") / LORA_WEIGHTS)


def test_output_is_diffusers_format_with_a_loss_log(trained_project):
    p = trained_project
    weights = lora_weights(p)
    assert len(weights) == 256
    assert all(k.startswith("unet.") and k.endswith(("lora.down.weight", "lora.up.weight")) for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    down = next(v for k, v in weights.items() if k.endswith("lora.down.weight"))
    assert down.shape[0] == p.params["train"]["rank"]
    log = read_history(p.path("train_log"))
    assert log["step"].tolist() == list(range(1, p.params["train"]["max_steps"] + 1))
    assert log["loss"].between(0, 10).all()
    assert log["lr"].max() == pytest.approx(p.params["train"]["learning_rate"])  # the lr each step used
    config = read_json(p.path("lora") / "training_config.json")
    assert config["train"]["max_steps"] == p.params["train"]["max_steps"] and config["lora_tensors"] == 256
    # up weights start at zero; training moved them
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora.up.weight"))


def log_files(project) -> dict:
    """Every file of the DVCLive folder, by relative path: its bytes."""
    folder = project.path("train_log")
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_the_log_is_live_validates_and_reaches_tensorboard(trained_project, monkeypatch):
    """Read while the run lasts (at its step-2 checkpoint), the DVCLive folder already holds every
    step so far, samples/s and validations at steps 0 and 2; the finished one holds steps 1..4,
    validations at 0, 2, 4 and no samples/s (it would differ between identical runs)."""
    p = trained_project
    folder, finished = p.path("train_log"), log_files(p)
    seen, real_save = {}, train_lora.save_checkpoint

    def save_and_look(where, state):
        real_save(where, state)
        if state["step"] == 2:
            seen["summary"] = json.loads((folder / train_log.SUMMARY_FILE).read_text())
            seen["history"] = train_log.read_history(folder)
            seen["heldout"] = train_log.read_heldout(folder)
            seen["images"] = train_log.validation_images(folder)

    # what another run (other params) left: replaced, never appended to
    (folder / "plots/metrics/loss.tsv").write_text("step\tloss\n9\t0.5\n")
    stray = folder / train_log.IMAGES_DIR / train_log.validation_image(99, 7)
    stray.parent.mkdir(parents=True)
    shutil.copy(next(folder.rglob("*.png")), stray)
    monkeypatch.setattr(train_lora, "save_checkpoint", save_and_look)
    p.run("train_lora", train__report_to=["tensorboard"])
    assert seen["summary"]["step"] == 2 and seen["summary"]["samples_per_s"] > 0
    assert seen["history"]["step"].tolist() == [1, 2] and seen["heldout"]["step"].tolist() == [0, 2]
    assert {i: sorted(steps) for i, steps in seen["images"].items()} == {0: [0, 2]}
    summary = json.loads((folder / train_log.SUMMARY_FILE).read_text())
    history = read_history(folder)
    assert summary == {"grad_norm": history["grad_norm"].iloc[-1],
                       "heldout_loss": train_log.read_heldout(folder)["heldout_loss"].iloc[-1],
                       "loss": history["loss"].iloc[-1], "lr": history["lr"].iloc[-1], "step": 4}
    assert train_log.read_heldout(folder)["step"].tolist() == [0, 2, 4]
    assert log_files(p) == finished, "the same inputs write the same log, byte for byte (TensorBoard or not)"
    assert not (folder / "dvc.yaml").exists(), "the pipeline's dvc.yaml declares the files: DVCLive writes none"
    # train.report_to: TensorBoard gets the same scalars and images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(p.path("tensorboard")), size_guidance={"images": 0}).Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == history["step"].tolist()
    np.testing.assert_allclose([e.value for e in logged], history["loss"], rtol=1e-6)
    assert [e.step for e in events.Scalars("validation/heldout_loss")] == [0, 2, 4]
    assert len(events.Scalars("train/samples_per_s")) >= 1
    assert events.Tags()["images"] == ["validation/000000"]


def test_validation_draws_through_the_generate_code_and_a_fixed_heldout_loss(trained_project):
    """The step-4 validation image is what the generate stages' loader and `draw` give with the
    saved LoRA at validation's settings, on that edge map, prompt and seed; step 0's is the base's.
    The held-out loss at step 0 is the base UNet's on the same fixed inputs: only the weights move it."""
    p = trained_project
    params = p.typed()
    cfg, paths = params.train, params.paths
    sampler = SimpleNamespace(steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                              controlnet_scale=1.0, negative_prompt="")
    configs = dataset.load_eval_configs(paths.eval_data)[:cfg.validation_samples]
    edges = [Image.open(dataset.edge_path(paths.edges, c["index"])).convert("RGB") for c in configs]
    prompts, seeds = [c["prompt"] for c in configs], [cfg.seed + c["index"] for c in configs]
    drawn = train_log.validation_images(paths.train_log)
    cpu = torch.device("cpu")
    for lora, step in ((None, 0), (paths.lora, cfg.max_steps)):
        pipe = models.load_controlnet_pipeline(paths.base_model, paths.controlnet, "unipc", torch.float32, cpu, lora=lora)
        images = draw(pipe, edges, prompts, seeds, sampler, cpu, lora_scale=1.0 if lora else None)
        for c, image in zip(configs, images):
            assert image_diff(np.asarray(image), load_rgb(drawn[c["index"]][step])) <= 2, (c["index"], step)
    m = models.load_training_models(paths.base_model, torch.float32, paths.controlnet)
    latent = (m.vae.config.latent_channels, params.extract.resolution // 8, params.extract.resolution // 8)
    base = Validator(m, cfg, params.canny, paths.eval_data, params.extract.resolution, latent, torch.float32, cpu)
    heldout = train_log.read_heldout(paths.train_log).set_index("step")["heldout_loss"]
    assert base.heldout_loss() == pytest.approx(heldout[0], rel=1e-6)
    assert heldout[cfg.max_steps] != pytest.approx(heldout[0], rel=1e-4), "training moved it"


def checkpoints(project):
    return dataset.resume_dir(project.typed().paths, "train-lora")


def kill_after_step(project, monkeypatch, kill_at: int = 2) -> None:
    """Run train-lora and kill it right after its step-`kill_at` checkpoint."""
    real_save = train_lora.save_checkpoint

    def save_then_die(folder, state):
        real_save(folder, state)
        if state["step"] == kill_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_lora, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        project.run("train_lora")
    monkeypatch.setattr(train_lora, "save_checkpoint", real_save)


def test_resume_continues_exactly(trained_project, monkeypatch, caplog):
    """Kill the run right after its step-2 checkpoint, rerun: the result equals an unbroken run."""
    p = trained_project
    unbroken, unbroken_log = lora_weights(p), log_files(p)
    assert not checkpoints(p).exists(), "a finished run leaves no resume state"
    kill_after_step(p, monkeypatch)
    assert sorted(c.name for c in checkpoints(p).glob("*.pt")) == ["checkpoint-000002.pt", "latents-0-of-1.pt"]
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora")

    assert "resuming from step 2" in caplog.text
    assert "encoded" not in caplog.text, "a resumed run reuses its latent cache"
    resumed = lora_weights(p)
    for key, value in unbroken.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    # The step axis goes on from the checkpoint: the log (scalars, validations, images) is an unbroken run's
    assert log_files(p) == unbroken_log
    assert not checkpoints(p).exists()


def test_a_damaged_checkpoint_or_a_half_written_one_is_dropped(trained_project, monkeypatch, caplog):
    """Checkpoints are resume state, not outputs: a bad one costs a restart, never the stage."""
    p = trained_project
    unbroken = lora_weights(p)
    kill_after_step(p, monkeypatch)
    (checkpoint,) = checkpoints(p).glob("checkpoint-*.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    half = checkpoints(p) / ".checkpoint-000004.pt.0a1b2c3d.tmp.pt"  # what a kill inside torch.save leaves
    half.write_bytes(b"x" * 100)
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora")
    assert f"{checkpoint} does not load (RuntimeError); starting afresh" in caplog.text
    assert "resuming" not in caplog.text and not half.exists()
    for key, value in unbroken.items():
        torch.testing.assert_close(lora_weights(p)[key], value, rtol=0, atol=0, msg=key)


def test_changed_params_do_not_resume_a_stale_checkpoint(trained_project, monkeypatch, caplog):
    p = trained_project
    kill_after_step(p, monkeypatch)
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora", train__seed=7)
    assert "made from other params, data or code; starting afresh" in caplog.text and "resuming" not in caplog.text


def test_how_knobs_keep_a_checkpoint_valid(trained_project, monkeypatch, caplog):
    p = trained_project
    kill_after_step(p, monkeypatch)
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora", train__checkpoint_every=3, train__num_workers=1)
    assert "resuming from step 2" in caplog.text


def test_the_cache_encodes_only_the_pairs_the_run_draws(trained_project, caplog):
    """The seed's run draws 20k samples of 30k images: caching every image twice would triple the
    VAE's work. Here 4 steps of 4 draw 16 of the images once each."""
    p = trained_project
    shutil.rmtree(p.path("lora"))
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora")
    assert "encoded the 16 (image, flip) pairs the run draws" in caplog.text
    class Tokenizer:  # what TrainSamples asks of CLIP's tokenizer
        model_max_length = 1

        def __call__(self, prompts, **kwargs):
            return type("Tokens", (), {"input_ids": torch.zeros(len(prompts), 1)})

    samples = training.TrainSamples(np.zeros((5, 8, 8, 3), np.uint8), ["x"] * 5, Tokenizer(), True, 0, (4, 1, 1), 10)
    assert samples.pairs(range(3)) == sorted({samples.image_and_flip(k) for k in range(3)}) and len(
        samples.pairs(range(3))) == 3
    assert samples.pairs(range(100)) == [(i, f) for i in range(5) for f in (0, 1)], "many epochs: all of them"


def test_the_control_is_the_edge_map_of_the_image_as_trained_on():
    """train.controlnet feeds each sample's canny edges, of the mirrored image when the sample is
    flipped, in [0, 1] as the pipeline feeds an edge map; without thresholds there is no control."""
    from stages.common.edges import canny

    image = np.full((32, 32, 3), 255, np.uint8)
    image[6:20, 3:12] = (200, 30, 40)  # off-centre: its mirror image has its edges elsewhere
    class Tokenizer:
        model_max_length = 1

        def __call__(self, prompts, **kwargs):
            return type("Tokens", (), {"input_ids": torch.zeros(len(prompts), 1)})

    samples = training.TrainSamples(image[None], ["x"], Tokenizer(), True, 0, (4, 4, 4), 10, (100, 200))
    # Sample numbers 0.. of one image: the run's flips for it, one of each among the first few.
    items = {int(samples[k][1]): samples[k] for k in range(8)}
    assert set(items) == {0, 1}
    maps = torch.stack([items[0][4], items[1][4]])  # what the loader collates, uint8 until the device
    assert maps.dtype == torch.uint8
    control = training.control_input(maps, torch.device("cpu"))
    assert control.shape == (2, 3, 32, 32) and control.dtype == torch.float32
    assert torch.equal(control[0], torch.from_numpy(canny(image, 100, 200)).permute(2, 0, 1) / 255)
    assert torch.equal(control[1], torch.from_numpy(canny(image[:, ::-1].copy(), 100, 200)).permute(2, 0, 1) / 255)
    assert control[0].sum() > 20 and not torch.equal(control[0], control[1])
    samples.edges = None
    assert training.control_input(torch.stack([samples[0][4]]), torch.device("cpu")) is None


def test_training_with_and_without_the_controlnet(trained_project):
    """train.controlnet: false is the seed recipe (the UNet alone): another loss curve from the
    same draws. Canny thresholds that find no edge feed the ControlNet blank maps: a third curve."""
    p = trained_project
    under = read_history(p.path("train_log"))["loss"].to_numpy()
    p.run("train_lora", train__controlnet=False, train__validate_every=0)
    alone, alone_weights = read_history(p.path("train_log"))["loss"].to_numpy(), lora_weights(p)
    # The same draws, so any difference is the ControlNet's (small on the suite's 2-step kit).
    assert len(alone) == len(under) and not np.array_equal(alone, under)
    # Validation only measures: validating (every 3 of 4 steps: at 0, 3 and the last, 4) trains the same
    # LoRA to the bit, here where the ControlNet loads for the validation images alone
    p.run("train_lora", train__controlnet=False, train__validate_every=3)
    assert train_log.read_heldout(p.path("train_log"))["step"].tolist() == [0, 3, 4]
    for key, value in alone_weights.items():
        torch.testing.assert_close(lora_weights(p)[key], value, rtol=0, atol=0, msg=key)
    p.run("train_lora", train__controlnet=True, canny__low_threshold=5000, canny__high_threshold=5000)
    blank = read_history(p.path("train_log"))["loss"].to_numpy()
    assert not np.array_equal(blank, under) and not np.array_equal(blank, alone), "blank maps, not none"


def test_cached_latents_train_as_the_seed_recipe_does(trained_project):
    """Encoding once and sampling the stored distribution is the recipe's objective with the same
    random draws: loss curve and LoRA equal the VAE-every-step loop's to float noise (fp32)."""
    p = trained_project
    p.run("train_lora", train__cache_latents=False)
    recipe, recipe_log = lora_weights(p), read_history(p.path("train_log"))
    p.run("train_lora", train__cache_latents=True)
    cached, cached_log = lora_weights(p), read_history(p.path("train_log"))
    assert len(recipe_log) == p.params["train"]["max_steps"]
    np.testing.assert_allclose(cached_log["loss"], recipe_log["loss"], rtol=1e-5)
    np.testing.assert_allclose(cached_log["grad_norm"], recipe_log["grad_norm"], rtol=1e-4)
    for key, value in recipe.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-5, msg=key)  # weights reach 0.7
    p.run("train_lora", train__cache_latents=True, train__random_flip=False)
    assert not np.allclose(read_history(p.path("train_log"))["loss"], cached_log["loss"]), "flips are drawn"


def test_a_compiled_unet_trains_as_the_eager_one(trained_project, monkeypatch):
    """train.compile goes through torch.compile (traced by dynamo and AOTAutograd; inductor's
    code generation would take minutes on a CPU) and trains the same LoRA."""
    p = trained_project
    eager, eager_log = lora_weights(p), read_history(p.path("train_log"))
    monkeypatch.setenv("FASHION_COMPILE_BACKEND", "aot_eager")
    p.run("train_lora", train__compile="reduce-overhead")
    np.testing.assert_allclose(read_history(p.path("train_log"))["loss"], eager_log["loss"], rtol=1e-5)
    for key, value in eager.items():
        torch.testing.assert_close(lora_weights(p)[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_training_learns_and_the_saved_lora_carries_it(extracted):
    """On the run's first 64 samples (fixed images, noise and timesteps) the trained LoRA lowers
    the denoising loss clearly below the base UNet's, and the saved file, loaded the way
    generate-lora loads it, gives the same numbers. A run that barely moves (learning rate 1e-12)
    reports no gain, so the margin is the training's doing."""
    p = extracted
    p.run("train_lora", train__max_steps=20, train__learning_rate=1e-2, train__fixed_samples=64)  # lora/base 0.65
    summary = read_json(p.path("train_summary"))
    base, lora = summary["denoising_loss_base"], summary["denoising_loss_lora"]
    assert summary["fixed_samples"] == 64
    assert lora < 0.95 * base, summary  # the suite's 2-step-pretrained base: at least 5% lower
    assert summary["denoising_loss_change"] == pytest.approx(lora / base - 1)

    params = p.typed()
    cfg, paths = params.train, params.paths
    assert cfg.controlnet, "the demo trains (and measures) under the ControlNet"
    pipe = models.load_controlnet_pipeline(paths.base_model, paths.controlnet, "unipc", torch.float32,
                                           torch.device("cpu"), lora=paths.lora)
    m = models.load_training_models(paths.base_model, torch.float32, paths.controlnet)
    images, prompts = dataset.load_train_set(paths.train_data)
    vae = m.vae.config
    samples = training.TrainSamples(images, prompts, m.tokenizer, cfg.random_flip, cfg.seed,
                                    (vae.latent_channels, images.shape[1] // 8, images.shape[2] // 8),
                                    m.noise_scheduler.config.num_train_timesteps,
                                    (params.canny.low_threshold, params.canny.high_threshold))
    again = training.fixed_sample_loss(m, pipe.unet, samples, summary["fixed_samples"], torch.float32,
                                       torch.device("cpu"), batch=5)  # another split into passes: the same numbers
    assert again["fixed_samples"] == summary["fixed_samples"]
    assert (again["denoising_loss_base"], again["denoising_loss_lora"]) == pytest.approx((base, lora), rel=1e-5)
    samples.edges = None  # the UNet alone: other numbers, so the ControlNet was in the loop
    alone = training.fixed_sample_loss(m, pipe.unet, samples, summary["fixed_samples"], torch.float32,
                                       torch.device("cpu"), batch=5)
    assert alone["denoising_loss_base"] != pytest.approx(base, rel=1e-3)

    p.run("train_lora", train__max_steps=20, train__learning_rate=1e-12)
    still = read_json(p.path("train_summary"))
    assert still["denoising_loss_base"] == pytest.approx(base, rel=1e-6)
    # up weights start at zero and move by about 1e-11
    assert still["denoising_loss_lora"] == pytest.approx(still["denoising_loss_base"], rel=1e-6)


def test_each_step_is_shared_out_whole():
    """Process r of N trains on its contiguous share of the step's samples: together exactly the
    one-process step, whatever the split."""
    cfg = type("Cfg", (), {"batch_size": 3, "grad_accumulation": 2, "micro_batch": 0})
    assert training.micro_batches(5, cfg, 0, 1) == [[30, 31, 32], [33, 34, 35]]
    assert [training.micro_batches(5, cfg, r, 2) for r in range(2)] == [[[30, 31, 32]], [[33, 34, 35]]]
    assert [training.micro_batches(5, cfg, r, 3) for r in range(3)] == [[[30, 31]], [[32, 33]], [[34, 35]]]
    cfg.micro_batch = 6  # the two passes fused into one
    assert training.micro_batches(5, cfg, 0, 1) == [[30, 31, 32, 33, 34, 35]]


def test_the_split_into_micro_batches_changes_only_rounding(trained_project):
    """Every draw belongs to a sample, not to a micro-batch: 4 x 1, 2 x 2, 1 x 4 and 2 x 2 in one forward
    pass (train.micro_batch: 4) are one run, with the per-sample knobs on too (Min-SNR-γ weights,
    noise offset constants, caption dropout coins) and a text encoder LoRA."""
    p = trained_project
    p.set({"train.snr_gamma": 5.0, "train.noise_offset": 0.1, "train.caption_dropout": 0.5,
           "train.text_encoder_rank": 2})
    runs = []
    for batch, accumulation, micro in ((2, 2, 0), (4, 1, 0), (1, 4, 0), (2, 2, 4)):
        p.run("train_lora", train__batch_size=batch, train__grad_accumulation=accumulation, train__micro_batch=micro)
        runs.append((lora_weights(p), read_history(p.path("train_log"))))
    for weights, losses in runs[1:]:
        np.testing.assert_allclose(losses["loss"], runs[0][1]["loss"], rtol=1e-5)
        for key, value in runs[0][0].items():  # the ControlNet's residuals round too: a few 1e-5
            torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=3e-5, msg=key)


def test_two_machines_train_as_one_process_and_resume_its_checkpoint(trained_project, monkeypatch, capfd, caplog):
    """launch.machines: 2 on 127.0.0.1, one process each (gloo on the CPU, as NCCL on GPUs): machine
    1 starts first and waits for machine 0; together they pick up a one-process checkpoint, one
    process writes, and the LoRA and loss curve are the one-process run's. With a text encoder
    LoRA too, whose gradients DDP (on the UNet) does not average: the step does. (One machine's
    train.processes: 2 is the same launch with other flags: test_generate runs it.)"""
    p = trained_project
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p.run("train_lora", train__text_encoder_rank=2, train__text_encoder_learning_rate=5e-3)
    unbroken, unbroken_log = lora_weights(p), read_history(p.path("train_log"))
    assert any(k.startswith("text_encoder.") for k in unbroken)
    kill_after_step(p, monkeypatch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    p.set({"launch.machines": 2, "launch.main_address": "127.0.0.1", "launch.main_port": port})
    other = subprocess.Popen([sys.executable, "-m", "stages.train_lora"], cwd=p.root, text=True,
                             stderr=subprocess.PIPE, env=stage_env(FASHION_MACHINE_RANK="1"))
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("train_lora")  # machine 0, here (launch.machine_rank: 0)
    err = capfd.readouterr().err + other.communicate(timeout=120)[1]  # the processes' own logs
    assert other.returncode == 0, err
    assert "--num_processes 2 --num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1" in caplog.text
    assert "machine 1 of 2: waiting for machine 0 at 127.0.0.1" in err and "--machine_rank 1" in err
    assert err.count("resuming from step 2") == 2, "both processes resume"
    assert err.count("wrote models/lora") == 1, "one writer"
    pd.testing.assert_frame_equal(read_history(p.path("train_log")), unbroken_log, rtol=1e-5, check_exact=False)
    for key, value in unbroken.items():
        torch.testing.assert_close(lora_weights(p)[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not checkpoints(p).exists()


def test_gradients_are_really_clipped(trained_project):
    """With clipping to 1e-12 the gradients fall far below AdamW's eps, so the LoRA barely moves;
    upstream's no-op clipping would have left the update unchanged."""
    p = trained_project

    def up_norm(**overrides):
        p.run("train_lora", train__max_steps=1, train__validate_every=0, train__warmup_steps=0, train__adam_weight_decay=0.0, **overrides)
        return sum(v.norm() for k, v in lora_weights(p).items() if k.endswith("lora.up.weight"))

    clipped, free = up_norm(train__max_grad_norm=1e-12), up_norm(train__max_grad_norm=0.0)
    assert clipped < 0.05 * free
    assert read_history(p.path("train_log"))["grad_norm"].iloc[0] > 1e-12  # logged before clipping


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_precision_picks_fp16_on_a_t4(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert runtime.training_dtype("auto", torch.device("cuda")) == expected
    assert runtime.training_dtype("auto", torch.device("cpu")) == torch.float32
    # Asked for by name, the CPU takes a GPU's precision (the CPU precision tests run it).
    assert runtime.training_dtype("fp16", torch.device("cpu")) == torch.float16


def test_alpha_other_than_rank_survives_the_round_trip(trained_project):
    """Trained with alpha = 2 x rank: the public `load_lora_weights` (on the diffusers file and on the
    kohya export) and the project's own loader must all give the UNet that training had in memory
    (its weights under the training config), not one scaled by rank / alpha."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from diffusers.utils import convert_unet_state_dict_to_peft

    from stages.common.models import load_controlnet_pipeline

    p = trained_project
    rank = p.params["train"]["rank"]
    p.run("train_lora", train__alpha=2 * rank, train__max_steps=2)
    paths = p.typed().paths
    cfg = p.typed().train

    trained = UNet2DConditionModel.from_pretrained(paths.base_model, subfolder="unet")
    trained.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                   target_modules=cfg.target_modules))
    state = {k.removeprefix("unet."): v for k, v in lora_weights(p).items()}
    assert not set_peft_model_state_dict(trained, convert_unet_state_dict_to_peft(state)).unexpected_keys

    public = StableDiffusionPipeline.from_pretrained(paths.base_model, safety_checker=None,
                                                     requires_safety_checker=False)
    public.load_lora_weights(paths.lora, weight_name=LORA_WEIGHTS)
    ours = load_controlnet_pipeline(paths.base_model, paths.controlnet, "unipc", torch.float32, torch.device("cpu"),
                                    lora=paths.lora)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, trained.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = trained(sample, 10, text).sample
        base = UNet2DConditionModel.from_pretrained(paths.base_model, subfolder="unet")(sample, 10, text).sample
    assert (expected - base).abs().max() > 1e-4, "the LoRA changes the output"
    webui = StableDiffusionPipeline.from_pretrained(paths.base_model, safety_checker=None,
                                                    requires_safety_checker=False)
    webui.load_lora_weights(paths.lora, weight_name=KOHYA_FILE)  # diffusers' own kohya converter
    with torch.no_grad():
        for unet in (public.unet, ours.unet, webui.unet):
            torch.testing.assert_close(unet(sample, 10, text).sample, expected, rtol=0, atol=1e-6)
    with safe_open(p.path("lora") / LORA_WEIGHTS, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 2 * rank
    assert json.loads(metadata["fashion.train"])["alpha"] == 2 * rank
    assert json.loads(metadata["fashion.train"])["resolution"] == p.params["extract"]["resolution"]
    canny = p.params["canny"]  # trained under the ControlNet: the edges it was fed
    assert json.loads(metadata["fashion.train"])["canny"] == [canny["low_threshold"], canny["high_threshold"]]
    assert metadata["fashion.train_sha256"] == hashlib.sha256(metadata["fashion.train"].encode()).hexdigest()[:16]
    assert metadata["fashion.base_model"] == f"tiny-pretrained (models.seed={p.params['models']['seed']})"


def test_the_fixed_sample_count_changes_the_measurement_not_the_lora(trained_project):
    """train.fixed_samples is a DVC param of train-lora (train_summary.json reports with it), but
    the weights, their metadata and training_config.json do not carry it: a new count does not
    make generate-lora and everything after it rerun."""
    p = trained_project
    folder = p.path("lora")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    p.run("train_lora", train__fixed_samples=3)
    assert read_json(p.path("train_summary"))["fixed_samples"] == 3
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before

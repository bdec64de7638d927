"""generate-baseline / generate-lora: seeded, batch-independent, resumable, and the LoRA acts."""

import logging
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
import torch._inductor  # the pipeline calls cudagraph_mark_step_begin through it

from stages.common import dataset, generation, io
from stages.common.errors import StageError
from stages.common.dataset import GENERATION_CONFIG as CONFIG_FILE
from stages.common.io import load_rgb, read_json
from tests.conftest import image_diff


def generated(p, variant):
    configs = dataset.load_eval_configs(p.path("eval_data"))
    paths = p.typed().paths
    return {c["index"]: load_rgb(dataset.generated_path(paths, variant, c["index"])) for c in configs}


def test_one_image_per_eval_config_named_by_index(trained_project):
    p = trained_project
    p.run("generate_baseline")
    configs = dataset.load_eval_configs(p.path("eval_data"))
    folder = p.path("generated_baseline")
    assert sorted(f.name for f in folder.glob("*.png")) == [f"{c['index']:06d}.png" for c in configs]
    res = p.params["extract"]["resolution"]
    assert all(img.shape == (res, res, 3) for img in generated(p, "baseline").values())
    assert read_json(folder / CONFIG_FILE)["generate"]["steps"] == p.params["generate"]["steps"]


def test_seeded_and_independent_of_batch_size(trained_project):
    p = trained_project
    p.run("generate_baseline", generate__batch_size=4)
    batched = generated(p, "baseline")
    for png in p.path("generated_baseline").glob("*.png"):
        png.unlink()
    p.run("generate_baseline", generate__batch_size=1)
    single = generated(p, "baseline")
    # batching is not bit-exact on CPU (about 3e-6 in float), so allow +-2 on uint8
    assert all(image_diff(batched[i], single[i]) <= 2 for i in batched)
    assert image_diff(single[0], single[1]) > 20, "different prompts and seeds give different images"


def test_several_images_per_condition_each_with_its_own_seed(finished_project):
    """generate.images_per_condition 2: image 0 of each condition is what one image per condition
    draws (the finished run's), and image 1 is the image of seed + index + COPY_SEEDS."""
    p = finished_project
    single = generated(p, "baseline")
    p.run("generate_baseline", generate__images_per_condition=2, generate__batch_size=2)
    folder, paths = p.path("generated_baseline"), p.typed().paths
    assert sorted(f.name for f in folder.glob("*.png")) == sorted(
        dataset.generated_name(i, copy) for i in single for copy in (0, 1))
    assert read_json(folder / CONFIG_FILE)["images"] == 2 * len(single)
    seconds = {i: load_rgb(dataset.generated_path(paths, "baseline", i, 1)) for i in single}
    assert all(image_diff(generated(p, "baseline")[i], single[i]) <= 2 for i in single), "copy 0: the same seeds"
    assert all(image_diff(seconds[i], single[i]) > 20 for i in single), "copy 1: another seed, another image"
    shutil.rmtree(folder)
    p.run("generate_baseline", generate__seed=generation.COPY_SEEDS)
    assert all(image_diff(generated(p, "baseline")[i], seconds[i]) <= 2 for i in single)


def kill_after_images(project, monkeypatch, count: int) -> list:
    """Run generate-baseline and kill it right after its `count`-th image: the images are written
    on the writer's threads, so every write after it fails too, as if the process were gone."""
    real, saved, lock = io.save_png, [], threading.Lock()

    def save_then_die(path, image):
        with lock:
            if len(saved) >= count:
                raise KeyboardInterrupt
            real(path, image)
            saved.append(path)
            if len(saved) == count:
                raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        project.run("generate_baseline")
    monkeypatch.setattr(io, "save_png", real)
    return saved


def test_a_killed_run_resumes_and_new_params_start_afresh(trained_project, monkeypatch, caplog):
    p = trained_project
    p.run("generate_baseline")
    unbroken = generated(p, "baseline")
    folder = p.path("generated_baseline")
    shutil.rmtree(folder)  # as `dvc repro` does before it runs a stage
    drawn = kill_after_images(p, monkeypatch, 2)
    assert not folder.exists(), "nothing half-made in the output"
    mtimes = {f.name: f.stat().st_mtime_ns for f in drawn}
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("generate_baseline")
    assert "(2 made now, 2 by an earlier run)" in caplog.text
    assert {name: (folder / name).stat().st_mtime_ns for name in mtimes} == mtimes, "moved in, not drawn again"
    resumed = generated(p, "baseline")
    assert all(image_diff(resumed[i], unbroken[i]) <= 2 for i in unbroken)  # batches of 2 now, of 4 before
    assert not dataset.resume_dir(p.typed().paths, "generate-baseline").exists()

    shutil.rmtree(folder)
    kill_after_images(p, monkeypatch, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("generate_baseline", generate__steps=2)
    assert "holds images from other inputs; starting afresh" in caplog.text and "(4 made now, 0 by" in caplog.text
    assert image_diff(generated(p, "baseline")[0], unbroken[0]) > 0


def test_a_half_written_image_of_a_killed_run_is_removed(trained_project, monkeypatch):
    p = trained_project
    kill_after_images(p, monkeypatch, 1)
    work = dataset.resume_dir(p.typed().paths, "generate-baseline")
    half = work / ".000001.png.0a1b2c3d.tmp.png"  # what a kill inside save_png leaves
    half.write_bytes(b"\x89PNG half")
    p.run("generate_baseline")
    assert len(list(p.path("generated_baseline").glob("*.png"))) == 4 and not work.exists()


def test_missing_edges_are_named_before_loading_models(trained_project):
    p = trained_project
    dataset.edge_path(p.path("edges"), 1).unlink()
    with pytest.raises(StageError, match=r"000001.png: not found \(1 missing\); run `dvc repro canny-edges`"):
        p.run("generate_baseline")


def test_lora_changes_images_and_scale_zero_is_baseline(trained_project):
    p = trained_project
    p.run("generate_baseline")
    p.run("generate_lora")
    baseline, lora = generated(p, "baseline"), generated(p, "lora")
    assert max(image_diff(baseline[i], lora[i]) for i in baseline) > 0, "the trained LoRA changes the images"
    p.run("generate_lora", generate__lora_scale=0.0)
    off = generated(p, "lora")
    assert all(image_diff(baseline[i], off[i]) <= 1 for i in baseline)
    assert np.mean([image_diff(baseline[i], lora[i]) for i in baseline]) > np.mean(
        [image_diff(baseline[i], off[i]) for i in baseline])


def test_two_processes_draw_what_one_draws(trained_project, monkeypatch, caplog):
    """generate.processes: 2 (accelerate launch, gloo on the CPU): each process draws every other
    batch, the same batches one process draws, so the images are identical to the bit."""
    p = trained_project
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p.run("generate_lora", generate__batch_size=1)  # 4 eval images: batches 0 and 2 to process 0, 1 and 3 to 1
    one = generated(p, "lora")
    shutil.rmtree(p.path("generated_lora"))
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("generate_lora", generate__processes=2)
    assert "launch --multi_gpu --num_processes 2" in caplog.text
    two = generated(p, "lora")
    assert one.keys() == two.keys() and all(np.array_equal(one[i], two[i]) for i in one)
    assert not dataset.resume_dir(p.typed().paths, "generate-lora").exists()


def test_a_batch_too_large_for_the_gpu_is_halved(trained_project, monkeypatch, caplog):
    """generate.batch_size is a ceiling: out of memory at 4 (torch's error), then at 2 (cuBLAS's
    failed workspace, a plain RuntimeError), the stage draws 1 at a time, and the images are the
    ones a batch of 4 gives (+-2 levels). The cache is emptied after the `except` block, once the
    failed batch's traceback no longer holds its activations."""
    p = trained_project
    p.run("generate_baseline", generate__batch_size=4)
    whole = generated(p, "baseline")
    shutil.rmtree(p.path("generated_baseline"))
    real, sizes, freed = generation.draw, [], []

    def small_gpu(pipe, edges, *args, **kwargs):
        sizes.append(len(edges))
        if len(edges) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(edges) == 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real(pipe, edges, *args, **kwargs)

    monkeypatch.setattr(generation, "draw", small_gpu)
    monkeypatch.setattr(generation, "free_cached_memory", lambda dev: freed.append(sys.exc_info()[0]))
    with caplog.at_level(logging.INFO, logger="stages"):
        p.run("generate_baseline")
    assert sizes == [4, 2, 1, 1, 1, 1] and "a batch of 4 does not fit in the GPU's memory; drawing 2 at a time" in \
        caplog.text and "a batch of 2 does not fit in the GPU's memory; drawing 1 at a time" in caplog.text
    assert freed == [None, None], "emptied outside the except block, with no exception being handled"
    halved = generated(p, "baseline")
    assert all(image_diff(halved[i], whole[i]) <= 2 for i in whole)

    def broken(pipe, edges, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(generation, "draw", broken)  # not a lack of memory: it stops the stage
    shutil.rmtree(p.path("generated_baseline"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        p.run("generate_baseline")


def test_compiled_models_draw_the_same_images(finished_project, monkeypatch):
    """generate.compile goes through torch.compile (dynamo and AOTAutograd here; inductor's code
    generation takes minutes on a CPU): the same images as the finished project's eager ones.
    Compiled by assignment, so the pipeline sees both models as compiled and marks each denoising
    step's start, which reduce-overhead's CUDA graphs need (an in-place compile never marks)."""
    p = finished_project
    eager = generated(p, "lora")
    shutil.rmtree(p.path("generated_lora"))
    monkeypatch.setenv("FASHION_COMPILE_BACKEND", "aot_eager")
    marks = []
    monkeypatch.setattr(torch._inductor, "cudagraph_mark_step_begin", lambda: marks.append(1))
    p.run("generate_lora", generate__compile="reduce-overhead")
    compiled = generated(p, "lora")
    assert all(image_diff(compiled[i], eager[i]) <= 2 for i in eager)
    cfg = p.typed().generate
    calls = -(-len(eager) // cfg.batch_size)
    assert len(marks) == calls * cfg.steps, "one mark per denoising step of every pipeline call"


def test_a_scheduler_without_zero_snr_is_refused_for_a_zero_snr_model(project):
    """PNDM would sample the tiny (zero terminal SNR) models on the wrong schedule, silently."""
    from stages.common import models

    with pytest.raises(StageError, match=r"generate.scheduler: pndm cannot sample .*zero terminal SNR.*use unipc"):
        models.load_controlnet_pipeline(project.path("base_model"), project.path("controlnet"), "pndm",
                                        torch.float32, torch.device("cpu"))


def test_sd15s_own_scheduler_config_trains_and_draws(extracted):
    """Real SD 1.5 is epsilon-prediction under PNDM's config, unlike the tiny kit: the same stages
    train on it and draw with it (the epsilon branch of the loss, UniPC from PNDM's config)."""
    from bench.full_size_models import sd15_scheduler

    p = extracted
    sd15_scheduler().save_pretrained(p.path("base_model") / "scheduler")
    p.run("train_lora", train__max_steps=2)
    summary = read_json(p.path("train_summary"))
    assert np.isfinite(summary["denoising_loss_lora"]) and summary["denoising_loss_base"] > 0.5  # epsilon: ~1
    p.run("generate_baseline")
    assert len(list(p.path("generated_baseline").glob("*.png"))) == p.params["extract"]["eval_products"]

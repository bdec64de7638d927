"""metrics: our FID/KID agree with clean-fid's formulas; LPIPS and CLIP are per image and honest."""

import numpy as np
import pandas as pd
import pytest
import torch
from cleanfid import fid as cleanfid

from stages import metrics
from stages.common import dataset
from stages.common.cli import StageError
from stages.common.io import read_json
from stages.common.models import load_clip
from tests.conftest import fill_generated


@pytest.mark.parametrize("n", [12, 80])  # fewer and more samples than dimensions
def test_frechet_distance_matches_clean_fid(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 32))
    b = rng.normal(0.3, 1.5, size=(n + 5, 32)) + a[:1]
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_kid_matches_clean_fid_when_subsets_cover_everything():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 64)), rng.normal(0.2, 1, size=(30, 64))
    ours, spread = metrics.kernel_distance(a, b, subsets=3, subset_size=1000, seed=0)
    assert ours == pytest.approx(cleanfid.kernel_distance(a, b, num_subsets=3), rel=1e-9)
    assert spread == pytest.approx(0, abs=1e-12)
    # with real subsets it is seeded: same seed, same value
    assert metrics.kernel_distance(a, b, 10, 10, seed=1) == metrics.kernel_distance(a, b, 10, 10, seed=1)


def test_identical_images_score_perfectly(extracted):
    p = extracted
    fill_generated(p, lambda i: dataset.gt_path(p.path("eval_data"), i))
    p.run("metrics")
    result = read_json(p.path("metrics"))
    n = p.params["extract"]["eval_products"]
    detail = read_json(p.path("metrics_detail"))
    assert result["n"] == n and detail["backbones"]["clip"] == "tiny-random-clip"
    for variant in dataset.VARIANTS:
        r = result[variant]
        assert set(r) == {"fid", "kid", "lpips", "clip_score"}, "headline numbers only"
        assert detail[variant]["n"] == n and set(detail[variant]) == {"n", "kid_std", "lpips_ci95", "clip_score_ci95"}
        assert r["fid"] == pytest.approx(0, abs=1e-3)
        assert r["lpips"] == pytest.approx(0, abs=1e-6)
        assert r["clip_score"] == pytest.approx(detail["ground_truth"]["clip_score"], abs=1e-6)
    table = pd.read_csv(p.path("per_sample"))
    assert len(table) == n and {"lpips_baseline", "clip_lora", "clip_ground_truth"} <= set(table.columns)


def test_different_images_score_worse(extracted):
    p = extracted
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics")
    result = read_json(p.path("metrics"))
    for variant in dataset.VARIANTS:
        assert result[variant]["fid"] > 0.01 and result[variant]["lpips"] > 0.05
    assert (pd.read_csv(p.path("per_sample"))[["clip_baseline", "clip_lora"]] >= 0).all().all()  # max(cos, 0)


def test_clip_score_is_the_cosine_of_clip_embeddings(extracted):
    p = extracted
    configs = dataset.load_eval_configs(p.path("eval_data"))
    files = [dataset.gt_path(p.path("eval_data"), c["index"]) for c in configs]
    prompts = [c["prompt"] for c in configs]
    model, processor = load_clip(p.path("eval_models"), torch.device("cpu"))
    ours = metrics.clip_cosines(model, processor, files, prompts, torch.device("cpu"), batch_size=3)
    from PIL import Image
    with torch.no_grad():
        inputs = processor(text=prompts, images=[Image.open(f) for f in files], return_tensors="pt", padding=True)
        out = model(**inputs)
    # logits_per_image = logit_scale * cosine; the diagonal pairs each image with its own prompt
    expected = (out.logits_per_image.diagonal() / model.logit_scale.exp()).detach().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_clip_truncates_long_prompts_keeping_eos(extracted):
    p = extracted
    model, processor = load_clip(p.path("eval_models"), torch.device("cpu"))
    gt = dataset.gt_path(p.path("eval_data"), 0)
    head = "x" * 75  # the byte-level tiny tokenizer: one token per character; BOS + 75 + EOS = 77
    prompts = [head + "y" * 300, head + "z" * 300, head[:-1] + "w"]
    scores = metrics.clip_cosines(model, processor, [gt] * 3, prompts, torch.device("cpu"), batch_size=3)
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # both cut to the same 77 tokens
    # had truncation dropped EOS, CLIP would pool the wrong position and all three would agree
    assert scores[2] != pytest.approx(scores[0], abs=1e-6)


def test_missing_generations_are_named(extracted):
    with pytest.raises(StageError, match=r"000000.png: not found .*run `dvc repro generate-baseline`"):
        extracted.run("metrics")

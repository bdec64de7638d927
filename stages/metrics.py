"""metrics: how close each generated set is to the eval ground truth, how well it follows its
edge maps, and how sure we can be, with LoRA compared to the baseline pair by pair.

    python -m stages.metrics

- FID / KID: clean-fid's "clean" resize and Inception features (loaded from models/eval, never
  downloaded), with our own Fréchet distance and seeded KID (stages/common/statistics.py).
  clean-fid's versions call `sqrtm(disp=False)` (gone in SciPy 1.18) and draw KID subsets from
  the global, unseeded `np.random`; its KID also compares each generated image with its own
  ground truth, which biases it for paired sets.
- LPIPS (alex): each generated image against its own ground truth.
- CLIP score: per image max(cos, 0) of CLIP image and prompt embeddings, i.e. torchmetrics'
  definition / 100, the scale of the published 0.28-0.30 (`logits_per_image / 100`); the raw
  cosine is kept beside it. Prompts are truncated to 77 tokens with EOS kept. Computed with
  transformers directly: torchmetrics' CLIPScore crashes on transformers 5 and its truncation
  drops EOS.
- CMMD (Jayasumana et al. 2024): an MMD on the same CLIP image embeddings, with the paper's RBF
  kernel and scale; unbiased and without the matched pairs, as KID.
- SSIM and PSNR: each generated image against its own ground truth (pixels, no backbone).
- Precision, recall, density, coverage (Naeem et al. 2020) on the Inception features, k =
  `metrics.prdc_k`: fidelity and diversity apart, as one FID cannot say.
- Edge fidelity (controllability): the canny map of each generated image, with canny-edges'
  thresholds, against the edge map it was given: precision, recall and F1 within
  `metrics.edge_tolerance` pixels. Its chance level is the F1 of the same image against maps of
  other eval samples of its category (`metrics.edge_chance_maps` of them): an image that draws
  the right kind of garment but ignores its own map scores that much. Edge control is own minus
  same-category F1, for the ground truth too (what a perfect follower gains). The F1 against the
  next sample's map, usually another kind of garment, stays beside it (`edge_f1_mismatched`).
- Prompt colour (the demo only, where every prompt names a palette colour): the share of the
  garment in the prompt's colour, and whether it reaches `colour.MATCH` (stages/demo/colour.py).
- Per category: n and each headline per-sample metric with its interval, by garment category.
- Uncertainty: Student-t 95% intervals for means; one seeded bootstrap over eval pairs for KID,
  CMMD and every LoRA-minus-baseline delta, and for the FID delta (centred on the estimate:
  resampling repeats images, which pushes FID up; statistics.centred_interval). FID is "FID at
  this n": its small-n bias does not cancel between variants, so a variant's FID gets no
  interval, and the FID and KID deltas get a paired sign-flip permutation p-value
  (`metrics.permutations`). Backbones run in full fp32 unless `metrics.tf32`.
Writes metrics.json (a terminal view for `dvc exp show` and `dvc metrics diff`: at most eight
numbers for baseline, LoRA and their delta), metrics_detail.json (the headline numbers with their
intervals, shares and p-values; edge precision, recall and chance levels, prompt colour, PRDC, the
per-category table, seed variance, KID's effective subsets, warnings, settings, backbones) and a
per-image table.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common import dataset, statistics
from stages.demo import colour
from stages.common.cli import log, run_cli, setup_logging
from stages.common.edge_scores import SCORES as EDGE_SCORES, edge_map, same_category_maps, score_images
from stages.common.io import (atomic_file, check_images, check_no_strays, csv_text, image_size, load_rgb,
                              read_json, write_json)
from stages.common.backbones import clip_embeddings, inception_features, lpips_scores
from stages.common.models import load_clip, load_inception, load_lpips, require_file
from stages.common.params import load_params
from stages.common.runtime import device, peak_memory, set_tf32
from stages.common.set_level import mean_of, seed_variance, set_level, with_interval
from stages.common.similarity import pair_scores

# Per-sample scores compared pair by pair, and which way is better.
HIGHER_IS_BETTER = {"lpips": False, "clip_score": True, "ssim": True, "psnr": True, "edge_f1": True,
                    "edge_control": True, "edge_precision": True, "edge_recall": True}
# Per-sample scores in the headline blocks (metrics_detail.json's `headline`), each with its interval.
HEADLINE_SAMPLES = ("lpips", "clip_score", "ssim", "psnr", "edge_f1", "edge_control")
# metrics.json, the terminal view: what `dvc exp show` and `dvc metrics diff` print for each block,
# at most eight numbers, no intervals. KID is multiplied by 1000 (its values are about 1e-5 on the
# demo, which DVC's 5 decimals print as 0.0); the demo adds its prompt colour match.
TERMINAL = ("fid", "kid", "cmmd", "lpips", "ssim", "clip_score", "edge_control")
TERMINAL_BLOCKS = {"baseline": "baseline", "lora": "lora", "lora_minus_baseline": "delta"}
NO_CATEGORY = "(no category)"
FID_DIMS = 2048  # Inception pool features: below this many images each covariance is rank-deficient


def paired_deltas(table: pd.DataFrame, compared: dict[str, bool], counts: np.ndarray) -> dict:
    """LoRA minus baseline of each per-sample score on the same pairs (adds `<name>_delta` columns):
    what users want to know, and far tighter than comparing two separate intervals. Edge control
    pairs only the samples with a chance level; None where no sample has one."""
    paired = {}
    for name, higher in compared.items():
        table[f"{name}_delta"] = table[f"{name}_lora"] - table[f"{name}_baseline"]
        scored = table[f"{name}_delta"].notna().to_numpy()
        paired[name] = statistics.paired_delta(table[f"{name}_baseline"][scored], table[f"{name}_lora"][scored],
                                               counts[:, scored], higher) if scored.any() else None
    return paired


def per_category(table: pd.DataFrame, categories: list[str], means: tuple, shares: list[str], share) -> dict:
    """n and each headline per-sample metric (t intervals; `share`'s for the `shares`), for each
    variant and LoRA minus baseline, by category."""
    out = {}
    for category in sorted(set(categories)):
        rows = table[np.asarray(categories) == category]
        out[category] = {"n": len(rows)}
        for block in (*dataset.VARIANTS, "lora_minus_baseline"):
            column = "delta" if block == "lora_minus_baseline" else block
            out[category][block] = {name: statistics.mean_interval(rows[f"{name}_{column}"]) for name in means}
            out[category][block].update({name: share(rows[f"{name}_{column}"])
                                         if block != "lora_minus_baseline" else
                                         statistics.mean_interval(rows[f"{name}_{column}"]) for name in shares})
    return out


def terminal_view(details: dict) -> dict:
    """metrics.json: n, and for baseline, LoRA and their paired delta the TERMINAL numbers (KID as
    kid_x1e3), plus the demo's prompt colour match. Everything else, intervals first, is in
    metrics_detail.json; the report and the charts read it there."""
    out = {"n": details["n"]}
    for block, name in TERMINAL_BLOCKS.items():
        values = details["headline"][block]
        out[name] = {("kid_x1e3" if key == "kid" else key): values[key] * 1000 if key == "kid" else values[key]
                     for key in TERMINAL}
        if "prompt_colour" in details:
            colour = details["lora_minus_baseline"] if block == "lora_minus_baseline" else details["prompt_colour"][block]
            out[name]["colour_match"] = colour["colour_match"]["mean"]
    return out


def settings(cfg, params, dev) -> dict:
    return {"confidence": statistics.CONFIDENCE,
            "means": "Student t; Wilson for shares of one image per condition, t for shares over several",
            "bootstrap": "paired over eval images; percentile intervals, the FID delta's centred on the estimate "
                         "(conservative)",
            "bootstrap_resamples": cfg.bootstrap_resamples, "fid_bootstrap_resamples": cfg.fid_bootstrap_resamples,
            "permutations": cfg.permutations, "prdc_k": cfg.prdc_k, "edge_chance_maps": cfg.edge_chance_maps,
            "seed": cfg.seed, "edge_tolerance_px": cfg.edge_tolerance, "canny": dataclasses.asdict(params.canny),
            "tf32": cfg.tf32, "device": dev.type}


def shown(value, fmt: str = "%+.3g") -> str:
    return "n/a" if value is None else fmt % value


def warnings_for(n: int, kid: dict, cfg, categories: list[str], chance_maps) -> list[str]:
    notes = []
    if n < FID_DIMS:
        notes.append(f"FID: n = {n} < {FID_DIMS} Inception dimensions, so each covariance is rank-deficient; FID is "
                     "biased upward below about 10,000 images: compare FIDs only at equal n, and lean on KID and "
                     "the paired deltas")
    elif n < 10_000:
        notes.append(f"FID: biased upward below about 10,000 images (n = {n}): compare FIDs only at equal n")
    if kid["subset_size"] == n:
        notes.append(f"KID: metrics.kid_subset_size {cfg.kid_subset_size} >= n = {n}, so every subset is the whole "
                     "set: one estimate, no subset std; its interval is the bootstrap's")
    if cfg.fid_bootstrap_resamples == 0:
        notes.append("FID: no interval for the delta (metrics.fid_bootstrap_resamples is 0)")
    if cfg.permutations == 0:
        notes.append("FID, KID: no p-value for the deltas (metrics.permutations is 0)")
    if n < cfg.prdc_k + 1:
        notes.append(f"PRDC: n = {n} eval images, fewer than metrics.prdc_k + 1 = {cfg.prdc_k + 1}, so no k-th "
                     "neighbour: no precision, recall, density or coverage; lower metrics.prdc_k")
    if NO_CATEGORY in categories:
        notes.append(f"{categories.count(NO_CATEGORY)} of {n} eval samples have no category in eval_configs.json: "
                     "they have no same-category edge chance level and are grouped as " + NO_CATEGORY)
    alone = sorted({c for c, maps in zip(categories, chance_maps, strict=True) if c != NO_CATEGORY and not len(maps)})
    if alone:
        notes.append(f"edge control: {', '.join(alone)}: one eval sample in the category, so no same-category "
                     "chance level; edge control leaves such samples out, and their category rows have none")
    if not any(len(maps) for maps in chance_maps):
        notes.append("edge control: no eval sample shares its category with another, so there is no same-category "
                     "chance level (edge_control is null); evaluate more samples per category")
    return notes


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.metrics, params.paths
    dev = device()
    set_tf32(cfg.tf32)
    configs = dataset.load_eval_configs(paths.eval_data)
    indices = [c["index"] for c in configs]
    prompts = [c["prompt"] for c in configs]
    categories = [str(c.get("category") or "").strip() or NO_CATEGORY for c in configs]
    n = len(indices)
    gt_files = [dataset.gt_path(paths.eval_data, i) for i in indices]
    edge_files = [dataset.edge_path(paths.edges, i) for i in indices]
    copies = params.generate.images_per_condition
    # generated[variant][j]: image j of every condition, one set paired with the ground truth
    generated = {v: [[dataset.generated_path(paths, v, i, j) for i in indices] for j in range(copies)]
                 for v in dataset.VARIANTS}
    backbones = read_json(require_file(Path(paths.eval_models) / dataset.BACKBONES_FILE))
    # Every input checked before any model loads: present, readable, the ground truth's size, and
    # no image from another eval set.
    check_images(gt_files, "extract")
    size = image_size(gt_files[0])
    check_images(edge_files, "canny-edges", size)
    for variant, sets in generated.items():
        files = [f for files in sets for f in files]
        check_images(files, f"generate-{variant}", size)
        check_no_strays(files, f"generate-{variant}")

    inception = load_inception(paths.eval_models, dev, paths.model_sources)
    lpips_model = load_lpips(paths.eval_models, dev)
    clip_model, clip_processor = load_clip(paths.eval_models, dev)
    table = pd.DataFrame({"index": indices, "product_id": [c["product_id"] for c in configs], "prompt": prompts,
                          "category": categories})
    gt_feats = inception_features(gt_files, inception, dev, cfg.batch_size)
    gt_cosines, gt_embeds = clip_embeddings(clip_model, clip_processor, gt_files, prompts, dev, cfg.batch_size)
    maps = [edge_map(load_rgb(e), cfg.edge_tolerance) for e in edge_files]
    chance_maps = same_category_maps([c if c != NO_CATEGORY else "" for c in categories], cfg.edge_chance_maps,
                                     cfg.seed)
    # The demo names one palette colour per prompt; real FashionGen prompts name others.
    colours = [colour.named_colour(p) for p in prompts]
    demo_colours = all(colours)
    masks = [colour.garment_mask(load_rgb(f)) for f in gt_files] if demo_colours else None
    feats, embeds, spread = {}, {}, {}
    for variant, sets in tqdm({"ground_truth": [gt_files], **generated}.items(), desc="metrics"):
        scores, feats[variant], embeds[variant] = [], [], []
        for files in sets:
            image = score_images(files, maps, chance_maps, params.canny, cfg.edge_tolerance)
            image["edge_control"] = image["edge_f1"] - image["edge_f1_same_category"]
            if variant == "ground_truth":
                image["clip_cosine"] = gt_cosines
            else:
                feats[variant].append(inception_features(files, inception, dev, cfg.batch_size))
                image["lpips"] = lpips_scores(lpips_model, gt_files, files, dev, cfg.batch_size)
                cosines, embedded = clip_embeddings(clip_model, clip_processor, files, prompts, dev, cfg.batch_size)
                image["clip_cosine"] = cosines
                embeds[variant].append(embedded)
                image["ssim"], image["psnr"] = pair_scores(gt_files, files).T
            image["clip_score"] = np.maximum(image["clip_cosine"], 0)
            if demo_colours:
                image["colour_share"] = np.array([colour.colour_share(load_rgb(f), m, c)
                                                  for f, m, c in zip(files, masks, colours, strict=True)])
                image["colour_match"] = (image["colour_share"] >= colour.MATCH).astype(float)
            scores.append(image)
        # A condition's score is the mean over its images; their spread is the seed's.
        for name in scores[0]:
            values = np.stack([np.asarray(image[name], dtype=np.float64) for image in scores])
            table[f"{name}_{variant}"] = values.mean(axis=0)
            if len(values) > 1:
                table[f"{name}_{variant}_seed_sd"] = spread[name, variant] = values.std(axis=0, ddof=1)
    feats = {variant: np.stack(f) for variant, f in feats.items() if f}
    embeds = {variant: np.stack(e) for variant, e in embeds.items() if e}

    results, details, counts = set_level(gt_feats, feats, gt_embeds, embeds, cfg)
    for variant in dataset.VARIANTS:
        for name in HEADLINE_SAMPLES:
            m = statistics.mean_interval(table[f"{name}_{variant}"])
            results[variant].update(with_interval(name, m["mean"], m["ci95_low"], m["ci95_high"]))
        details[variant].update({name: statistics.mean_interval(table[f"{name}_{variant}"]) for name in (
            "edge_precision", "edge_recall", "edge_f1_mismatched", "edge_f1_same_category", "clip_cosine")})
        details[variant]["prdc"] = mean_of([statistics.prdc(gt_feats, f, cfg.prdc_k) for f in feats[variant]]) \
            if n > cfg.prdc_k else None
    details["ground_truth"] = {
        **with_interval("clip_score", *statistics.t_interval(table["clip_score_ground_truth"])),
        **{name: statistics.mean_interval(table[f"{name}_ground_truth"]) for name in (*EDGE_SCORES, "edge_control")}}
    compared = {**HIGHER_IS_BETTER, **({"colour_share": True, "colour_match": True} if demo_colours else {})}
    details["lora_minus_baseline"] = paired = paired_deltas(table, compared, counts)
    for name in HEADLINE_SAMPLES:
        d = paired[name] or dict.fromkeys(("mean", "ci95_low", "ci95_high", "lora_better", "lora_worse"))
        results["lora_minus_baseline"].update({**with_interval(name, d["mean"], d["ci95_low"], d["ci95_high"]),
                                               f"{name}_lora_better": d["lora_better"],
                                               f"{name}_lora_worse": d["lora_worse"]})
    # A match is 0/1 per image (a Wilson interval); over several images per condition it is a share
    # per condition, whose mean gets a t interval.
    share = statistics.share_interval if copies == 1 else statistics.mean_interval
    if demo_colours:
        details["prompt_colour"] = {"match_threshold": colour.MATCH, **{  # one 0/1 ground truth per condition
            variant: {"colour_share": statistics.mean_interval(table[f"colour_share_{variant}"]),
                      "colour_match": (statistics.share_interval if variant == "ground_truth" else share)(
                          table[f"colour_match_{variant}"])}
            for variant in ("ground_truth", *dataset.VARIANTS)}}
    details["per_category"] = per_category(table, categories, HEADLINE_SAMPLES,
                                           ["colour_match"] if demo_colours else [], share)
    details["seed_variance"] = seed_variance(table, spread, details, copies) if copies > 1 else None
    details["warnings"] = warnings_for(n, details["baseline"]["kid"], cfg, categories, chance_maps)
    details["settings"] = {**settings(cfg, params, dev), "images_per_condition": copies}
    details["backbones"] = backbones
    for note in details["warnings"]:
        log.warning("%s", note)

    with atomic_file(paths.per_sample) as tmp:
        # full precision: every float round-trips; dataset text cannot become a spreadsheet formula
        table.assign(prompt=table["prompt"].map(csv_text), category=table["category"].map(csv_text)).to_csv(
            tmp, index=False)
    details = {"n": n, "headline": results, **{k: v for k, v in details.items() if k != "n"}}
    write_json(paths.metrics_detail, details, finite=True)
    write_json(paths.metrics, terminal_view(details), finite=True)
    delta = results["lora_minus_baseline"]
    log.info("metrics: n=%d; LoRA - baseline: FID %+.3g (p = %s), LPIPS %+.3g [%.3g, %.3g] (better on %.0f%%), "
             "SSIM %+.3g, CLIP %+.3g, edge F1 %+.3g, edge control %s%s; wrote %s", n, delta["fid"],
             shown(delta["fid_p_value"], "%.3g"), delta["lpips"], delta["lpips_ci95_low"], delta["lpips_ci95_high"],
             100 * delta["lpips_lora_better"], delta["ssim"], delta["clip_score"], delta["edge_f1"],
             shown(delta["edge_control"]), peak_memory(dev), paths.metrics)


if __name__ == "__main__":
    run_cli(main)

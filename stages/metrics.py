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
- Edge fidelity (controllability): the canny map of each generated image, with canny-edges'
  thresholds, against the edge map it was given: precision, recall and F1 within
  `metrics.edge_tolerance` pixels; and F1 against the next sample's edge map, the chance level
  of an image that ignores its own (`edge_f1_mismatched` in metrics_detail.json).
- Prompt colour (the demo only, where every prompt names a palette colour): the share of the
  garment in the prompt's colour, and whether it reaches `colour.MATCH` (stages/demo/colour.py).
- Uncertainty: Student-t 95% intervals for means; one seeded bootstrap over eval pairs for FID,
  KID and every LoRA-minus-baseline delta. FID's interval is the bootstrap's spread centred on
  the estimate: resampling repeats images, which pushes FID up (statistics.centred_interval).
  Backbones run in full fp32 unless `metrics.tf32`.
Writes metrics.json (headline numbers with intervals and paired deltas: `dvc metrics show`),
metrics_detail.json (edge precision and recall, prompt colour, KID's effective subsets, warnings,
settings, backbones) and a per-image table.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stages.common import dataset, statistics
from stages.demo import colour
from stages.common.cli import log, run_cli, setup_logging
from stages.common.edges import canny, edge_fidelity
from stages.common.io import (atomic_file, check_images, check_no_strays, csv_text, image_size, load_rgb,
                              read_json, write_json)
from stages.common.models import load_clip, load_inception, load_lpips, require_file
from stages.common.params import load_params
from stages.common.runtime import device, peak_memory, set_tf32

# Per-sample scores compared pair by pair, and which way is better.
HIGHER_IS_BETTER = {"lpips": False, "clip_score": True, "edge_f1": True, "edge_precision": True, "edge_recall": True}
FID_DIMS = 2048  # Inception pool features: below this many images each covariance is rank-deficient


def inception_features(files, model, dev, batch_size: int) -> np.ndarray:
    from cleanfid.fid import get_files_features

    # num_workers=0: clean-fid's default of 12 workers breaks on Docker's 64 MB /dev/shm.
    return get_files_features([str(f) for f in files], model, num_workers=0, batch_size=batch_size, device=dev,
                              mode="clean", verbose=False)


def _batches(items, size):
    return (items[i:i + size] for i in range(0, len(items), size))


def _to_tensor(images, dev) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1


@torch.no_grad()
def lpips_scores(model, gt_files, gen_files, dev, batch_size: int) -> np.ndarray:
    scores = []
    for pairs in _batches(list(zip(gt_files, gen_files, strict=True)), batch_size):
        gt = _to_tensor([load_rgb(g) for g, _ in pairs], dev)
        gen = _to_tensor([load_rgb(p) for _, p in pairs], dev)
        scores.append(model(gt, gen).flatten().cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def clip_cosines(model, processor, files, prompts, dev, batch_size: int) -> np.ndarray:
    scores = []
    for chunk in _batches(list(zip(files, prompts, strict=True)), batch_size):
        text = processor.tokenizer([p for _, p in chunk], padding=True, truncation=True, max_length=77,
                                   return_tensors="pt").to(dev)
        pixels = processor.image_processor([load_rgb(f) for f, _ in chunk], return_tensors="pt").to(dev)
        image_embeds = model.get_image_features(**pixels)
        text_embeds = model.get_text_features(**text)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        scores.append(cosine.float().cpu().numpy())
    return np.concatenate(scores)


def edge_scores(files, edge_files, canny_cfg, tolerance: float) -> np.ndarray:
    """(n, 3) precision, recall, F1 of each generated image's canny edges against its input map."""
    return np.array([edge_fidelity(canny(load_rgb(f), canny_cfg.low_threshold, canny_cfg.high_threshold),
                                   load_rgb(e), tolerance) for f, e in zip(files, edge_files, strict=True)])


def with_interval(name: str, value, low, high) -> dict:
    """Flat keys, so `dvc metrics show` and `dvc exp show` print every number as a column."""
    return {name: value, f"{name}_ci95_low": low, f"{name}_ci95_high": high}


def mean_interval(values) -> dict:
    mean, low, high = statistics.t_interval(values)
    return {"mean": mean, "ci95_low": low, "ci95_high": high}


def warnings_for(n: int, kid: dict, cfg) -> list[str]:
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
        notes.append("FID: no interval (metrics.fid_bootstrap_resamples is 0)")
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
    n = len(indices)
    gt_files = [dataset.gt_path(paths.eval_data, i) for i in indices]
    edge_files = [dataset.edge_path(paths.edges, i) for i in indices]
    generated = {v: [dataset.generated_path(paths, v, i) for i in indices] for v in dataset.VARIANTS}
    backbones = read_json(require_file(Path(paths.eval_models) / dataset.BACKBONES_FILE))
    # Every input checked before any model loads: present, readable, the ground truth's size, and
    # no image from another eval set.
    check_images(gt_files, "extract")
    size = image_size(gt_files[0])
    check_images(edge_files, "canny-edges", size)
    for variant, files in generated.items():
        check_images(files, f"generate-{variant}", size)
        check_no_strays(files, f"generate-{variant}")

    inception = load_inception(paths.eval_models, dev, paths.model_sources)
    lpips_model = load_lpips(paths.eval_models, dev)
    clip_model, clip_processor = load_clip(paths.eval_models, dev)
    table = pd.DataFrame({"index": indices, "product_id": [c["product_id"] for c in configs], "prompt": prompts})
    gt_feats = inception_features(gt_files, inception, dev, cfg.batch_size)
    table["clip_cosine_ground_truth"] = clip_cosines(clip_model, clip_processor, gt_files, prompts, dev, cfg.batch_size)
    table["clip_score_ground_truth"] = table["clip_cosine_ground_truth"].clip(lower=0)
    feats = {}
    for variant, files in tqdm(generated.items(), desc="metrics"):
        feats[variant] = inception_features(files, inception, dev, cfg.batch_size)
        table[f"lpips_{variant}"] = lpips_scores(lpips_model, gt_files, files, dev, cfg.batch_size)
        cosines = clip_cosines(clip_model, clip_processor, files, prompts, dev, cfg.batch_size)
        table[f"clip_cosine_{variant}"] = cosines
        table[f"clip_score_{variant}"] = np.maximum(cosines, 0)
        edges = edge_scores(files, edge_files, params.canny, cfg.edge_tolerance)
        for column, name in enumerate(("edge_precision", "edge_recall", "edge_f1")):
            table[f"{name}_{variant}"] = edges[:, column]
        # Chance level: the same images against the next sample's edge map. A model that draws
        # garments but ignores its edge map scores this much too.
        table[f"edge_f1_mismatched_{variant}"] = edge_scores(
            files, edge_files[1:] + edge_files[:1], params.canny, cfg.edge_tolerance)[:, 2]

    # The demo names one palette colour per prompt; real FashionGen prompts name others.
    colours = [colour.named_colour(p) for p in prompts]
    demo_colours = all(colours)
    if demo_colours:
        masks = [colour.garment_mask(load_rgb(f)) for f in gt_files]
        for variant, files in {"ground_truth": gt_files, **generated}.items():
            shares = [colour.colour_share(load_rgb(f), m, c) for f, m, c in zip(files, masks, colours, strict=True)]
            table[f"colour_share_{variant}"] = shares
            table[f"colour_match_{variant}"] = (np.array(shares) >= colour.MATCH).astype(float)

    # One draw of resampled eval pairs serves every interval; FID uses its first rows.
    counts = statistics.resample_counts(n, max(cfg.bootstrap_resamples, cfg.fid_bootstrap_resamples), cfg.seed)
    fid_counts = counts[:cfg.fid_bootstrap_resamples]
    counts = counts[:cfg.bootstrap_resamples]
    kid_boot = statistics.kid_resamples(gt_feats, feats, counts)
    fid_boot = statistics.fid_resamples(gt_feats, feats, fid_counts) if len(fid_counts) else None
    results, details = {"n": n}, {"n": n}
    fid, kid = {}, {}
    for variant in dataset.VARIANTS:
        fid[variant] = statistics.frechet_distance(gt_feats, feats[variant])
        kid[variant] = statistics.kernel_distance(gt_feats, feats[variant], cfg.kid_subsets, cfg.kid_subset_size,
                                                  cfg.seed)
        fid_ci = statistics.centred_interval(fid[variant], fid_boot[variant]) if fid_boot else (None, None)
        results[variant] = {**with_interval("fid", fid[variant], *fid_ci),
                            **with_interval("kid", kid[variant]["kid"],
                                            *statistics.percentile_interval(kid_boot[variant]))}
        for name in ("lpips", "clip_score", "edge_f1"):
            results[variant].update(with_interval(name, *statistics.t_interval(table[f"{name}_{variant}"])))
        details[variant] = {"kid": {k: v for k, v in kid[variant].items() if k != "kid"},
                            **{name: mean_interval(table[f"{name}_{variant}"])
                               for name in ("edge_precision", "edge_recall", "edge_f1_mismatched", "clip_cosine")}}

    # LoRA minus baseline on the same pairs: what users want to know, and far tighter than
    # comparing two separate intervals.
    deltas = {}
    fid_delta = fid["lora"] - fid["baseline"]
    deltas.update(with_interval("fid", fid_delta, *(statistics.centred_interval(
        fid_delta, fid_boot["lora"] - fid_boot["baseline"]) if fid_boot else (None, None))))
    deltas.update(with_interval("kid", kid["lora"]["kid"] - kid["baseline"]["kid"],
                                *statistics.percentile_interval(kid_boot["lora"] - kid_boot["baseline"])))
    paired = {}
    compared = {**HIGHER_IS_BETTER, **({"colour_share": True, "colour_match": True} if demo_colours else {})}
    for name, higher in compared.items():
        paired[name] = statistics.paired_delta(table[f"{name}_baseline"], table[f"{name}_lora"], counts, higher)
        table[f"{name}_delta"] = table[f"{name}_lora"] - table[f"{name}_baseline"]
    for name in ("lpips", "clip_score", "edge_f1"):
        d = paired[name]
        deltas.update({**with_interval(name, d["mean"], d["ci95_low"], d["ci95_high"]),
                       f"{name}_lora_better": d["lora_better"], f"{name}_lora_worse": d["lora_worse"]})
    results["lora_minus_baseline"] = deltas
    details["lora_minus_baseline"] = paired  # every per-sample delta, with the shares LoRA wins and loses
    details["ground_truth"] = with_interval("clip_score", *statistics.t_interval(table["clip_score_ground_truth"]))
    if demo_colours:
        details["prompt_colour"] = {"match_threshold": colour.MATCH, **{
            variant: {"colour_share": mean_interval(table[f"colour_share_{variant}"]),
                      "colour_match": dict(zip(("mean", "ci95_low", "ci95_high"),
                                               statistics.proportion_interval(table[f"colour_match_{variant}"])))}
            for variant in ("ground_truth", *dataset.VARIANTS)}}
    details["warnings"] = warnings_for(n, kid["baseline"], cfg)
    details["settings"] = {"confidence": statistics.CONFIDENCE, "means": "Student t",
                           "bootstrap": "paired over eval images; percentile intervals, FID's centred on the "
                                        "estimate (conservative)",
                           "bootstrap_resamples": cfg.bootstrap_resamples,
                           "fid_bootstrap_resamples": cfg.fid_bootstrap_resamples, "seed": cfg.seed,
                           "edge_tolerance_px": cfg.edge_tolerance, "canny": dataclasses.asdict(params.canny),
                           "tf32": cfg.tf32, "device": dev.type}
    details["backbones"] = backbones
    for note in details["warnings"]:
        log.warning("%s", note)

    with atomic_file(paths.per_sample) as tmp:
        # full precision: every float round-trips; dataset text cannot become a spreadsheet formula
        table.assign(prompt=table["prompt"].map(csv_text)).to_csv(tmp, index=False)
    write_json(paths.metrics_detail, details)
    write_json(paths.metrics, results)
    log.info("metrics: n=%d; LoRA - baseline: FID %+.3g, LPIPS %+.3g [%.3g, %.3g] (better on %.0f%%), "
             "CLIP %+.3g, edge F1 %+.3g%s; wrote %s", n, fid_delta, deltas["lpips"], deltas["lpips_ci95_low"],
             deltas["lpips_ci95_high"], 100 * deltas["lpips_lora_better"], deltas["clip_score"], deltas["edge_f1"],
             peak_memory(dev), paths.metrics)


if __name__ == "__main__":
    run_cli(main)

"""The metrics stage's set-level numbers over one or several seed sets: FID, KID and CMMD of each
variant and LoRA minus baseline with their bootstrap intervals and permutation p-values, and how
much of every number is the seed's (generate.images_per_condition).

With k images per condition, copy j is one image per condition, paired with the ground truth as a
single set is; each set-level number is the mean over the k copies' sets, and a resample or a sign
flip takes all of a condition's copies.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.common import dataset, statistics


def with_interval(name: str, value, low, high) -> dict:
    """Flat keys, so `dvc metrics show` and `dvc exp show` print every number as a column."""
    return {name: value, f"{name}_ci95_low": low, f"{name}_ci95_high": high}


def mean_of(draws: list[dict]) -> dict:
    """Each variant's values averaged over the image sets of a condition's copies."""
    return {name: np.mean([d[name] for d in draws], axis=0) for name in draws[0]}


def set_level(gt_feats, feats: dict, gt_embeds, embeds: dict, cfg) -> tuple[dict, dict, np.ndarray]:
    """FID, KID and CMMD of each variant and LoRA minus baseline (the headline blocks), KID's
    subsets (metrics_detail.json's), and the resampled eval pairs: one draw serves every interval
    (FID's delta uses its first rows). The FID and KID deltas also get a sign-flip permutation p.
    `feats` and `embeds` hold (copies, n, d) per variant: copy j is one image per condition, paired
    with the ground truth as a single set is, and each number is the mean over the copies' sets
    (with one copy, the set's own). A resample and a sign flip take all of a condition's copies."""
    n, sets = len(gt_feats), range(len(feats["baseline"]))
    counts = statistics.resample_counts(n, max(cfg.bootstrap_resamples, cfg.fid_bootstrap_resamples), cfg.seed)
    fid_counts, counts = counts[:cfg.fid_bootstrap_resamples], counts[:cfg.bootstrap_resamples]
    copy = [{variant: feats[variant][j] for variant in dataset.VARIANTS} for j in sets]
    kid_boot = mean_of([statistics.kid_resamples(gt_feats, copy[j], counts) for j in sets])
    cmmd_boot = mean_of([statistics.cmmd_resamples(gt_embeds, {v: embeds[v][j] for v in dataset.VARIANTS}, counts)
                         for j in sets])
    fid_boot = mean_of([statistics.fid_resamples(gt_feats, copy[j], fid_counts) for j in sets]) \
        if len(fid_counts) else None
    results, details, fid, kid, cmmd = {"n": n}, {"n": n}, {}, {}, {}
    for variant in dataset.VARIANTS:
        # FID at this n, without an interval: its bias at small n differs between variants, so an
        # interval around one variant's FID would cover "FID at this n", not FID.
        fids = [statistics.frechet_distance(gt_feats, f) for f in feats[variant]]
        kids = [statistics.kernel_distance(gt_feats, f, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
                for f in feats[variant]]
        cmmds = [statistics.cmmd(e, gt_embeds) for e in embeds[variant]]
        fid[variant], cmmd[variant] = float(np.mean(fids)), float(np.mean(cmmds))
        kid[variant] = {**kids[0], "kid": float(np.mean([k["kid"] for k in kids]))}  # subsets: copy 0's
        results[variant] = {**with_interval("fid", fid[variant], None, None),
                            **with_interval("kid", kid[variant]["kid"], *statistics.percentile_interval(kid_boot[variant])),
                            **with_interval("cmmd", cmmd[variant], *statistics.percentile_interval(cmmd_boot[variant]))}
        details[variant] = {"kid": {k: v for k, v in kid[variant].items() if k != "kid"}}
        if len(sets) > 1:  # seed variance of the set-level numbers: one value per copy's set
            details[variant]["per_seed_set"] = {"fid": fids, "kid": [k["kid"] for k in kids], "cmmd": cmmds}
    flips = statistics.sign_flips(n, cfg.permutations, cfg.seed) if cfg.permutations else None
    pairs = (gt_feats, feats["baseline"], feats["lora"], flips)
    fid_delta = fid["lora"] - fid["baseline"]
    results["lora_minus_baseline"] = {
        **with_interval("fid", fid_delta, *(statistics.centred_interval(fid_delta, fid_boot["lora"] - fid_boot["baseline"])
                                            if fid_boot else (None, None))),
        "fid_p_value": None if flips is None else statistics.fid_permutation_p(*pairs),
        **with_interval("kid", kid["lora"]["kid"] - kid["baseline"]["kid"],
                        *statistics.percentile_interval(kid_boot["lora"] - kid_boot["baseline"])),
        "kid_p_value": None if flips is None else statistics.kid_permutation_p(*pairs),
        **with_interval("cmmd", cmmd["lora"] - cmmd["baseline"],
                        *statistics.percentile_interval(cmmd_boot["lora"] - cmmd_boot["baseline"]))}
    return results, details, counts


def seed_variance(table: pd.DataFrame, spread: dict, details: dict, copies: int) -> dict:
    """How much of each score is the seed's: for a per-image score, the spread of a condition's
    images (pooled over conditions), the spread of the condition means, and the seed's share of one
    image's variance (seed / (seed + condition), the condition part being var(means) - seed/k);
    for FID, KID and CMMD, each copy's set and their spread."""
    out = {"images_per_condition": copies}
    for variant in dataset.VARIANTS:
        out[variant] = {name: {"per_seed_set": sets, "seed_sd": float(np.std(sets, ddof=1))}
                        for name, sets in details[variant]["per_seed_set"].items()}
        for (name, of), sd in spread.items():
            if of != variant or np.isnan(sd).all():
                continue
            seed = float(np.nanmean(sd ** 2))
            condition = max(float(np.nanvar(table[f"{name}_{variant}"], ddof=1)) - seed / copies, 0.0)
            out[variant][name] = {"seed_sd": seed ** 0.5, "condition_sd": condition ** 0.5,
                                  "seed_share": seed / (seed + condition) if seed + condition > 0 else None}
    return out

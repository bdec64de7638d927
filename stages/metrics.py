"""metrics: FID, KID, LPIPS and CLIP score of both generated sets against the eval ground truth.

    python -m stages.metrics

- FID / KID: clean-fid's "clean" resize and Inception features (loaded from models/eval, never
  downloaded), with our own Fréchet distance and seeded KID. clean-fid's versions call
  `sqrtm(disp=False)` (gone in SciPy 1.18) and draw KID subsets from the global, unseeded
  `np.random`. FID is biased at small n, so n is reported beside it; KID is unbiased.
- LPIPS (alex): each generated image against its own ground truth.
- CLIP score: per image max(cos, 0) of CLIP image and prompt embeddings, i.e. torchmetrics'
  definition / 100, the scale of the published 0.28-0.30 (`logits_per_image / 100`). Prompts
  are truncated to 77 tokens with EOS kept. Computed with transformers directly: torchmetrics'
  CLIPScore crashes on transformers 5 and its truncation drops EOS.
Writes metrics.json (the headline numbers: `dvc metrics show`), metrics_detail.json (n, 95% CIs,
KID's spread, the backbones) and a per-image table.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.io import atomic_file, check_images, load_rgb, read_json, write_json
from stages.common.models import load_clip, load_inception, load_lpips, require_file
from stages.common.params import load_params
from stages.common.runtime import device, peak_memory


def _factor(feats: np.ndarray) -> np.ndarray:
    """L with L @ L.T == cov(feats): the centred data when n <= d, else the covariance's square root."""
    centred = feats - feats.mean(axis=0)
    if len(feats) <= feats.shape[1]:
        return centred.T / np.sqrt(len(feats) - 1)
    values, vectors = np.linalg.eigh(np.cov(feats, rowvar=False))
    return vectors * np.sqrt(np.clip(values, 0, None))


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets. tr sqrt(S1 S2) is the nuclear norm of L1.T @ L2 for any
    factors S = L L.T: exact, symmetric, and no 2048x2048 sqrtm."""
    feats1, feats2 = feats1.astype(np.float64), feats2.astype(np.float64)
    diff = feats1.mean(axis=0) - feats2.mean(axis=0)
    l1, l2 = _factor(feats1), _factor(feats2)
    trace_sqrt = np.linalg.svd(l1.T @ l2, compute_uv=False).sum()
    trace1, trace2 = (l1 ** 2).sum(), (l2 ** 2).sum()
    return float(diff @ diff + trace1 + trace2 - 2 * trace_sqrt)


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, subsets: int, subset_size: int, seed: int):
    """KID (clean-fid's cubic-kernel MMD estimator) over seeded random subsets: (mean, std)."""
    rng = np.random.default_rng(seed)
    d = feats1.shape[1]
    m = min(len(feats1), len(feats2), subset_size)
    estimates = []
    for _ in range(subsets):
        x = feats2[rng.choice(len(feats2), m, replace=False)].astype(np.float64)
        y = feats1[rng.choice(len(feats1), m, replace=False)].astype(np.float64)
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        estimates.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    return float(np.mean(estimates)), float(np.std(estimates))


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


def summary(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.metrics, params.paths
    dev = device()
    configs = dataset.load_eval_configs(paths.eval_data)
    indices = [c["index"] for c in configs]
    prompts = [c["prompt"] for c in configs]
    gt_files = [dataset.gt_path(paths.eval_data, i) for i in indices]
    backbones = read_json(require_file(Path(paths.eval_models) / dataset.BACKBONES_FILE))
    table = pd.DataFrame({"index": indices, "product_id": [c["product_id"] for c in configs], "prompt": prompts})
    generated = {v: [dataset.generated_path(paths, v, i) for i in indices] for v in dataset.VARIANTS}
    check_images(gt_files, "extract")  # before any model loads
    for variant, files in generated.items():
        check_images(files, f"generate-{variant}")

    inception = load_inception(paths.eval_models, dev)
    lpips_model = load_lpips(paths.eval_models, dev)
    clip_model, clip_processor = load_clip(paths.eval_models, dev)
    gt_feats = inception_features(gt_files, inception, dev, cfg.batch_size)
    clip_gt = np.maximum(clip_cosines(clip_model, clip_processor, gt_files, prompts, dev, cfg.batch_size), 0)
    table["clip_ground_truth"] = clip_gt
    mean, ci = summary(clip_gt)
    # Headline numbers in metrics.json (what `dvc metrics diff` and `dvc exp show` print); n,
    # intervals, the ground truth's CLIP score and the backbones' names in metrics_detail.json.
    results, details = {"n": len(indices)}, {}
    for variant, files in tqdm(generated.items(), desc="metrics"):
        feats = inception_features(files, inception, dev, cfg.batch_size)
        kid, kid_std = kernel_distance(gt_feats, feats, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
        table[f"lpips_{variant}"] = lpips_scores(lpips_model, gt_files, files, dev, cfg.batch_size)
        cosines = clip_cosines(clip_model, clip_processor, files, prompts, dev, cfg.batch_size)
        table[f"clip_{variant}"] = np.maximum(cosines, 0)
        lpips_mean, lpips_ci = summary(table[f"lpips_{variant}"].to_numpy())
        clip_mean, clip_ci = summary(table[f"clip_{variant}"].to_numpy())
        results[variant] = {"fid": frechet_distance(gt_feats, feats), "kid": kid, "lpips": lpips_mean,
                            "clip_score": clip_mean}
        details[variant] = {"n": len(files), "kid_std": kid_std, "lpips_ci95": lpips_ci, "clip_score_ci95": clip_ci}
    details["ground_truth"] = {"n": len(gt_files), "clip_score": mean, "clip_score_ci95": ci}
    details["backbones"] = backbones

    with atomic_file(paths.per_sample) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    write_json(paths.metrics_detail, details)
    write_json(paths.metrics, results)
    log.info("metrics: n=%d; FID %.2f -> %.2f, LPIPS %.3f -> %.3f, CLIP %.4f -> %.4f (baseline -> lora)%s; wrote %s",
             len(indices), results["baseline"]["fid"], results["lora"]["fid"], results["baseline"]["lpips"],
             results["lora"]["lpips"], results["baseline"]["clip_score"], results["lora"]["clip_score"],
             peak_memory(dev), paths.metrics)


if __name__ == "__main__":
    run_cli(main)

"""Statistics behind every reported number: Student-t intervals for means, one seeded bootstrap
shared by FID, KID and every paired delta, and the FID and KID estimators themselves.

Baseline and LoRA images share ground truth, prompt and seed, so the bootstrap resamples *pairs*:
resample r draws eval indices once and every statistic (each variant's FID and KID, and LoRA minus
baseline) is computed on that same draw. A resample is a row of counts (how often each eval image
was drawn), which turns KID and every mean into matrix products.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
_TAILS = (100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2)


def t_interval(values) -> tuple[float, float, float]:
    """Mean and its Student-t 95% interval (low, high); NaN bounds below two samples."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def proportion_interval(hits) -> tuple[float, float, float]:
    """Share of true values and its Wilson score 95% interval: inside [0, 1] and sound at 0 of n
    or n of n, where a t interval on 0/1 data goes below 0 or collapses to a point."""
    hits = np.asarray(hits, dtype=np.float64)
    n, share = len(hits), float(hits.mean())
    z = stats.norm.ppf((1 + CONFIDENCE) / 2)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return share, float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int counts: row r says how often each of the n eval pairs is in resample r."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=resamples)


def percentile_interval(samples) -> tuple[float, float]:
    """The bootstrap distribution's central 95%, over the resamples where the statistic exists
    (KID needs two distinct images: at n = 4, one resample in 64 draws a single image 4 times)."""
    low, high = np.nanpercentile(np.asarray(samples, dtype=np.float64), _TAILS)
    return float(low), float(high)


def centred_interval(estimate: float, samples) -> tuple[float, float]:
    """The bootstrap's spread, centred on the estimate. For FID: a resample repeats images, so it
    has fewer distinct ones, and FID's small-n bias pushes every resampled value up (at 3000
    images in 2048 dimensions, each resampled covariance is rank-deficient). The percentile and
    basic intervals then miss the estimate itself; this keeps the spread and drops the shift.
    It is conservative: 1.5x (16-d, n = 60) to 3x (128-d, n = 190) the true sampling spread."""
    samples = np.asarray(samples, dtype=np.float64)
    low, high = percentile_interval(samples - np.nanmean(samples))
    return estimate + low, estimate + high


def paired_delta(baseline, lora, counts: np.ndarray, higher_is_better: bool) -> dict:
    """LoRA minus baseline over paired per-sample scores: mean difference, its bootstrap 95%
    interval over the shared resamples, and the shares of pairs where LoRA is strictly better and
    strictly worse (the rest are ties)."""
    diff = np.asarray(lora, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    means = counts @ diff / len(diff)
    better, worse = (diff > 0, diff < 0) if higher_is_better else (diff < 0, diff > 0)
    low, high = percentile_interval(means)
    return {"mean": float(diff.mean()), "ci95_low": low, "ci95_high": high, "lora_better": float(better.mean()),
            "lora_worse": float(worse.mean())}


# --- FID ---------------------------------------------------------------------------------------

def _factor(feats: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """L with L @ L.T == cov(feats) (rows repeated `weights` times): the weighted, centred rows
    when there are no more of them than dimensions, else the covariance's square root."""
    weights = np.ones(len(feats)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = weights > 0
    feats, weights = feats[keep], weights[keep]
    total = weights.sum()
    centred = feats - weights @ feats / total
    if len(feats) <= feats.shape[1]:
        return (centred * np.sqrt(weights / (total - 1))[:, None]).T
    values, vectors = np.linalg.eigh((centred.T * weights) @ centred / (total - 1))
    return vectors * np.sqrt(np.clip(values, 0, None))


def _nuclear_norm(product: np.ndarray, exact: bool) -> float:
    if exact:
        return float(np.linalg.svd(product, compute_uv=False).sum())
    # sqrt of the Gram's eigenvalues: a few times faster than an SVD, and its ~1e-8 relative
    # error is far below any bootstrap interval's width
    small = product @ product.T if product.shape[0] <= product.shape[1] else product.T @ product
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum())


def _frechet(mean1, l1, mean2, l2, exact: bool = True) -> float:
    diff = mean1 - mean2
    return float(diff @ diff + (l1 ** 2).sum() + (l2 ** 2).sum() - 2 * _nuclear_norm(l1.T @ l2, exact))


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets. tr sqrt(S1 S2) is the nuclear norm of L1.T @ L2 for any
    factors S = L L.T: exact, symmetric, and no 2048x2048 sqrtm."""
    feats1, feats2 = feats1.astype(np.float64), feats2.astype(np.float64)
    return _frechet(feats1.mean(axis=0), _factor(feats1), feats2.mean(axis=0), _factor(feats2))


def fid_resamples(gt: np.ndarray, generated: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each variant's FID on every resample of the pairs (rows of `counts`)."""
    gt = gt.astype(np.float64)
    generated = {k: v.astype(np.float64) for k, v in generated.items()}
    out = {k: np.empty(len(counts)) for k in generated}
    for r, weights in enumerate(counts):
        mean_gt, l_gt = weights @ gt / weights.sum(), _factor(gt, weights)
        for name, feats in generated.items():
            out[name][r] = _frechet(mean_gt, l_gt, weights @ feats / weights.sum(), _factor(feats, weights), exact=False)
    return out


# --- KID ---------------------------------------------------------------------------------------

def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """clean-fid's cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, between all rows."""
    return (a.astype(np.float64) @ b.astype(np.float64).T / a.shape[1] + 1) ** 3


def _mmd(k_xx, k_yy, k_xy) -> float:
    """Unbiased MMD^2 of m pairs (x_i, y_i): every sum skips i == j, the cross term's too (Gretton et
    al. 2012's MMD^2_u). A generated image and its own ground truth share edge map, prompt and
    seed, so k(x_i, y_i) runs high; clean-fid keeps it in the cross term, which is unbiased only for
    independent sets and lowers the KID of a variant the more it copies its ground truth."""
    m = len(k_xx)

    def pairs(k):
        return (k.sum() - np.trace(k)) / (m * (m - 1))

    return float(pairs(k_xx) + pairs(k_yy) - 2 * pairs(k_xy))


def kernel_distance(gt: np.ndarray, gen: np.ndarray, subsets: int, subset_size: int, seed: int) -> dict:
    """KID of paired sets (gen[i] made for gt[i]), clean-fid's kernel, over seeded random subsets of
    eval samples, each drawn once for both sides. When the subset size reaches the set size every
    subset is the whole set, so one is computed and no spread is reported (the std of identical
    subsets is float noise, not uncertainty)."""
    n = len(gt)
    assert len(gen) == n, "KID pairs generated image i with ground truth i"
    m = min(n, subset_size)
    k_gg, k_xx, k_xg = kernel(gt, gt), kernel(gen, gen), kernel(gen, gt)
    if m == n:
        return {"kid": _mmd(k_xx, k_gg, k_xg), "subset_size": m, "subsets": 1, "subset_std": None}
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        s = np.ix_(*[rng.choice(n, m, replace=False)] * 2)
        estimates.append(_mmd(k_xx[s], k_gg[s], k_xg[s]))
    return {"kid": float(np.mean(estimates)), "subset_size": m, "subsets": subsets,
            "subset_std": float(np.std(estimates))}


def kid_resamples(gt: np.ndarray, generated: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each variant's full-set KID on every resample of the pairs. A pair drawn twice is not a
    second sample: every term, the cross term too, skips pairs of copies of one eval sample, as the
    unbiased estimator skips i == j. So duplicates add no bias."""
    w = counts.astype(np.float64)
    pairs = w.sum(axis=1) ** 2 - (w ** 2).sum(axis=1)
    pairs[pairs == 0] = np.nan  # one distinct image: no within-set pair, no estimate

    def quadratic(k):  # w_r @ k @ w_r for every resample r, as one matrix product
        return ((w @ k) * w).sum(axis=1)

    def distinct(k):  # the mean of k over the draw's pairs of distinct eval samples
        return (quadratic(k) - (w ** 2) @ np.diag(k)) / pairs

    gt_term = distinct(kernel(gt, gt))
    return {name: distinct(kernel(feats, feats)) + gt_term - 2 * distinct(kernel(feats, gt))
            for name, feats in generated.items()}

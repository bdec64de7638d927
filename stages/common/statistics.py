"""Statistics behind every reported number: Student-t and Wilson intervals, one seeded bootstrap
shared by KID, CMMD, the FID delta and every paired delta, sign-flip permutation tests of the FID
and KID deltas, and the estimators themselves (FID, KID, CMMD, precision/recall/density/coverage).

Baseline and LoRA images share ground truth, prompt and seed, so the bootstrap resamples *pairs*:
resample r draws eval indices once and every statistic is computed on that same draw, and a
permutation swaps the two images of chosen pairs. A resample is a row of counts (how often each
eval image was drawn), which turns KID, CMMD and every mean into matrix products.
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


def mean_interval(values) -> dict:
    """{"mean", "ci95_low", "ci95_high"} of the values that exist (NaN marks a missing one), None
    where there are too few: a metrics file holds no NaN."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": None, "ci95_low": None, "ci95_high": None}
    mean, low, high = t_interval(values)
    return {"mean": mean, "ci95_low": None if np.isnan(low) else low, "ci95_high": None if np.isnan(high) else high}


def share_interval(hits) -> dict:
    """proportion_interval as {"mean", "ci95_low", "ci95_high"}."""
    return dict(zip(("mean", "ci95_low", "ci95_high"), proportion_interval(hits), strict=True))


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
    strictly worse (the rest are ties). `counts` may be the columns of a subset of the pairs (edge
    control has no chance level for a sample alone in its category): each resample's mean is then
    over the pairs it drew from that subset."""
    diff = np.asarray(lora, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    drawn = counts.sum(axis=1).astype(np.float64)
    drawn[drawn == 0] = np.nan  # a resample that drew none of the subset has no mean
    means = counts @ diff / drawn
    better, worse = (diff > 0, diff < 0) if higher_is_better else (diff < 0, diff > 0)
    low, high = percentile_interval(means)
    return {"mean": float(diff.mean()), "ci95_low": low, "ci95_high": high, "lora_better": float(better.mean()),
            "lora_worse": float(worse.mean())}


# --- FID ---------------------------------------------------------------------------------------

def _factor(feats: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """L with L @ L.T == cov(feats) (rows repeated `weights` times): the weighted, centred rows
    when there are no more of them than dimensions, else the covariance's Cholesky factor."""
    weights = np.ones(len(feats)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = weights > 0
    feats, weights = feats[keep], weights[keep]
    total = weights.sum()
    centred = feats - weights @ feats / total
    if len(feats) <= feats.shape[1]:
        return (centred * np.sqrt(weights / (total - 1))[:, None]).T
    cov = (centred.T * weights) @ centred / (total - 1)
    try:  # a Cholesky factor serves as well as the square root, at a fraction of an eigh's cost
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:  # singular (a constant feature): the eigendecomposition copes
        values, vectors = np.linalg.eigh(cov)
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


def _mmd_resamples(kernel_fn, gt: np.ndarray, generated: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Each variant's full-set unbiased MMD^2 under kernel_fn on every resample of the pairs."""
    w = counts.astype(np.float64)
    pairs = w.sum(axis=1) ** 2 - (w ** 2).sum(axis=1)
    pairs[pairs == 0] = np.nan  # one distinct image: no within-set pair, no estimate

    def quadratic(k):  # w_r @ k @ w_r for every resample r, as one matrix product
        return ((w @ k) * w).sum(axis=1)

    def distinct(k):  # the mean of k over the draw's pairs of distinct eval samples
        return (quadratic(k) - (w ** 2) @ np.diag(k)) / pairs

    gt_term = distinct(kernel_fn(gt, gt))
    return {name: distinct(kernel_fn(feats, feats)) + gt_term - 2 * distinct(kernel_fn(feats, gt))
            for name, feats in generated.items()}


def kid_resamples(gt: np.ndarray, generated: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each variant's full-set KID on every resample of the pairs. A pair drawn twice is not a
    second sample: every term, the cross term too, skips pairs of copies of one eval sample, as the
    unbiased estimator skips i == j. So duplicates add no bias."""
    return _mmd_resamples(kernel, gt, generated, counts)


# --- CMMD --------------------------------------------------------------------------------------

CMMD_SIGMA = 10  # google-research/cmmd's bandwidth, for unit-length CLIP embeddings
CMMD_SCALE = 1000  # theirs too: the paper's CMMD values are on this scale


def _unit_rows(embeds: np.ndarray) -> np.ndarray:
    embeds = embeds.astype(np.float64)
    return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|x - y|^2 between all rows in float64, as sklearn computes it (|a|^2 + |b|^2 - 2 a.b: one
    matrix product), clipped at 0 against rounding."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    squared = (a ** 2).sum(axis=1)[:, None] + (b ** 2).sum(axis=1)[None, :] - 2 * a @ b.T
    return np.clip(squared, 0, None, out=squared)


def _rbf(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Gaussian kernel exp(-|x - y|^2 / (2 sigma^2)) between all rows."""
    return np.exp(-_squared_distances(a, b) / (2 * CMMD_SIGMA ** 2))


def cmmd(generated: np.ndarray, reference: np.ndarray, unbiased: bool = True) -> float:
    """CMMD (Jayasumana et al., CVPR 2024): MMD^2 between CLIP image embeddings under a Gaussian
    kernel, the rows L2-normalised first as google-research/cmmd's embedding.py does, times 1000.
    unbiased=False is their distance.py's mmd: a V-statistic, whose means keep the diagonal
    k(x_i, x_i) = 1, the kernel's largest value, and so run high by a term of order 1/n. unbiased=True, what the project reports, is
    _mmd of pairs, skipping i == j in every term for the reason KID does: generated image i was
    made for reference image i."""
    x, y = _unit_rows(generated), _unit_rows(reference)
    k_xx, k_yy, k_xy = _rbf(x, x), _rbf(y, y), _rbf(x, y)
    if not unbiased:
        return float(CMMD_SCALE * (k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()))
    if len(x) != len(y):
        raise ValueError(f"unbiased CMMD pairs generated image i with reference image i: got {len(x)} generated "
                         f"and {len(y)} reference embeddings")
    return CMMD_SCALE * _mmd(k_xx, k_yy, k_xy)


def cmmd_resamples(gt: np.ndarray, generated: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each variant's unbiased CMMD on every resample of the pairs, duplicates counted as KID's are
    (kid_resamples)."""
    generated = {name: _unit_rows(embeds) for name, embeds in generated.items()}
    mmd = _mmd_resamples(_rbf, _unit_rows(gt), generated, counts)
    return {name: CMMD_SCALE * values for name, values in mmd.items()}


# --- PRDC --------------------------------------------------------------------------------------

def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between all rows."""
    return np.sqrt(_squared_distances(a, b))


def _neighbour_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest neighbour in its own set, itself left out."""
    distances = _distances(feats, feats)
    np.fill_diagonal(distances, np.inf)
    distances.partition(k - 1, axis=1)
    return distances[:, k - 1].copy()


def prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) of generated features (fake)
    against ground truth (real), as the prdc package's compute_prdc(real, fake, k) defines them: a
    sample's ball reaches its k-th nearest neighbour in its own set, and a point is inside a ball
    only strictly (<)."""
    for name, feats in (("ground-truth", real), ("generated", fake)):
        if len(feats) < k + 1:
            raise ValueError(f"PRDC with k = {k} needs at least k + 1 = {k + 1} samples per set, got {len(feats)} "
                             f"{name}: lower metrics.prdc_k")
    real_radii, fake_radii = _neighbour_radii(real, k), _neighbour_radii(fake, k)
    distances = _distances(real, fake)  # (real, fake)
    in_real_balls = distances < real_radii[:, None]
    return {"precision": float(in_real_balls.any(axis=0).mean()),
            "recall": float((distances < fake_radii[None, :]).any(axis=1).mean()),
            "density": float(in_real_balls.sum(axis=0).mean() / k),
            "coverage": float((distances.min(axis=1) < real_radii).mean())}


# --- Permutation tests of LoRA minus baseline ---------------------------------------------------

_TIE = 1e-10  # relative to the statistic's scale: closer than this to |T_obs| is float noise, a tie


def sign_flips(n: int, permutations: int, seed: int) -> np.ndarray:
    """(permutations, n) bool: True swaps pair i's baseline and LoRA images. Both were made for
    ground truth i with one prompt and seed, so under the null hypothesis (the LoRA changes
    nothing) either labelling of a pair is as likely as the other."""
    return np.random.default_rng(seed).integers(0, 2, size=(permutations, n), dtype=bool)


def _permutation_p(observed: float, permuted: np.ndarray, scale: float) -> float:
    """Two-sided p, the observed labelling counted among the permutations (so p >= 1 / (P + 1)).
    A permuted |T| within float noise of the observed one reaches it: identical sets give p = 1."""
    reached = np.abs(permuted) >= abs(observed) - _TIE * scale
    return float((1 + reached.sum()) / (1 + len(permuted)))


def _fid_differences(gt: np.ndarray, baseline: np.ndarray, lora: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """FID(gt, lora') - FID(gt, baseline') for every row of flips, the pairs it marks swapped.
    tr sqrt(S_gt S) is the sum of the square roots of the eigenvalues of W.T S W for any W with
    W W.T = S_gt, and only the swapped rows change the two sets: so each permutation updates sums
    precomputed in W's coordinates with one product over those rows, rather than computing and
    factoring two covariances. Every set is first centred on gt's mean (FID does not move), which
    keeps the uncentred sums exact."""
    centre = gt.astype(np.float64).mean(axis=0)
    gt, baseline, lora = (x.astype(np.float64) - centre for x in (gt, baseline, lora))
    n, w = len(gt), _factor(gt)
    z_base, z_lora = baseline @ w, lora @ w
    trace_gt = float((w ** 2).sum())

    def fid(total: np.ndarray, gram: np.ndarray, squares: float) -> float:
        """FID of a set from its rows' sum, the Gram of their projections and their squared norms."""
        mean, z_mean = total / n, total @ w / n
        projected = (gram - n * np.outer(z_mean, z_mean)) / (n - 1)
        trace = (squares - n * mean @ mean) / (n - 1)
        roots = np.sqrt(np.clip(np.linalg.eigvalsh(projected), 0, None)).sum()
        return float(mean @ mean + trace_gt + trace - 2 * roots)

    sums, grams = (baseline.sum(axis=0), lora.sum(axis=0)), (z_base.T @ z_base, z_lora.T @ z_lora)
    squares = ((baseline ** 2).sum(axis=1), (lora ** 2).sum(axis=1))
    out = np.empty(len(flips))
    for r, swap in enumerate(flips):
        half = (z_base[swap] - z_lora[swap]).T @ (z_base[swap] + z_lora[swap])
        gram = (half + half.T) / 2  # the swapped rows' z_b z_b.T - z_l z_l.T
        moved = baseline[swap].sum(axis=0) - lora[swap].sum(axis=0)
        squared = float(squares[0][swap].sum() - squares[1][swap].sum())
        out[r] = (fid(sums[1] + moved, grams[1] + gram, squares[1].sum() + squared)
                  - fid(sums[0] - moved, grams[0] - gram, squares[0].sum() - squared))
    return out


def copies(feats) -> np.ndarray:
    """(copies, n, d) from one (n, d) set of generated features or several: copy j holds image j of
    every condition (generate.images_per_condition)."""
    feats = np.asarray(feats)
    return feats[None] if feats.ndim == 2 else feats


def fid_permutation_p(gt: np.ndarray, baseline, lora, flips: np.ndarray) -> float:
    """Two-sided sign-flip permutation p of FID(gt, lora) - FID(gt, baseline), over the rows of
    flips (sign_flips). The observed difference is computed as the permuted ones are (exact=False),
    so ties are ties. Each permutation factors two covariances. With several images per condition
    (`copies`) the statistic is the mean over copies of their FID difference, and a flip swaps all
    of a condition's images: the condition is the pair."""
    rows = np.vstack([np.zeros(len(gt), bool), flips])
    baseline, lora = copies(baseline), copies(lora)
    differences = np.mean([_fid_differences(gt, b, l, rows) for b, l in zip(baseline, lora, strict=True)], axis=0)
    scale = sum(float(x.var(axis=0, ddof=1, dtype=np.float64).sum()) for x in (gt, baseline[0], lora[0]))  # tr cov
    return _permutation_p(differences[0], differences[1:], scale)


def _kid_pair_terms(gt: np.ndarray, baseline: np.ndarray, lora: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pair terms w with KID(gt, lora') - KID(gt, baseline') == u @ w / (n (n - 1)) for the
    signs u_i = -1 where pair i is swapped, +1 where not; and the kernel's scale (mean |k|).
    Every kernel term involves at most two pairs, so the difference is at most quadratic in u;
    swapping every pair swaps the two sets and negates it, so it is odd in u, and only the linear
    part is left. The diagonals (i == j) are left out, as _mmd leaves them out."""
    n = len(gt)
    sums, scale = {}, 0.0
    for name, (a, b) in {"bb": (baseline, baseline), "ll": (lora, lora), "bl": (baseline, lora),
                         "bg": (baseline, gt), "lg": (lora, gt)}.items():
        k = kernel(a, b)
        scale = max(scale, float(np.abs(k).mean()))
        np.fill_diagonal(k, 0)
        sums[name] = k.sum(axis=1), k.sum(axis=0)
    w = sums["ll"][0] - sums["bb"][0] + sums["bl"][1] - sums["bl"][0] + 2 * (sums["bg"][0] - sums["lg"][0])
    return w / (n * (n - 1)), scale


def kid_permutation_p(gt: np.ndarray, baseline, lora, flips: np.ndarray) -> float:
    """Two-sided sign-flip permutation p of KID(gt, lora) - KID(gt, baseline), full-set unbiased
    KID (kernel_distance at subset_size >= n; kid_resamples with all-ones counts), over the rows of
    flips (sign_flips). The difference is a sum of per-pair terms whose signs the swaps flip
    (_kid_pair_terms), so every permutation is one product with precomputed kernel sums. Several
    images per condition (`copies`): the mean over copies, which is linear in the same signs."""
    terms = [_kid_pair_terms(gt, b, l) for b, l in zip(copies(baseline), copies(lora), strict=True)]
    w, scale = np.mean([t[0] for t in terms], axis=0), max(t[1] for t in terms)
    return _permutation_p(w.sum(), (1 - 2 * flips.astype(np.float64)) @ w, scale)

"""statistics: closed-form checks of every interval, the bootstrap's coverage, and FID/KID on
resampled (weighted) pairs against the same sets written out with repeated rows."""

import numpy as np
import pytest
from cleanfid import fid as cleanfid
from scipy import linalg, stats

from stages.common import statistics


@pytest.mark.parametrize("n", [2, 5, 20, 200])
def test_t_interval_matches_scipy(n):
    values = np.random.default_rng(n).normal(3, 2, size=n)
    mean, low, high = statistics.t_interval(values)
    expected = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(expected, rel=1e-12)


def test_t_interval_is_wider_than_the_normal_one_at_small_n():
    values = np.random.default_rng(0).normal(size=20)
    mean, low, high = statistics.t_interval(values)
    normal_half = 1.96 * values.std(ddof=1) / np.sqrt(20)
    assert (high - mean) / normal_half == pytest.approx(2.093 / 1.96, rel=1e-3)  # the 6% of the issue


def test_one_sample_has_no_interval():
    mean, low, high = statistics.t_interval([0.5])
    assert mean == 0.5 and np.isnan(low) and np.isnan(high)


def test_resample_counts_are_seeded_resamples_of_n():
    counts = statistics.resample_counts(30, 50, seed=3)
    assert counts.shape == (50, 30) and (counts.sum(axis=1) == 30).all()
    assert (counts == statistics.resample_counts(30, 50, seed=3)).all()
    assert not (counts == statistics.resample_counts(30, 50, seed=4)).all()


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    """Seeded synthetic trials: skewed data (exponential, true mean 1), n = 40, 1000 resamples.
    The percentile interval of a mean is slightly narrow at small n; 0.90-0.98 is its known range."""
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for trial in range(trials):
        values = rng.exponential(1.0, size=40)
        counts = statistics.resample_counts(40, 1000, seed=trial)
        d = statistics.paired_delta(np.zeros(40), values, counts, higher_is_better=True)
        covered += d["ci95_low"] <= 1.0 <= d["ci95_high"]
    assert 0.90 <= covered / trials <= 0.98, covered / trials


def test_paired_delta_on_constructed_pairs():
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.3, 0.7, size=50)
    lora = baseline - 0.01 + rng.normal(0, 0.002, size=50)  # a small, consistent gain under a large spread
    lora[:5] = baseline[:5] + 0.001  # five pairs where LoRA is worse
    counts = statistics.resample_counts(50, 2000, seed=0)
    d = statistics.paired_delta(baseline, lora, counts, higher_is_better=False)
    assert d["mean"] == pytest.approx((lora - baseline).mean())
    assert d["ci95_low"] < d["mean"] < d["ci95_high"] < 0, "the paired interval excludes zero"
    assert d["lora_better"] == pytest.approx(45 / 50) and d["lora_worse"] == pytest.approx(5 / 50)
    # the separate per-variant intervals overlap: only the pairing shows the difference
    _, base_low, base_high = statistics.t_interval(baseline)
    _, lora_low, lora_high = statistics.t_interval(lora)
    assert lora_high > base_low
    assert statistics.paired_delta(baseline, lora, counts, higher_is_better=True)["lora_better"] == pytest.approx(5 / 50)
    same = statistics.paired_delta(baseline, baseline, counts, higher_is_better=False)
    assert same == {"mean": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "lora_better": 0.0, "lora_worse": 0.0}


def test_paired_delta_over_a_subset_of_the_pairs():
    """Edge control leaves out samples alone in their category: each resample's mean is then over
    the pairs it drew from the subset, the same as resampling the kept pairs' counts by hand."""
    rng = np.random.default_rng(2)
    baseline, lora = rng.uniform(size=30), rng.uniform(size=30)
    kept = np.arange(30) % 3 != 0
    counts = statistics.resample_counts(30, 500, seed=0)
    d = statistics.paired_delta(baseline[kept], lora[kept], counts[:, kept], higher_is_better=True)
    sub = counts[:, kept]
    expected = sub @ (lora - baseline)[kept] / sub.sum(axis=1)
    assert d["mean"] == pytest.approx((lora - baseline)[kept].mean())
    assert (d["ci95_low"], d["ci95_high"]) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])))
    # a resample that drew none of the subset has no mean, rather than a mean of 0
    none = statistics.paired_delta(baseline[:1], lora[:1], np.array([[0], [2], [1]]), higher_is_better=True)
    assert none["ci95_low"] == none["ci95_high"] == pytest.approx(lora[0] - baseline[0])


@pytest.mark.parametrize("n", [12, 80])  # fewer and more samples than dimensions
def test_frechet_distance_matches_clean_fid(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 32))
    b = rng.normal(0.3, 1.5, size=(n + 5, 32)) + a[:1]
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert statistics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert statistics.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


@pytest.mark.parametrize("n, d", [(30, 8), (10, 32)])  # resampled rows above and below the dimension
def test_fid_on_a_resample_equals_fid_of_the_repeated_rows(n, d):
    rng = np.random.default_rng(d)
    gt, gen = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d))
    counts = statistics.resample_counts(n, 4, seed=0)
    fids = statistics.fid_resamples(gt, {"x": gen}, counts)["x"]
    for weights, fid in zip(counts, fids, strict=True):
        rows = np.repeat(np.arange(n), weights)
        assert fid == pytest.approx(statistics.frechet_distance(gt[rows], gen[rows]), rel=1e-6)


def test_fid_interval_holds_the_estimate_and_covers_fid_at_this_n():
    """Resampling repeats images, which pushes FID up: the plain percentile interval misses the
    estimate itself. The centred one holds it, and covers FID's expected value at this n (its
    small-n bias is the warnings' business, not the interval's) in at least 90% of trials."""
    d, n, trials = 16, 60, 40
    rng = np.random.default_rng(1)
    draw = lambda: (rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d)))  # noqa: E731
    fid_at_n = np.mean([statistics.frechet_distance(*draw()) for _ in range(300)])
    covered = held = percentile_held = 0
    for trial in range(trials):
        gt, gen = draw()
        estimate = statistics.frechet_distance(gt, gen)
        boot = statistics.fid_resamples(gt, {"x": gen}, statistics.resample_counts(n, 200, trial))["x"]
        low, high = statistics.centred_interval(estimate, boot)
        covered += low <= fid_at_n <= high
        held += low <= estimate <= high
        low, high = statistics.percentile_interval(boot)
        percentile_held += low <= estimate <= high
    assert held == trials and covered / trials >= 0.9, (held, covered)
    assert percentile_held / trials <= 0.2, percentile_held


def unbiased_mmd_of_pairs(x, y):
    """Gretton et al. (2012), eq. 3, written out: MMD^2_u = mean over i != j of
    h(z_i, z_j) = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i), with clean-fid's kernel."""
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3
    m = len(x)
    return np.mean([k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
                    for i in range(m) for j in range(m) if i != j])


def test_kid_is_the_unbiased_mmd_of_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 64)), rng.normal(0.2, 1, size=(30, 64))
    kid = statistics.kernel_distance(a, b, subsets=3, subset_size=1000, seed=0)
    assert kid["kid"] == pytest.approx(unbiased_mmd_of_pairs(b, a), rel=1e-9)
    assert kid["subsets"] == 1 and kid["subset_size"] == 30 and kid["subset_std"] is None, "no float-noise std"


def test_kid_subsets_are_seeded_draws_of_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 16)), rng.normal(0.2, 1, size=(40, 16))
    kid = statistics.kernel_distance(a, b, subsets=10, subset_size=10, seed=1)
    assert kid == statistics.kernel_distance(a, b, subsets=10, subset_size=10, seed=1)
    assert kid["subsets"] == 10 and kid["subset_size"] == 10 and kid["subset_std"] > 0
    draw = np.random.default_rng(1)  # the same draws: one set of eval samples, both sides
    estimates = [unbiased_mmd_of_pairs(b[s], a[s]) for s in (draw.choice(40, 10, replace=False) for _ in range(10))]
    assert kid["kid"] == pytest.approx(np.mean(estimates), rel=1e-9)


def test_kid_agrees_with_clean_fid_on_independent_sets_and_is_unbiased_on_matched_ones():
    """On independent sets both estimators are unbiased, so they agree on average. When generated
    image i follows ground truth i (the same distributions, now paired), clean-fid's matched pairs
    pull its KID down; leaving them out keeps the independent sets' value."""
    rng = np.random.default_rng(4)
    n, d, trials = 30, 8, 300

    def generated(gt):  # N(0.2, 0.97) in every dimension, paired with `gt` or not
        return 0.9 * gt + rng.normal(0.2, 0.4, size=gt.shape)

    ours, theirs, ours_matched, theirs_matched = [], [], [], []
    for _ in range(trials):
        gt, other = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        independent, matched = generated(other), generated(gt)
        ours.append(statistics.kernel_distance(gt, independent, 1, n, 0)["kid"])
        theirs.append(cleanfid.kernel_distance(gt, independent, num_subsets=1))
        ours_matched.append(statistics.kernel_distance(gt, matched, 1, n, 0)["kid"])
        theirs_matched.append(cleanfid.kernel_distance(gt, matched, num_subsets=1))

    def error(*samples):  # of the difference of their means
        return np.sqrt(sum(np.var(x) for x in samples) / trials)

    assert abs(np.mean(ours) - np.mean(theirs)) < 3 * error(ours, theirs)
    assert abs(np.mean(ours_matched) - np.mean(ours)) < 3 * error(ours_matched, ours)
    assert np.mean(theirs_matched) < np.mean(ours) - 10 * error(theirs_matched, ours), \
        "the bias the matched pairs bring, which this estimator leaves out"


def kid_of_repeated_rows(gt, gen, weights):
    """KID of a resample by brute force: the repeated rows, no term pairing two copies of one eval
    sample (nor a generated image with its own ground truth)."""
    rows = np.repeat(np.arange(len(gt)), weights)
    k_gg, k_xx, k_xg = (statistics.kernel(u[rows], v[rows]) for u, v in ((gt, gt), (gen, gen), (gen, gt)))
    distinct = rows[:, None] != rows[None, :]
    return k_xx[distinct].mean() + k_gg[distinct].mean() - 2 * k_xg[distinct].mean()


def test_kid_resamples_count_each_image_once():
    rng = np.random.default_rng(2)
    n, d = 25, 8
    gt = rng.normal(size=(n, d))
    gen = 0.8 * gt + rng.normal(0.4, 0.6, size=(n, d))  # paired, as generated images are with their ground truth
    full = statistics.kernel_distance(gt, gen, 1, n, 0)["kid"]
    ones = np.ones((1, n), dtype=int)
    assert statistics.kid_resamples(gt, {"x": gen}, ones)["x"][0] == pytest.approx(full, rel=1e-9)
    for weights in statistics.resample_counts(n, 3, seed=5):
        assert statistics.kid_resamples(gt, {"x": gen}, weights[None])["x"][0] == pytest.approx(
            kid_of_repeated_rows(gt, gen, weights), rel=1e-9)


def test_kid_bootstrap_is_centred_on_the_estimate_for_correlated_pairs():
    """Counting a matched pair once per pair of its copies would pull every resample low, most
    where generated images follow their ground truth closely."""
    rng = np.random.default_rng(3)
    n, d = 40, 8
    held = 0
    for trial in range(20):
        gt = rng.normal(size=(n, d))
        gen = 0.9 * gt + rng.normal(0.2, 0.4, size=(n, d))
        full = statistics.kernel_distance(gt, gen, 1, n, 0)["kid"]
        boot = statistics.kid_resamples(gt, {"x": gen}, statistics.resample_counts(n, 1000, seed=trial))["x"]
        assert abs(boot.mean() - full) < 0.5 * boot.std()
        low, high = statistics.percentile_interval(boot)
        held += low <= full <= high
    assert held == 20


def test_proportion_interval_is_wilsons():
    """The textbook Wilson intervals (statsmodels' proportion_confint(method='wilson') gives them): 1 of 20,
    0 of 20 and 20 of 20 stay inside [0, 1] with a real width."""
    share, low, high = statistics.proportion_interval([1] + [0] * 19)
    assert share == 0.05 and low == pytest.approx(0.008881, abs=1e-6) and high == pytest.approx(0.236132, abs=1e-6)
    assert statistics.proportion_interval([0] * 20)[1:] == (0.0, pytest.approx(0.161125, abs=1e-6))
    assert statistics.proportion_interval([1] * 20)[1:] == (pytest.approx(0.838875, abs=1e-6), 1.0)


# --- CMMD ---

def google_cmmd(x, y):
    """google-research/cmmd's distance.py mmd, transcribed from JAX to numpy, on embeddings
    L2-normalised as their embedding.py leaves them."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    x_sqnorms, y_sqnorms = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * 10 ** 2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sqnorms[:, None] + x_sqnorms[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sqnorms[:, None] + y_sqnorms[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sqnorms[:, None] + y_sqnorms[None, :])))
    return 1000 * (k_xx + k_yy - 2 * k_xy)


def clip_like(n, seed, shift=0.0):
    """Embeddings of unequal lengths around a shared direction, as CLIP's are before normalising."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 16)) + 2 + shift) * rng.uniform(0.5, 20, size=(n, 1))


@pytest.mark.parametrize("m, dtype", [(30, np.float64), (45, np.float32)])
def test_cmmd_biased_is_google_research_cmmd(m, dtype):
    generated, reference = clip_like(30, 0, shift=0.5).astype(dtype), clip_like(m, 1).astype(dtype)
    expected = google_cmmd(reference.astype(np.float64), generated.astype(np.float64))
    assert expected > 0.05, "a distance well above float noise"
    assert statistics.cmmd(generated, reference, unbiased=False) == pytest.approx(expected, rel=1e-5)


def test_cmmd_unbiased_is_the_u_statistic_of_pairs():
    generated, reference = clip_like(25, 2, shift=0.5), clip_like(25, 3)
    x = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    y = reference / np.linalg.norm(reference, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-((a - b) ** 2).sum() / (2 * 10 ** 2))

    m = len(x)
    expected = 1000 * np.mean([k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
                               for i in range(m) for j in range(m) if i != j])
    assert statistics.cmmd(generated, reference) == pytest.approx(expected, rel=1e-9)
    assert statistics.cmmd(generated, reference, unbiased=False) > expected, "the V-statistic's diagonal"


def test_unbiased_cmmd_needs_pairs():
    with pytest.raises(ValueError, match="30 generated and 31 reference"):
        statistics.cmmd(clip_like(30, 0), clip_like(31, 1))


def test_cmmd_resamples_count_each_image_once():
    gt, gen = clip_like(20, 4), clip_like(20, 5, shift=0.3)
    ones = np.ones((1, 20), dtype=int)
    assert statistics.cmmd_resamples(gt, {"x": gen}, ones)["x"][0] == pytest.approx(statistics.cmmd(gen, gt), rel=1e-9)
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (gen, gt))

    def mean_k(a, b, rows):  # over pairs of distinct eval samples among the repeated rows
        k = np.exp(-((a[rows][:, None] - b[rows][None]) ** 2).sum(-1) / (2 * 10 ** 2))
        return k[rows[:, None] != rows[None, :]].mean()

    for weights in statistics.resample_counts(20, 3, seed=6):
        rows = np.repeat(np.arange(20), weights)
        expected = 1000 * (mean_k(x, x, rows) + mean_k(y, y, rows) - 2 * mean_k(x, y, rows))
        assert statistics.cmmd_resamples(gt, {"x": gen}, weights[None])["x"][0] == pytest.approx(expected, rel=1e-9)


# --- PRDC ---

def reference_prdc(real, fake, k):
    from prdc import compute_prdc  # prints the set sizes, which pytest captures
    return compute_prdc(real_features=real, fake_features=fake, nearest_k=k)


@pytest.mark.parametrize("seed, n_real, n_fake, k", [(0, 40, 40, 1), (1, 50, 35, 3), (2, 30, 60, 5), (3, 64, 64, 10)])
def test_prdc_matches_the_prdc_package(seed, n_real, n_fake, k):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, 12))
    fake = rng.normal(0.4, 1.3, size=(n_fake, 12)).astype(np.float32)  # one float32 set: computed in float64
    expected = reference_prdc(real, fake.astype(np.float64), k)
    got = statistics.prdc(real, fake, k)
    assert got.keys() == expected.keys()
    assert got == pytest.approx({key: float(v) for key, v in expected.items()}, abs=1e-5)
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1, "values where an off-by-one would show"


def test_prdc_ties_and_duplicates_match_the_prdc_package():
    """Integer points on a small grid: duplicates, and distances equal to a radius exactly, where
    only a strict < and leaving exactly one self out agree with the package."""
    rng = np.random.default_rng(4)
    real, fake = rng.integers(0, 3, size=(40, 3)).astype(float), rng.integers(0, 4, size=(30, 3)).astype(float)
    for k in (1, 2, 4):
        expected = reference_prdc(real, fake, k)
        assert statistics.prdc(real, fake, k) == pytest.approx({key: float(v) for key, v in expected.items()}, abs=1e-5)


@pytest.mark.parametrize("n_real, n_fake", [(5, 40), (40, 5)])
def test_prdc_needs_more_samples_than_k(n_real, n_fake):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"k = 5 .* got 5 .*lower metrics.prdc_k"):
        statistics.prdc(rng.normal(size=(n_real, 4)), rng.normal(size=(n_fake, 4)), 5)
    assert statistics.prdc(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), 5)["coverage"] <= 1


# --- permutation tests of LoRA minus baseline ---

def swapped(baseline, lora, flip):
    """The two sets after swapping the pairs flip marks: (baseline', lora')."""
    rows = np.asarray(flip, dtype=bool)[:, None]
    return np.where(rows, lora, baseline), np.where(rows, baseline, lora)


def paired_sets(seed, n=40, d=8, shift=0.0):
    """Ground truth and two variants made for it, the LoRA's moved by `shift` in every dimension."""
    rng = np.random.default_rng(seed)
    gt = rng.normal(size=(n, d))
    baseline = 0.8 * gt + rng.normal(0.2, 0.6, size=(n, d))
    lora = 0.8 * gt + rng.normal(0.2 + shift, 0.6, size=(n, d))
    return gt, baseline, lora


def test_sign_flips_are_seeded_coin_flips():
    flips = statistics.sign_flips(50, 200, seed=3)
    assert flips.shape == (200, 50) and flips.dtype == bool
    assert (flips == statistics.sign_flips(50, 200, seed=3)).all()
    assert not (flips == statistics.sign_flips(50, 200, seed=4)).all()
    assert flips.mean() == pytest.approx(0.5, abs=0.02)


def test_kid_permutation_statistic_is_the_kid_difference_of_the_swapped_sets():
    gt, baseline, lora = paired_sets(0, shift=0.3)
    w, _ = statistics._kid_pair_terms(gt, baseline, lora)

    def kid(x):
        return statistics._mmd(statistics.kernel(x, x), statistics.kernel(gt, gt), statistics.kernel(x, gt))

    flips = np.vstack([np.zeros(40, bool), np.ones(40, bool), statistics.sign_flips(40, 3, seed=0)])
    for flip in flips:
        base, lo = swapped(baseline, lora, flip)
        assert (1 - 2 * flip) @ w == pytest.approx(kid(lo) - kid(base), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n, d, constant", [(40, 8, False), (12, 16, False), (40, 8, True)])
def test_fid_permutation_statistic_is_the_fid_difference_of_the_swapped_sets(n, d, constant):
    """More rows than dimensions (Cholesky factors), fewer (centred rows), and a constant feature
    (a singular covariance: the eigendecomposition takes over)."""
    gt, baseline, lora = paired_sets(1, n, d, shift=0.3)
    if constant:
        gt[:, 0] = baseline[:, 0] = lora[:, 0] = 1.0
    flips = np.vstack([np.zeros(n, bool), statistics.sign_flips(n, 3, seed=1)])
    differences = statistics._fid_differences(gt, baseline, lora, flips)
    for flip, difference in zip(flips, differences, strict=True):
        base, lo = swapped(baseline, lora, flip)
        expected = statistics.frechet_distance(gt, lo) - statistics.frechet_distance(gt, base)
        assert difference == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("test", [statistics.fid_permutation_p, statistics.kid_permutation_p])
def test_identical_variants_give_p_one(test):
    gt, baseline, _ = paired_sets(2)
    assert test(gt, baseline, baseline.copy(), statistics.sign_flips(40, 99, seed=0)) == 1.0


@pytest.mark.parametrize("test", [statistics.fid_permutation_p, statistics.kid_permutation_p])
def test_a_clear_shift_gives_the_smallest_p_either_way(test):
    """Two-sided: a LoRA clearly worse and a LoRA clearly better are both significant."""
    gt, baseline, lora = paired_sets(3, shift=1.0)
    flips = statistics.sign_flips(40, 99, seed=0)
    assert test(gt, baseline, lora, flips) == test(gt, lora, baseline, flips) == 1 / 100


@pytest.mark.parametrize("test", [statistics.fid_permutation_p, statistics.kid_permutation_p])
def test_p_is_not_small_under_the_null(test):
    """Baseline and LoRA from one distribution: p spreads over (0, 1], p < 0.05 about 1 in 20."""
    ps = np.array([test(*paired_sets(seed), statistics.sign_flips(40, 99, seed=seed)) for seed in range(20)])
    assert (ps < 0.05).sum() <= 3 and 0.3 < ps.mean() < 0.7, ps


@pytest.mark.parametrize("name", ["fid", "kid"])
def test_several_images_per_condition_permute_as_one_pair(name):
    """With two images per condition, the p-value is that of the mean over copies of each copy's
    difference, a flip swapping both copies of a condition: checked by brute force against the
    swapped sets' own FID / KID. Two identical copies give the single set's p."""
    gt, base0, lora0 = paired_sets(4, shift=0.05)
    _, base1, lora1 = paired_sets(5, shift=0.05)
    flips = statistics.sign_flips(40, 49, seed=2)
    test = getattr(statistics, f"{name}_permutation_p")

    def distance(x):
        if name == "fid":
            return statistics.frechet_distance(gt, x)
        return statistics._mmd(statistics.kernel(x, x), statistics.kernel(gt, gt), statistics.kernel(x, gt))

    def statistic(flip):
        return np.mean([distance(lo) - distance(base) for base, lo in
                        (swapped(b, l, flip) for b, l in ((base0, lora0), (base1, lora1)))])

    observed = statistic(np.zeros(40, bool))
    permuted = np.array([statistic(flip) for flip in flips])
    expected = (1 + (np.abs(permuted) >= abs(observed) - 1e-9).sum()) / (1 + len(flips))
    assert test(gt, np.stack([base0, base1]), np.stack([lora0, lora1]), flips) == pytest.approx(expected)
    assert 1 / 50 < expected < 0.9, "a p-value between the extremes, so the check can tell"
    assert test(gt, np.stack([base0, base0]), np.stack([lora0, lora0]), flips) == test(gt, base0, lora0, flips)

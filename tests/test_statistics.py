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

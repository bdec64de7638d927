"""Per-sample similarity of a generated image to its ground truth, as try-on papers report it:
SSIM and PSNR of uint8 RGB pairs, equal to scikit-image's values (tests/test_similarity.py checks
them against it), without depending on scikit-image at run time.
"""

from __future__ import annotations

import cv2
import numpy as np

from stages.common.io import load_rgb

DATA_RANGE = 255.0
PSNR_MAX = 100.0
"""PSNR of identical images, which is infinite: every mean and interval over the samples must stay
finite, and 100 dB is far above any generated image (one grey level off in every pixel is 48 dB).
Near-identical pairs are capped here too, so no pair scores above an identical one."""

# Wang et al. (2004): an 11-tap Gaussian window of sigma 1.5 (scipy's truncate of 3.5, as
# scikit-image uses), and the constants that keep flat regions' ratios finite
_SIGMA, _RADIUS = 1.5, 5
_C1, _C2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
_WINDOW = np.exp(-0.5 * (np.arange(-_RADIUS, _RADIUS + 1) / _SIGMA) ** 2)
_WINDOW /= _WINDOW.sum()


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of different shapes: {a.shape} and {b.shape}")
    return a, b


def _blur_in_place(planes: np.ndarray) -> None:
    """Each (H, W) plane becomes its Gaussian-weighted local mean. cv2's separable filter is
    faster than scipy.ndimage's, and in place it allocates nothing.
    The border mode is scikit-image's (abc|cba) but never counts: ssim crops every pixel whose
    window reaches past the edge."""
    for plane in planes:
        cv2.sepFilter2D(plane, cv2.CV_64F, _WINDOW, _WINDOW, dst=plane, borderType=cv2.BORDER_REFLECT)


def ssim(a, b) -> float:
    """Mean SSIM of two (H, W, 3) images, averaged over channels: scikit-image's
    structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False). Like it, the mean leaves out a window radius (5 pixels) at every
    edge, where the window would reach past the image."""
    a, b = _pair(a, b)
    if min(a.shape[:2]) <= 2 * _RADIUS:
        raise ValueError(f"SSIM needs images of at least {2 * _RADIUS + 1}x{2 * _RADIUS + 1} pixels, got {a.shape}")
    # channels first: contiguous planes make numpy's arithmetic below much faster.
    # a^2 + b^2 is one plane: the filter is linear and only the sum of the variances is needed.
    planes = np.empty((4, a.shape[2], *a.shape[:2]))
    planes[0], planes[1] = np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0)
    np.multiply(planes[0], planes[1], out=planes[3])
    planes[2] = planes[0] ** 2 + planes[1] ** 2
    _blur_in_place(planes.reshape(-1, *a.shape[:2]))
    mu_a, mu_b, squares, product = planes[..., _RADIUS:-_RADIUS, _RADIUS:-_RADIUS]
    # the planes are spent: the moments overwrite them rather than allocate fresh arrays
    mu_ab = mu_a * mu_b
    mu_sq = np.add(np.square(mu_a, out=mu_a), np.square(mu_b, out=mu_b), out=mu_a)
    variances = np.subtract(squares, mu_sq, out=squares)  # var_a + var_b
    covariance = np.subtract(product, mu_ab, out=product)
    index = (2 * mu_ab + _C1) * (2 * covariance + _C2)
    index /= (mu_sq + _C1) * (variances + _C2)
    # equal to scikit-image's mean of per-channel means: every channel has as many pixels
    return float(index.mean())


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for data range 255, as scikit-image's
    peak_signal_noise_ratio(a, b, data_range=255), but at most PSNR_MAX (see there)."""
    a, b = _pair(a, b)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    if mse == 0:
        return PSNR_MAX
    return float(min(10 * np.log10(DATA_RANGE ** 2 / mse), PSNR_MAX))


def pair_scores(gt_files, files) -> np.ndarray:
    """(n, 2): SSIM and PSNR of each image file against its ground truth's, one pair in memory."""
    return np.array([(ssim(gt, made), psnr(gt, made)) for gt, made in
                     ((load_rgb(g), load_rgb(f)) for g, f in zip(gt_files, files, strict=True))])

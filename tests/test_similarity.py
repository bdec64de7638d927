"""similarity: SSIM and PSNR against scikit-image's, the reference implementation, on noise, smooth
images, identical ones, a photograph and its degraded copy, and sizes that are not square."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from stages.common import similarity


def reference_ssim(a, b):
    return structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def noise(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def smooth(shape, seed):
    """Blurred noise stretched to the full range: large flat-ish regions, where C1 and C2 matter."""
    blurred = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma=(6, 6, 0))
    return np.clip(128 + 127 * blurred / np.abs(blurred).max(), 0, 255).astype(np.uint8)


def degraded(image, seed):
    """A generated-looking copy: shifted two pixels, blurred, a colour cast and some noise."""
    shifted = np.roll(image.astype(np.float64), (2, -1), axis=(0, 1))
    blurred = ndimage.gaussian_filter(shifted, sigma=(1, 1, 0)) * [1.05, 0.97, 0.9]
    noisy = blurred + np.random.default_rng(seed).normal(0, 6, size=image.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


PAIRS = {
    "noise 512x512": lambda: (noise((512, 512, 3), 0), noise((512, 512, 3), 1)),
    "noise 64x48": lambda: (noise((64, 48, 3), 2), noise((64, 48, 3), 3)),
    "smallest, 11x13": lambda: (noise((11, 13, 3), 4), noise((11, 13, 3), 5)),
    "smooth 96x80": lambda: (smooth((96, 80, 3), 6), smooth((96, 80, 3), 7)),
    "smooth and its noisy copy": lambda: (smooth((64, 48, 3), 8), degraded(smooth((64, 48, 3), 8), 9)),
    "photo and its degraded copy": lambda: (data.chelsea(), degraded(data.chelsea(), 10)),
    "photo and another photo": lambda: (data.astronaut()[:300, :451], data.chelsea()),
}


@pytest.mark.parametrize("name", PAIRS)
def test_ssim_and_psnr_match_scikit_image(name):
    a, b = PAIRS[name]()
    assert similarity.ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-5)
    assert similarity.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-5)


def test_the_pairs_span_the_range():
    """Not only noise near 0: the comparisons above hold for SSIM from about 0 to near 1."""
    values = [reference_ssim(*make()) for make in PAIRS.values()]
    assert min(values) < 0.02 and max(values) > 0.7, values


def test_identical_images():
    image = data.chelsea()
    assert similarity.ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    with np.errstate(divide="ignore"):
        assert peak_signal_noise_ratio(image, image, data_range=255) == np.inf
    assert similarity.psnr(image, image) == similarity.PSNR_MAX


def test_psnr_stays_at_most_that_of_identical_images():
    """One grey level off in one pixel of 512x512 is 107 dB: capped, it does not outrank a copy."""
    a = noise((512, 512, 3), 11)
    b = a.copy()
    b[0, 0, 0] ^= 1
    assert peak_signal_noise_ratio(a, b, data_range=255) > similarity.PSNR_MAX
    assert similarity.psnr(a, b) == similarity.PSNR_MAX


def test_one_grey_level_everywhere_is_48_db():
    a = noise((32, 32, 3), 12) // 2
    assert similarity.psnr(a, a + 1) == pytest.approx(10 * np.log10(255 ** 2), abs=1e-12)


@pytest.mark.parametrize("metric", [similarity.ssim, similarity.psnr])
def test_different_shapes_are_refused_naming_both(metric):
    with pytest.raises(ValueError, match=r"\(64, 48, 3\) and \(48, 64, 3\)"):
        metric(noise((64, 48, 3), 0), noise((48, 64, 3), 1))


def test_images_smaller_than_the_window_are_refused():
    with pytest.raises(ValueError, match="at least 11x11"):
        similarity.ssim(noise((10, 40, 3), 0), noise((10, 40, 3), 1))

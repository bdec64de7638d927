"""edges: edge fidelity's precision, recall and F1 on constructed maps."""

import numpy as np
import pytest

from stages.common.edges import canny, edge_fidelity


def square(size=32, at=8, side=12) -> np.ndarray:
    """The outline of a square, one pixel wide, as 0/255."""
    edges = np.zeros((size, size), np.uint8)
    edges[at, at:at + side] = edges[at + side - 1, at:at + side] = 255
    edges[at:at + side, at] = edges[at:at + side, at + side - 1] = 255
    return edges


def test_identical_maps_score_one():
    assert edge_fidelity(square(), square(), tolerance=0) == (1.0, 1.0, 1.0)


def test_disjoint_maps_score_zero():
    far = np.zeros((32, 32), np.uint8)
    far[30, 0:5] = 255  # more than 2 px from every edge of the square
    assert edge_fidelity(far, square(), tolerance=2) == (0.0, 0.0, 0.0)


def test_a_one_pixel_shift_is_kept_within_tolerance_and_lost_without():
    shifted = np.roll(square(), 1, axis=1)
    assert edge_fidelity(shifted, square(), tolerance=2) == (1.0, 1.0, 1.0)
    precision, recall, f1 = edge_fidelity(shifted, square(), tolerance=0)
    assert 0 < f1 < 1 and 0 < precision < 1 and 0 < recall < 1
    assert edge_fidelity(shifted, square(), tolerance=1)[2] == 1.0  # exactly one pixel away counts at 1


def test_precision_and_recall_are_the_two_directions():
    extra = square()
    extra[14, 12:16] = 255  # 4 generated pixels inside the square, 4+ px from its edges
    precision, recall, f1 = edge_fidelity(extra, square(), tolerance=1)
    assert recall == 1.0
    assert precision == pytest.approx(((square() > 0).sum()) / (extra > 0).sum())
    assert f1 == pytest.approx(2 * precision * recall / (precision + recall))


def test_empty_maps():
    empty = np.zeros((16, 16), np.uint8)
    assert edge_fidelity(empty, empty, 2) == (1.0, 1.0, 1.0)
    assert edge_fidelity(empty, square(16, 2, 8), 2) == (0.0, 0.0, 0.0)
    assert edge_fidelity(square(16, 2, 8), empty, 2) == (0.0, 0.0, 0.0)


def test_three_channel_maps_and_canny_round_trip():
    image = np.full((32, 32, 3), 255, np.uint8)
    image[8:20, 8:20] = (200, 30, 30)
    edges = canny(image, 100, 200)
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edge_fidelity(canny(image, 100, 200), edges, tolerance=0) == (1.0, 1.0, 1.0)

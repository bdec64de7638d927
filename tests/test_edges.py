"""edges: edge fidelity on constructed maps, and the same-category maps behind its chance level."""

import numpy as np
import pytest

from stages.common.edge_scores import edge_map, fidelity, same_category_maps
from stages.common.edges import canny


def edge_fidelity(generated, reference, tolerance):
    return fidelity(edge_map(generated, tolerance), edge_map(reference, tolerance))


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


def test_same_category_maps_are_other_samples_of_the_category():
    categories = ["TOPS", "PANTS", "TOPS", "", "TOPS", "SKIRTS", "TOPS", "PANTS", ""]
    chosen = same_category_maps(categories, maps=2, seed=0)
    for i, maps in enumerate(chosen):
        assert i not in maps and all(categories[j] == categories[i] for j in maps), (i, maps)
    assert [len(m) for m in chosen] == [2, 1, 2, 0, 2, 0, 2, 1, 0], "all when fewer; none alone or without one"
    assert [m.tolist() for m in chosen] == [m.tolist() for m in same_category_maps(categories, 2, seed=0)]
    draws = {tuple(same_category_maps(categories, 2, seed=s)[0]) for s in range(20)}
    assert len(draws) == 3, "a seeded choice among TOPS 2, 4 and 6"


def test_an_image_that_ignores_its_map_scores_the_chance_level():
    """Sample 0's map and another of its category: edge control (own minus same-category F1) is
    high for an image that follows its own map, and below zero for one drawn from the other."""
    own_map, other_map = edge_map(square(48, 8, 20), 1), edge_map(square(48, 14, 20), 1)

    def control(made):
        return fidelity(made, own_map)[2] - fidelity(made, other_map)[2]

    assert control(own_map) > 0.8 and control(other_map) < -0.8
    with pytest.raises(ValueError, match="2304 and 1024 pixels"):
        fidelity(own_map, edge_map(square(), 1))

"""Canny edge maps: the ControlNet's condition (canny-edges) and the controllability score
(metrics: does the generated image keep the edges it was given?)."""

from __future__ import annotations

import cv2
import numpy as np


def canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """`cv2.Canny(rgb, low, high)` stacked to 3 channels, exactly as the seed recipe fed its
    canny ControlNet."""
    edges = cv2.Canny(image, low, high)
    return np.stack([edges] * 3, axis=-1)


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels from every pixel to the nearest edge pixel of `edges`."""
    if not edges.any():
        return np.full(edges.shape, np.inf)
    # distanceTransform measures the distance to the nearest zero, so edges become the zeros
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def edge_fidelity(generated: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[float, float, float]:
    """Precision, recall and F1 of `generated` edges against `reference` edges (boolean or 0/255
    maps, either 2-D or 3-channel), an edge pixel counting as matched when the other map has one
    within `tolerance` pixels (Euclidean). Two empty maps agree perfectly; an empty map against a
    non-empty one scores 0."""
    generated, reference = (np.asarray(m)[..., 0] if np.ndim(m) == 3 else np.asarray(m) for m in (generated, reference))
    generated, reference = generated > 0, reference > 0
    if not generated.any() and not reference.any():
        return 1.0, 1.0, 1.0
    precision = float((_distance_to(reference)[generated] <= tolerance).mean()) if generated.any() else 0.0
    recall = float((_distance_to(generated)[reference] <= tolerance).mean()) if reference.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1

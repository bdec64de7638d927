"""Controllability: does a generated image keep the edges it was given, and more of them than of
another garment of its category? Precision, recall and F1 of canny edges within a tolerance, and
the same-category maps that set each image's chance level (metrics)."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from stages.common.edges import canny
from stages.common.io import load_rgb

# What score_images gives for each image, in its order.
SCORES = ("edge_precision", "edge_recall", "edge_f1", "edge_f1_mismatched", "edge_f1_same_category")


class EdgeMap(NamedTuple):
    """An edge map ready to be scored against many others: one distance transform, kept small
    (the metrics stage holds every eval map at once)."""
    pixels: np.ndarray  # flat indices of the edge pixels
    near: np.ndarray  # packed bits: the pixels within the tolerance of an edge pixel
    size: int  # pixels in the map


def edge_map(edges: np.ndarray, tolerance: float) -> EdgeMap:
    """`edges` (boolean or 0/255, 2-D or 3-channel) with the pixels within `tolerance` pixels
    (Euclidean) of one of its edge pixels."""
    edges = (np.asarray(edges)[..., 0] if np.ndim(edges) == 3 else np.asarray(edges)) > 0
    if edges.any():
        # distanceTransform measures the distance to the nearest zero, so edges become the zeros
        near = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= tolerance
    else:
        near = np.zeros(edges.shape, bool)
    return EdgeMap(np.flatnonzero(edges), np.packbits(near), edges.size)


def fidelity(generated: EdgeMap, reference: EdgeMap) -> tuple[float, float, float]:
    """Precision, recall and F1 of `generated` edges against `reference` edges: an edge pixel counts
    as matched when the other map has one within the tolerance. Two empty maps agree perfectly; an
    empty map against a non-empty one scores 0."""
    if generated.size != reference.size:
        raise ValueError(f"edge maps of {generated.size} and {reference.size} pixels cannot be compared")
    if not len(generated.pixels) and not len(reference.pixels):
        return 1.0, 1.0, 1.0

    def matched(edges: EdgeMap, other: EdgeMap) -> float:
        if not len(edges.pixels):
            return 0.0
        return float(np.unpackbits(other.near, count=other.size)[edges.pixels].mean())

    precision, recall = matched(generated, reference), matched(reference, generated)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def same_category_maps(categories: list[str], maps: int, seed: int) -> list[np.ndarray]:
    """For each eval sample, up to `maps` other samples of its category (a seeded choice; all of
    them when there are fewer): the maps whose score is the chance level of an image that draws
    the right kind of garment but ignores its own map. A sample without a category, or alone in
    its category, gets none."""
    rng = np.random.default_rng(seed)
    categories = np.asarray(categories, dtype=object)
    chosen = []
    for i, category in enumerate(categories):
        others = np.flatnonzero(categories == category) if category else np.array([], int)
        others = others[others != i]
        chosen.append(np.sort(rng.choice(others, min(maps, len(others)), replace=False)) if len(others) else others)
    return chosen


def score_images(files, maps: list[EdgeMap], chance_maps: list[np.ndarray], canny_cfg, tolerance: float) -> dict:
    """SCORES of each image's canny edges (canny-edges' thresholds): precision, recall and F1
    against its own map, F1 against the next sample's map, and the mean F1 over its
    `chance_maps` (NaN without any)."""
    rows = []
    for i, file in enumerate(files):
        made = edge_map(canny(load_rgb(file), canny_cfg.low_threshold, canny_cfg.high_threshold), tolerance)
        chance = [fidelity(made, maps[j])[2] for j in chance_maps[i]]
        rows.append((*fidelity(made, maps[i]), fidelity(made, maps[(i + 1) % len(maps)])[2],
                     np.mean(chance) if chance else np.nan))
    return dict(zip(SCORES, np.array(rows).T, strict=True))

"""Canny edge maps: the ControlNet's condition (canny-edges, training, the demo kit's pretraining)
and what metrics scores generated images with. Scoring lives in edge_scores.py: this module is
a dep of the demo kit's weights, so it holds only what they were made with."""

from __future__ import annotations

import cv2
import numpy as np


def canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """`cv2.Canny(rgb, low, high)` stacked to 3 channels, exactly as the seed recipe fed its
    canny ControlNet."""
    edges = cv2.Canny(image, low, high)
    return np.stack([edges] * 3, axis=-1)

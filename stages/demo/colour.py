"""Prompt adherence the demo can check: is the garment the colour its prompt names?

The demo's garments are drawn in one of garments.COLOURS (with an accent for stripes,
checks and dots), and each prompt names it ("Mini skirt in navy with white stripes"). Inside the
garment (its region in the ground truth, which the eval edge map outlines: the same region for
baseline and LoRA), each pixel takes the nearest palette colour; the score is the share of
pixels that take the prompt's colour. Ground truth scores high (a half-striped garment about 0.5); an image of
another colour scores near 0. Real FashionGen prompts name colours outside this palette, so
metrics reports it only when every eval prompt names a palette colour: on the demo.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

from stages.demo.garments import COLOURS

# Accents can be white; the page is white too, but it lies outside the outline.
PALETTE = {**COLOURS, "white": (245, 245, 245)}
MATCH = 0.25  # share of the garment in the named colour that counts as following the prompt


def named_colour(prompt: str) -> str | None:
    """The garment's colour in a demo prompt: the palette word after ' in '."""
    found = re.search(r"\bin (\w+)", prompt.lower())
    return found.group(1) if found and found.group(1) in COLOURS else None


def garment_mask(ground_truth: np.ndarray) -> np.ndarray:
    """Where the garment is: the ground truth's pixels off the white page, holes filled (white
    dots and stripes are garment too), less a pixel all round (the darker outline stroke). The
    region the eval edge map outlines, without the edge map's inner lines, which cut a checked
    garment into cells."""
    garment = (np.abs(ground_truth.astype(np.int16) - 255).max(axis=-1) > 12).astype(np.uint8)
    outside = np.pad(garment, 1)
    cv2.floodFill(outside, None, (0, 0), 2)
    filled = (outside[1:-1, 1:-1] != 2).astype(np.uint8)
    return cv2.erode(filled, np.ones((3, 3), np.uint8)) > 0


def colour_share(image: np.ndarray, mask: np.ndarray, colour: str) -> float:
    """Share of the pixels under `mask` whose nearest palette colour is `colour` (0 for an empty mask)."""
    if not mask.any():
        return 0.0
    names = list(PALETTE)
    palette = np.array([PALETTE[name] for name in names], np.float32)
    pixels = image[mask].astype(np.float32)
    nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    return float((nearest == names.index(colour)).mean())

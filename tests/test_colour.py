"""The demo's prompt-colour check: right on drawn garments, blind to other colours."""

import numpy as np

from stages.demo import colour, garments
from stages.extract import to_resolution


def test_the_colour_named_in_a_demo_prompt():
    assert colour.named_colour("Mini skirt in navy with white stripes") == "navy"
    assert colour.named_colour("Long sleeve t-shirt in red") == "red"
    assert colour.named_colour("Slim-fit jeans in stretch denim") is None, "not a palette colour"
    assert colour.named_colour("Dress") is None


def test_drawn_garments_are_the_colour_their_prompt_names():
    """120 demo garments at the demo's 64 px, as extract writes them: their own images all pass,
    the same garment in another palette colour (a recoloured copy) fails."""
    shares, others = [], []
    for g in garments.make_garments(seed=3, products=120):
        image = to_resolution(garments.draw(g, 0), 64)
        mask = colour.garment_mask(image)
        assert 0.05 < mask.mean() < 0.5, g
        named = colour.named_colour(g.describe_look())
        assert named == g.colour
        shares.append(colour.colour_share(image, mask, named))
        other = next(c for c in ("green", "purple") if c not in (g.colour, g.accent))
        recoloured = image.copy()
        recoloured[mask] = colour.PALETTE[other]
        others.append(colour.colour_share(recoloured, mask, named))
    shares = np.array(shares)
    assert (shares >= colour.MATCH).mean() >= 0.95 and np.median(shares) > 0.6, np.sort(shares)[:10]
    assert max(others) == 0.0

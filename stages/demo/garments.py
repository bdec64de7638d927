"""Procedural garments in the exact FashionGen H5 schema: the embedded demo dataset.

Every product is a drawn garment (top, trousers, dress, skirt or jacket) in one colour, with a
pattern and a sleeve, leg or hem length, seen in 1-6 poses on consecutive rows. Its description
is written from the same attributes, so text and image agree and a model can learn from them.
Everything follows from one seed.

The schema copies the real `fashiongen_256_256_*.h5`: 16 keys, 256x256x3 uint8 RGB images,
text fields of shape (N, 1) as fixed-width latin-1 bytes, `index_2` one-dimensional.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import h5py
import numpy as np

IMAGE_SIZE = 256
BACKGROUND = (255, 255, 255)

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28),
    "red": (200, 30, 40),
    "navy": (25, 35, 95),
    "blue": (50, 110, 210),
    "green": (40, 140, 70),
    "yellow": (235, 200, 40),
    "pink": (240, 140, 180),
    "grey": (128, 128, 128),
    "beige": (215, 190, 150),
    "brown": (110, 70, 40),
    "orange": (240, 120, 30),
    "purple": (120, 60, 160),
}
PATTERNS = ("solid", "striped", "checked", "polka-dot")

# kind -> (lengths it can have, FashionGen category per length, subcategory per length)
KINDS: dict[str, dict[str, tuple[str, str]]] = {
    "top": {"sleeveless": ("TOPS", "TANK TOPS"), "short sleeve": ("TOPS", "T-SHIRTS"),
            "long sleeve": ("TOPS", "T-SHIRTS")},
    "trousers": {"shorts": ("SHORTS", "SHORTS"), "cropped": ("PANTS", "TROUSERS"),
                 "full length": ("PANTS", "TROUSERS")},
    "dress": {"sleeveless": ("DRESSES", "SHORT DRESSES"), "short sleeve": ("DRESSES", "MID LENGTH DRESSES"),
              "long sleeve": ("DRESSES", "LONG DRESSES")},
    "skirt": {"mini": ("SKIRTS", "SHORT SKIRTS"), "midi": ("SKIRTS", "MID LENGTH SKIRTS"),
              "maxi": ("SKIRTS", "LONG SKIRTS")},
    "jacket": {"short sleeve": ("JACKETS & COATS", "JACKETS"), "long sleeve": ("JACKETS & COATS", "COATS")},
}
NOUNS = {"top": "t-shirt", "trousers": "trousers", "dress": "dress", "skirt": "skirt", "jacket": "jacket"}

# Latin-1 on purpose: the real file has é, ® and friends, and a UTF-8 decode drops them.
BRANDS = ("Maison Éclat", "Café Noir", "Ångström Studio", "Nordlys", "Señora Blanca", "Atelier Ré",
          "Fjällräv", "Mûre & Co", "Studio Zürich")
COMPOSITIONS = ("100% cotton.", "100% organic cotton.", "95% cotton, 5% elastane.",
                "70% wool, 30% polyamide.", "100% Tencel® lyocell.", "100% linen.")
FITS = ("relaxed fit", "slim fit", "regular fit", "oversized fit")
SEASONS = ("SS2017", "FW2017", "SS2018", "FW2016")

# Fixed byte widths per text field (input_description is |S400 in the real file).
TEXT_WIDTHS = {
    "input_brand": 64, "input_category": 32, "input_composition": 128, "input_concat_description": 800,
    "input_department": 16, "input_description": 400, "input_gender": 8, "input_name": 128,
    "input_pose": 16, "input_season": 8, "input_subcategory": 32,
}
H5_KEYS = ("index", "index_2", "input_brand", "input_category", "input_composition",
           "input_concat_description", "input_department", "input_description", "input_gender",
           "input_image", "input_msrpUSD", "input_name", "input_pose", "input_productID",
           "input_season", "input_subcategory")


@dataclass(frozen=True)
class Garment:
    """One product's attributes: the single source of both its drawing and its text."""

    product_id: int
    kind: str
    length: str
    colour: str
    pattern: str
    accent: str
    brand: str
    fit: str
    composition: str
    season: str
    gender: str
    price: float
    poses: int

    @property
    def category(self) -> str:
        return KINDS[self.kind][self.length][0]

    @property
    def subcategory(self) -> str:
        return KINDS[self.kind][self.length][1]

    @property
    def noun(self) -> str:
        return "shorts" if self.length == "shorts" else NOUNS[self.kind]

    def describe_look(self) -> str:
        """'Long sleeve t-shirt in red with white stripes': the seed recipe's prompt is this clause."""
        length = "" if self.length == "shorts" else f"{self.length} "
        pattern = {"solid": "", "striped": f" with {self.accent} stripes",
                   "checked": f" with a {self.accent} check", "polka-dot": f" with {self.accent} polka dots"}
        return f"{length}{self.noun} in {self.colour}{pattern[self.pattern]}".capitalize()

    def description(self) -> str:
        details = {"top": "crew neckline", "trousers": "belt loops and zip fly", "dress": "scoop neckline",
                   "skirt": "concealed zip at side", "jacket": "notched lapels and button closure"}
        return (f"{self.describe_look()}, {details[self.kind]}, {self.fit}. "
                f"Composition: {self.composition} Designed by {self.brand}.")

    def name(self) -> str:
        pattern = "" if self.pattern == "solid" else f"{self.pattern.capitalize()} "
        return f"{self.colour.capitalize()} {pattern}{self.length.title()} {self.noun.title()}"


def make_garments(seed: int, products: int) -> list[Garment]:
    """`products` garments drawn from `seed`; the same seed always gives the same list."""
    rng = np.random.default_rng(seed)
    garments = []
    for i in range(products):
        kind = str(rng.choice(list(KINDS)))
        colour = str(rng.choice(list(COLOURS)))
        accent = str(rng.choice([c for c in ("black", "grey", "navy", "beige") if c != colour] + ["white"]))
        garments.append(Garment(
            product_id=300000 + 37 * i,
            kind=kind,
            length=str(rng.choice(list(KINDS[kind]))),
            colour=colour,
            pattern=str(rng.choice(PATTERNS, p=[0.4, 0.2, 0.2, 0.2])),
            accent=accent,
            brand=str(rng.choice(BRANDS)),
            fit=str(rng.choice(FITS)),
            composition=str(rng.choice(COMPOSITIONS)),
            season=str(rng.choice(SEASONS)),
            gender="WOMEN" if kind in ("dress", "skirt") else str(rng.choice(["MEN", "WOMEN"])),
            price=float(np.float32(rng.integers(40, 1200) + 0.99)),
            poses=int(rng.integers(1, 7)),
        ))
    return garments


def _silhouette(g: Garment) -> list[np.ndarray]:
    """Polygons (in 256 px canvas coordinates) whose union is the garment."""
    P = lambda *pts: np.array(pts, np.int32)  # noqa: E731
    if g.kind in ("top", "jacket", "dress"):
        hem = {"top": 190, "jacket": 200}.get(g.kind, 0)
        if g.kind == "dress":
            body = [P((98, 50), (158, 50), (162, 120), (94, 120)),
                    P((94, 118), (162, 118), (175 + 10 * (g.length != "sleeveless"), 215), (81, 215))]
        else:
            body = [P((90, 50), (166, 50), (170, hem), (86, hem))]
        sleeve = {"sleeveless": 0, "short sleeve": 45, "long sleeve": 125}[g.length]
        if sleeve:
            body += [P((90, 52), (100, 75), (68, 52 + sleeve), (52, 44 + sleeve)),
                     P((166, 52), (156, 75), (188, 52 + sleeve), (204, 44 + sleeve))]
        return body
    if g.kind == "trousers":
        leg = {"shorts": 110, "cropped": 180, "full length": 225}[g.length]
        return [P((92, 40), (164, 40), (166, 80), (90, 80)),
                P((90, 78), (128, 78), (124, leg), (88, leg)),
                P((128, 78), (166, 78), (168, leg), (132, leg))]
    hem = {"mini": 120, "midi": 170, "maxi": 225}[g.length]
    flare = (hem - 40) // 4
    return [P((100, 40), (156, 40), (156 + flare, hem), (100 - flare, hem))]


def _texture(g: Garment, size: int) -> np.ndarray:
    base = np.array(COLOURS[g.colour], np.uint8)
    accent = np.array(COLOURS.get(g.accent, (245, 245, 245)), np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    if g.pattern == "striped":
        mask = (y // 8) % 2 == 1
    elif g.pattern == "checked":
        mask = ((y // 12) + (x // 12)) % 2 == 1
    elif g.pattern == "polka-dot":
        mask = ((x % 16 - 8) ** 2 + (y % 16 - 8) ** 2) < 9
    else:
        mask = np.zeros((size, size), bool)
    return np.where(mask[..., None], accent, base).astype(np.uint8)


def draw(g: Garment, pose: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The garment in pose `pose` (0-based) as a size x size x 3 uint8 RGB image."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    polygons = _silhouette(g)
    cv2.fillPoly(mask, polygons, 255)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)
    image[mask > 0] = _texture(g, IMAGE_SIZE)[mask > 0]
    outline = tuple(int(c * 0.6) for c in COLOURS[g.colour])
    cv2.polylines(image, polygons, True, outline, 2, cv2.LINE_AA)
    if g.kind == "jacket":  # open front placket
        cv2.line(image, (128, 52), (128, 198), outline, 2, cv2.LINE_AA)
    # Each pose is a fixed, product-specific small view change, like a re-shoot of the same item.
    rng = np.random.default_rng([g.product_id, pose])
    angle, scale = (0.0, 1.0) if pose == 0 else (rng.uniform(-6, 6), rng.uniform(0.85, 1.0))
    shift = (0.0, 0.0) if pose == 0 else tuple(rng.uniform(-10, 10, 2))
    m = cv2.getRotationMatrix2D((IMAGE_SIZE / 2, IMAGE_SIZE / 2), angle, scale)
    m[:, 2] += shift
    image = cv2.warpAffine(image, m, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=BACKGROUND)
    if size != IMAGE_SIZE:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def _text_column(values: list[str], key: str) -> np.ndarray:
    width = TEXT_WIDTHS[key]
    encoded = [v.encode("latin-1") for v in values]
    too_long = [v for v in encoded if len(v) > width]
    if too_long:
        raise ValueError(f"{key}: {too_long[0]!r} is longer than the field's {width} bytes")
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def write_h5(path, garments: list[Garment]) -> int:
    """Write `garments` as a FashionGen-schema H5 at `path` (a file path); returns the row count."""
    rows = [(g, pose) for g in garments for pose in range(g.poses)]
    n = len(rows)
    text = {
        "input_brand": [g.brand for g, _ in rows],
        "input_category": [g.category for g, _ in rows],
        "input_composition": [g.composition for g, _ in rows],
        "input_concat_description": [f"{g.name()} {g.description()}" for g, _ in rows],
        "input_department": ["CLOTHING"] * n,
        "input_description": [g.description() for g, _ in rows],
        "input_gender": [g.gender for g, _ in rows],
        "input_name": [g.name() for g, _ in rows],
        "input_pose": [f"id_gridfs_{pose + 1}" for _, pose in rows],
        "input_season": [g.season for g, _ in rows],
        "input_subcategory": [g.subcategory for g, _ in rows],
    }
    with h5py.File(path, "w") as f:
        f.create_dataset("index", data=np.arange(n, dtype=np.int64).reshape(-1, 1))
        f.create_dataset("index_2", data=np.arange(n, dtype=np.int64))
        for key, values in text.items():
            f.create_dataset(key, data=_text_column(values, key))
        f.create_dataset("input_msrpUSD", data=np.array([[g.price] for g, _ in rows], np.float32))
        f.create_dataset("input_productID", data=np.array([[g.product_id] for g, _ in rows], np.int64))
        images = f.create_dataset("input_image", shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                  chunks=(1, IMAGE_SIZE, IMAGE_SIZE, 3), compression="gzip")
        for i, (g, pose) in enumerate(rows):
            images[i] = draw(g, pose)
    return n

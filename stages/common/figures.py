"""What the plots and report stages draw with: one look for every figure, no pyplot (no GUI
backend, no global figure state), and PNGs whose bytes depend only on their content."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.dataset import STAND_IN
from stages.common.errors import StageError
from stages.common.io import csv_text_read, read_json

if TYPE_CHECKING:  # imported where used: model-card reads this module's names without pandas and matplotlib
    import pandas as pd
    from matplotlib.figure import Figure

VARIANT_COLORS = {"baseline": "#7f7f7f", "lora": "#1f77b4"}
DPI = 100  # figure inches * DPI = pixels
TILE_INCHES = 2.72  # tight_layout takes a little: tiles come out at about 256 px
# Which metrics the charts show, as (key in the headline blocks, label, higher is better). Edge control:
# edge F1 on the image's own map minus on other maps of its category (its chance level).
HEADLINE = [("fid", "FID", False), ("kid", "KID", False), ("cmmd", "CMMD", False), ("lpips", "LPIPS", False),
            ("ssim", "SSIM", True), ("psnr", "PSNR (dB)", True), ("clip_score", "CLIP score", True),
            ("edge_f1", "edge F1", True), ("edge_control", "edge control", True)]
# The backbone (backbones.json's key) behind each headline metric; SSIM, PSNR, edge F1 and control
# and prompt colour use none.
BACKBONE_OF = {"fid": "fid", "kid": "fid", "cmmd": "clip", "lpips": "lpips", "clip_score": "clip"}
SET_LEVEL = ("fid", "kid", "cmmd")  # one number per set; the rest are means of per-sample scores
PERMUTED = ("fid", "kid")  # deltas with a sign-flip permutation p-value (<key>_p_value)


BLOCKS = ("baseline", "lora", "lora_minus_baseline")
# What the charts and the page read from metrics_detail.json's `headline` (metrics.json is the
# terminal view, without intervals).
HEADLINE_KEYS = ["headline.n"] + [f"headline.{block}.{key}{part}" for block in BLOCKS for key, _, _ in HEADLINE
                                  for part in ("", "_ci95_low", "_ci95_high")] + [
    f"headline.lora_minus_baseline.{key}_lora_{side}" for key, _, _ in HEADLINE if key not in SET_LEVEL
    for side in ("better", "worse")] + [f"headline.lora_minus_baseline.{key}_p_value" for key in PERMUTED]
SCORE_COLUMNS = ["index", "prompt", "lpips_delta", "clip_score_delta", "edge_f1_delta"] + [
    f"{name}_{variant}" for name in ("lpips", "clip_score", "edge_precision", "edge_recall", "edge_f1")
    for variant in ("baseline", "lora")]


def read_results(path: str, required: list[str], stage: str = "metrics") -> dict:
    """A JSON file of `stage`, holding every dotted key a figure reads."""
    if not Path(path).is_file():
        raise StageError(f"{path}: not found; run `dvc repro {stage}`")
    data = read_json(path)
    for dotted in required:
        node = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"{path}: has no {dotted} (an older {stage} stage wrote it?); rerun `dvc repro {stage}`")
            node = node[part]
    return data


def read_scores(path: str, indices: list[int] | None = None) -> pd.DataFrame:

    """metrics' per-sample table, rows keyed by eval index; with `indices`, it must describe
    exactly those eval images. Prompts stay text (an empty or "NA" prompt is not a missing value)."""
    import pandas as pd

    if not Path(path).is_file():
        raise StageError(f"{path}: not found; run `dvc repro metrics`")
    table = pd.read_csv(path, keep_default_na=False)
    if "prompt" in table:
        table["prompt"] = table["prompt"].astype(str).map(csv_text_read)
    missing = [c for c in SCORE_COLUMNS if c not in table]
    if missing or (indices is not None and table["index"].tolist() != indices):
        what = f"has no column {missing[0]}" if missing else f"is not the per-sample table of these {len(indices)} eval images"
        raise StageError(f"{path}: {what}; rerun `dvc repro metrics`")
    return table.set_index(table["index"].rename(None))  # rows by eval index; the column stays


def label(key: str, text: str, n: int) -> str:
    """A metric's label; FID's names its n: its bias at small n makes it "FID at this n"."""
    return f"{text} at n = {n}" if key == "fid" else text


def direction(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def save_figure(fig: Figure, target: str | Path | io.BytesIO) -> None:
    # No Software/date metadata: the same figure gives the same bytes, run after run.
    fig.savefig(target, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    save_figure(fig, buffer)
    return buffer.getvalue()


def stand_ins(backbones: dict) -> list[str]:
    """The headline metrics whose backbone is one of the demo's random networks: their numbers
    show the code runs, never which variant is better."""
    return [key for key, backbone in BACKBONE_OF.items() if backbones.get(backbone, "").startswith(STAND_IN)]

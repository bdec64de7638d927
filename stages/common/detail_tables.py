"""The report's tables of metrics_detail.json beyond the headline: fidelity and diversity (PRDC),
the per-category table and the seed variance, every number with its data-key for checking."""

from __future__ import annotations

import html

from stages.common import dataset
from stages.common.figures import HEADLINE, SET_LEVEL, direction, label
from stages.common.page import detail_cell, number

PRDC = ("precision", "recall", "density", "coverage")
# The per-category table's columns: (per-sample metric, label, higher is better).
CATEGORY_COLUMNS = [("edge_control", "edge control", True), ("edge_f1", "edge F1", True), ("ssim", "SSIM", True),
                    ("lpips", "LPIPS", False), ("colour_match", "prompt colour match", True)]
# The seed-variance table's per-image scores (set-level FID, KID and CMMD come first), and labels.
SEED_SCORES = ("lpips", "ssim", "clip_score", "edge_control", "colour_share")
TEXT = {**{key: text for key, text, _ in HEADLINE}, "colour_share": "prompt colour share"}


def prdc_table(detail: dict, stand_in: bool) -> str:
    """Precision and density (fidelity), recall and coverage (diversity), per variant; set-level."""
    rows = "".join(f"<tr><th>{v}</th>" + "".join(
        f"<td>{number(detail[v]['prdc'][k] if detail[v]['prdc'] else None, f'detail.{v}.prdc.{k}')}</td>" for k in PRDC)
        + "</tr>" for v in dataset.VARIANTS)
    note = (" The Inception here is a random stand-in: these numbers show the code runs, nothing more."
            if stand_in else "")
    return (f"<table id=prdc><tr><th></th>{''.join(f'<th>{k}</th>' for k in PRDC)}</tr>{rows}</table>"
            f"<p class=ci>Naeem et al. (2020) on the Inception features, k = {detail['settings']['prdc_k']}: precision "
            "and density say how much of the generated set looks real, recall and coverage how much of the real set "
            f"it reaches.{note}</p>")


def category_table(detail: dict) -> str:
    """Each category's n, its edge control per variant, and LoRA minus baseline per metric."""
    groups = detail["per_category"]
    columns = [c for c in CATEGORY_COLUMNS if c[0] in next(iter(groups.values()))["lora_minus_baseline"]]
    head = ("<tr><th class=text>category</th><th>n</th><th>edge control baseline</th><th>edge control LoRA</th>"
            + "".join(f"<th>Δ {text} <span class=ci>({direction(higher)})</span></th>" for _, text, higher in columns)
            + "</tr>")
    body = "".join(
        f"<tr><td class=text>{html.escape(category)}</td><td>{number(entry['n'], f'detail.per_category.{category}.n')}</td>"
        + "".join(detail_cell(entry[v]["edge_control"], f"per_category.{category}.{v}.edge_control")
                  for v in dataset.VARIANTS)
        + "".join(detail_cell(entry["lora_minus_baseline"][name], f"per_category.{category}.lora_minus_baseline.{name}")
                  for name, _, _ in columns) + "</tr>"
        for category, entry in groups.items())
    return f"<table id=categories>{head}{body}</table>"


def seed_table(detail: dict) -> str:
    """With several images per condition: how far each number moves with the seed alone."""
    seeds = detail["seed_variance"]
    if seeds is None:
        return ""
    scores = [name for name in SEED_SCORES if name in seeds["baseline"]]
    head = ("<tr><th></th>" + "".join(f"<th>{label(name, TEXT[name], detail['n'])}<br><span class=ci>sd over seed sets</span></th>"
                                      for name in SET_LEVEL)
            + "".join(f"<th>{TEXT[name]}<br><span class=ci>seed sd (share)</span></th>" for name in scores) + "</tr>")
    rows = "".join(
        f"<tr><th>{v}</th>"
        + "".join(f"<td>{number(seeds[v][name]['seed_sd'], f'detail.seed_variance.{v}.{name}.seed_sd')}</td>"
                  for name in SET_LEVEL)
        + "".join(f"<td>{number(seeds[v][name]['seed_sd'], f'detail.seed_variance.{v}.{name}.seed_sd')} "
                  f"({shown_share(seeds[v][name]['seed_share'])})</td>" for name in scores) + "</tr>"
        for v in dataset.VARIANTS)
    return (f"<h2>Seed variance</h2><table id=seeds>{head}{rows}</table><p class=ci>Each condition was drawn with "
            f"{seeds['images_per_condition']} seeds by both variants. Set-level numbers are the mean over the seed sets "
            "(one image per condition each); per-image scores are averaged per condition, and every interval and "
            "delta pairs by condition. Seed sd: the spread of one condition's images; share: the seed's part of one "
            "image's variance, the rest being the condition's.</p>")


def shown_share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"

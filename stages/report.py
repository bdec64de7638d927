"""report: one self-contained HTML page with everything a reader needs, the file to hand on.

    python -m stages.report

`paths.report` holds the headline table (each variant with its 95% interval, and the paired
LoRA-minus-baseline deltas), the warnings behind the numbers, the charts, the training and
held-out loss, train-lora's fixed-sample loss with and without the LoRA, the validation images
over steps, the qualitative grid, the edge overlays, the worst and best samples, the params that
made the run, the metric backbones and n.
Images are embedded as data URIs: it opens offline, from anywhere, and the same inputs give the
same bytes.
"""

import dataclasses
import html
from pathlib import Path

import pandas as pd
import yaml

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.figures import (HEADLINE, HEADLINE_KEYS, PERMUTED, SET_LEVEL, direction, label, png_bytes,
                                   read_results, read_scores, stand_ins)
from stages.common.io import atomic_file
from stages.common.page import HEADLINE as HEADLINE_KEY, STYLE, cell, detail_cell, figure, number, p_value, shares, verdict
from stages.common.detail_tables import category_table, prdc_table, seed_table
from stages.common.params import load_params
from stages.common.train_figures import loss_figure, validation_strip

# The params sections shown on the page: dvc.yaml lists the same ones, so editing any reruns it.
SECTIONS = ("models", "extract", "canny", "train", "generate", "metrics", "plots")
CASES = 5  # rows in each of the worst and best tables
PAIRED = ("lpips", "clip_score", "edge_f1", "edge_precision", "edge_recall")
# The controllability table: (metrics_detail.json's key, label); edge F1 and control are headline numbers.
EDGE_ROWS = [("edge_f1_same_category", "edge F1 on other maps of its category (chance level)"),
             ("edge_f1_mismatched", "edge F1 on the next sample's map"),
             ("edge_precision", "edge precision"), ("edge_recall", "edge recall")]
DETAIL_KEYS = (["n", "warnings", "backbones", "per_category", "seed_variance"]
               + [f"settings.{k}" for k in ("images_per_condition", "bootstrap_resamples", "fid_bootstrap_resamples", "permutations",
                                            "prdc_k", "edge_chance_maps", "seed", "edge_tolerance_px", "tf32",
                                            "device")]
               + [f"{v}.kid.{k}" for v in dataset.VARIANTS for k in ("subset_size", "subsets")]
               + [f"{v}.prdc" for v in dataset.VARIANTS]
               + [f"{v}.{name}.{k}" for v in (*dataset.VARIANTS, "ground_truth") for name, _ in EDGE_ROWS
                  for k in ("mean", "ci95_low", "ci95_high")]
               + [f"ground_truth.{name}.{k}" for name in ("edge_f1", "edge_control")
                  for k in ("mean", "ci95_low", "ci95_high")]
               + [f"lora_minus_baseline.{name}" for name in PAIRED])
SUMMARY_KEYS = ["fixed_samples", "denoising_loss_base", "denoising_loss_lora", "denoising_loss_change"]

def require(path: str, stage: str) -> Path:
    if not Path(path).is_file():
        raise StageError(f"{path}: not found; run `dvc repro {stage}`")
    return Path(path)


def colour_row(detail: dict) -> str:
    """The demo's prompt colour (the share of garments in their prompt's colour): pixels, no backbone,
    so the one demo number that says which variant follows the prompt better."""
    colours, delta = detail["prompt_colour"], detail["lora_minus_baseline"]["colour_match"]
    cells = "".join(detail_cell(colours[v]["colour_match"], f"prompt_colour.{v}.colour_match")
                    for v in dataset.VARIANTS)
    key = "lora_minus_baseline.colour_match"
    won = shares(delta["lora_better"], delta["lora_worse"], (f"detail.{key}.lora_better", f"detail.{key}.lora_worse"))
    return (f"<tr><th>prompt colour match <span class=ci>({direction(True)}; demo)</span></th>{cells}"
            f"{detail_cell(delta, key)}{won}{verdict(delta['ci95_low'], delta['ci95_high'], True)}</tr>")


def headline_table(metrics: dict, detail: dict) -> str:
    delta, random = metrics["lora_minus_baseline"], stand_ins(detail["backbones"])
    rows = []
    for key, text, higher in HEADLINE:
        sides = [f"{key}_lora_better", f"{key}_lora_worse"]
        won = ("<td>set-level</td>" if key in SET_LEVEL else
               shares(*(delta[side] for side in sides), tuple(f"{HEADLINE_KEY}lora_minus_baseline.{side}" for side in sides))
               if delta[sides[0]] is not None else "<td>n/a</td>")
        change = cell(metrics, "lora_minus_baseline", key)
        if key in PERMUTED:
            change = change[:-len("</td>")] + p_value(delta, key) + "</td>"
        rows.append(f"<tr><th>{label(key, text, metrics['n'])} <span class=ci>({direction(higher)})</span></th>"
                    f"{cell(metrics, 'baseline', key)}{cell(metrics, 'lora', key)}{change}{won}"
                    f"{verdict(delta[f'{key}_ci95_low'], delta[f'{key}_ci95_high'], higher, key in random)}</tr>")
    if "prompt_colour" in detail:
        rows.append(colour_row(detail))
    note = ""
    if random:
        names = ", ".join(text for key, text, _ in HEADLINE if key in random)
        note = (f"<p class=warn>{names}: computed with random stand-in networks (models/eval/backbones.json), so "
                "their numbers show that the pipeline runs, not which variant is better; the page gives them no "
                "verdict. SSIM, PSNR, edge F1, edge control and prompt colour measure pixels and edges directly."
                "</p>")
    return ("<table id=headline><tr><th>metric</th><th>baseline</th><th>LoRA</th><th>LoRA − baseline (paired)</th>"
            "<th>pairs LoRA wins / loses</th><th></th></tr>" + "".join(rows) + "</table>" + note)


def control_table(metrics: dict, detail: dict) -> str:
    """Edge F1 beside its chance levels, with the ground truth's own edges as the perfect follower:
    edge control (own minus same-category F1) is what the edge map adds beyond drawing the right
    kind of garment."""
    truth, delta = detail["ground_truth"], detail["lora_minus_baseline"]

    def row(title: str, truth_cell: str, variants: list[str], change: str) -> str:
        return f"<tr><th>{title}</th>{truth_cell}{''.join(variants)}{change}</tr>"

    rows = [row("edge F1 on its own map", detail_cell(truth["edge_f1"], "ground_truth.edge_f1"),
                [cell(metrics, v, "edge_f1") for v in dataset.VARIANTS], cell(metrics, "lora_minus_baseline", "edge_f1"))]
    rows += [row(title, detail_cell(truth[name], f"ground_truth.{name}"),
                 [detail_cell(detail[v][name], f"{v}.{name}") for v in dataset.VARIANTS],
                 detail_cell(delta[name], f"lora_minus_baseline.{name}") if delta.get(name) else "<td></td>")
             for name, title in EDGE_ROWS]
    rows.append(row("<b>edge control</b>: own minus same-category F1",
                    detail_cell(truth["edge_control"], "ground_truth.edge_control"),
                    [cell(metrics, v, "edge_control") for v in dataset.VARIANTS],
                    cell(metrics, "lora_minus_baseline", "edge_control")))
    perfect = truth["edge_control"]["mean"]
    gains = [metrics[v]["edge_control"] for v in dataset.VARIANTS]
    share = ""
    if perfect and perfect > 0 and None not in gains:
        share = (f"<p>A perfect follower (the ground truth's own edges) scores "
                 f"{number(perfect, 'detail.ground_truth.edge_control.mean')} higher on its own map than on other maps "
                 f"of its category; the baseline gains {number(gains[0], HEADLINE_KEY + 'baseline.edge_control')} "
                 f"({100 * gains[0] / perfect:.0f}% of that), the LoRA {number(gains[1], HEADLINE_KEY + 'lora.edge_control')} "
                 f"({100 * gains[1] / perfect:.0f}%). The next sample's map, often another kind of garment, is a lower "
                 "bar and overstates control.</p>")
    return ("<table id=control><tr><th></th><th>ground truth</th><th>baseline</th><th>LoRA</th>"
            "<th>LoRA − baseline</th></tr>" + "".join(rows) + "</table>" + share)


def cases_table(table: pd.DataFrame, ascending: bool) -> str:
    rows = table.sort_values(["lpips_delta", "index"], ascending=[ascending, True]).head(CASES)  # ties: by index
    body = "".join(
        f"<tr><td>#{r['index']}</td><td class=text>{html.escape(str(r['prompt']))}</td>"
        f"<td>{r['lpips_baseline']:.4f}</td><td>{r['lpips_lora']:.4f}</td><td>{r['lpips_delta']:+.4f}</td>"
        f"<td>{r['edge_f1_baseline']:.3f}</td><td>{r['edge_f1_lora']:.3f}</td><td>{r['clip_score_delta']:+.4f}</td></tr>"
        for _, r in rows.iterrows())
    return ("<table><tr><th>sample</th><th class=text>prompt</th><th>LPIPS baseline</th><th>LPIPS LoRA</th><th>Δ LPIPS</th>"
            "<th>edge F1 baseline</th><th>edge F1 LoRA</th><th>Δ CLIP</th></tr>" + body + "</table>")


def learned(summary: dict) -> str:
    """train-lora's answer to "did training learn?", beside the loss curve that cannot give it."""
    values = "".join(f'<span data-key="train.{key}" data-value="{summary[key]!r}"></span>'
                     for key in ("denoising_loss_base", "denoising_loss_lora"))
    return (f"<p>Did training learn? The denoising loss of the run's first {summary['fixed_samples']} samples "
            f"(their own images, noise and timesteps) is {summary['denoising_loss_base']:.4f} with the base UNet and "
            f"{summary['denoising_loss_lora']:.4f} with the LoRA ({100 * summary['denoising_loss_change']:+.1f}%). "
            f"The training loss above is noisier than that: each step draws new timesteps; the held-out loss "
            f"keeps its images, noise and timesteps, so only the weights move it.{values}</p>")


def seeds_text(copies: int) -> str:
    return "seed" if copies == 1 else f"{copies} seeds (images per condition)"


def page(params, metrics: dict, detail: dict, table: pd.DataFrame, figures: list[str], summary: dict,
         strip: str) -> str:
    backbones = ", ".join(f"{k}: {html.escape(v)}" for k, v in detail["backbones"].items())
    warnings = "".join(f"<p class=warn>{html.escape(w)}</p>" for w in detail["warnings"])
    settings = detail["settings"]
    resolved = {s: dataclasses.asdict(getattr(params, s)) for s in SECTIONS}
    kid = detail["baseline"]["kid"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report: baseline vs LoRA</title>
<style>{STYLE}</style></head><body>
<h1>Canny ControlNet: baseline vs LoRA</h1>
<p>n = <span id=n data-value="{metrics['n']}">{metrics['n']}</span> eval images, each generated by both variants
with the same edge map, prompt and {seeds_text(settings['images_per_condition'])}. Backbones: {backbones}.</p>
<h2>Headline</h2>
{headline_table(metrics, detail)}
<p class=ci>Means: Student-t 95% intervals. KID, CMMD and every delta: a paired bootstrap over eval images
({settings['bootstrap_resamples']} resamples, FID's delta {settings['fid_bootstrap_resamples']}, seed {settings['seed']}).
FID is FID at this n: its bias at small n differs between variants, so a variant's FID has no interval; the FID
delta's interval is the bootstrap's spread centred on the estimate, and p is a paired sign-flip permutation test
of the FID and KID deltas ({settings['permutations']} permutations). Wins / loses: the shares of pairs where LoRA
is strictly better / worse; the rest tie. Edge F1: canny edges of each generated image vs its input edge map,
within {settings['edge_tolerance_px']:g} px; edge control: that minus the F1 on up to {settings['edge_chance_maps']}
other maps of its category. KID: subsets of {kid['subset_size']} images, {kid['subsets']} of them.
TF32: {'on' if settings['tf32'] else 'off'}; metrics device: {settings['device']}.</p>
{warnings}
<h2>Controllability</h2>
{control_table(metrics, detail)}
{seed_table(detail)}
<h2>Fidelity and diversity</h2>
{prdc_table(detail, 'fid' in stand_ins(detail['backbones']))}
<h2>By garment category</h2>
{category_table(detail)}
<h2>Charts</h2>
{figures[0]}
{figures[1]}
{figures[2]}
{learned(summary)}
{strip}
<h2>Samples</h2>
{figures[3]}
{figures[4]}
<h2>Where LoRA did worst (by paired LPIPS)</h2>
{cases_table(table, ascending=False)}
<h2>Where LoRA did best</h2>
{cases_table(table, ascending=True)}
<h2>The params that made this run</h2>
<pre>{html.escape(yaml.safe_dump(resolved, sort_keys=False))}</pre>
</body></html>
"""


def main() -> None:
    setup_logging()
    params = load_params()
    paths = params.paths
    detail = read_results(paths.metrics_detail, DETAIL_KEYS + HEADLINE_KEYS)
    metrics = detail["headline"]
    table = read_scores(paths.per_sample)
    summary = read_results(paths.train_summary, SUMMARY_KEYS, "train-lora")
    if not metrics["n"] == detail["n"] == len(table):
        raise StageError(f"{paths.metrics_detail} and {paths.per_sample} disagree on n; "
                         "rerun `dvc repro metrics`")
    charts = [("Headline metrics", paths.metrics_chart, "baseline vs LoRA with 95% intervals"),
              ("Paired deltas", paths.deltas_chart, "LoRA minus baseline with 95% intervals"),
              ("Training and held-out loss", None, "training loss per optimiser step, held-out loss per validation"),
              ("Samples: seeded choice, then LoRA's best and worst", paths.samples_grid,
               "ground truth, edges, baseline, LoRA"),
              ("Edge overlays", paths.edge_overlays, "input edges and generated edges")]
    figures = [figure(title, png_bytes(loss_figure(paths.train_log)) if path is None
                      else require(path, "plots").read_bytes(), alt) for title, path, alt in charts]
    prompts = {c["index"]: c["prompt"] for c in dataset.load_eval_configs(paths.eval_data)}
    drawn = validation_strip(paths.train_log, prompts)
    strip = "" if drawn is None else figure(
        "Validation while training", png_bytes(drawn),
        f"the LoRA at each validated step (train.validate_every: {params.train.validate_every}) on fixed eval "
        "conditions; step 0 is the base") + (f"<p>Each row: one eval condition (edge map, prompt and seed), drawn "
        f"by the LoRA as it stood at each step, with {params.train.validation_steps} UniPC steps at guidance "
        f"{params.train.validation_guidance:g}; step 0 is the base model.</p>")
    with atomic_file(paths.report) as tmp:
        Path(tmp).write_text(page(params, metrics, detail, table, figures, summary, strip), encoding="utf-8")
    log.info("report: wrote %s (%.1f MB, self-contained; open it in any browser)", paths.report,
             Path(paths.report).stat().st_size / 1e6)


if __name__ == "__main__":
    run_cli(main)

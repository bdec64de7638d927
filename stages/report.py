"""report: one self-contained HTML page with everything a reader needs, the file to hand on.

    python -m stages.report

`paths.report` holds the headline table (each variant with its 95% interval, and the paired
LoRA-minus-baseline deltas), the warnings behind the numbers, the charts, the loss curve and
train-lora's fixed-sample loss with and without the LoRA, the qualitative grid, the edge
overlays, the worst and best samples, the params that made the run, the metric backbones and n.
Images are embedded as data URIs: it opens offline, from anywhere, and the same inputs give the
same bytes.
"""

import base64
import dataclasses
import html
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.figures import HEADLINE, HEADLINE_KEYS, direction, png_bytes, read_results, read_scores
from stages.common.io import atomic_file
from stages.common.params import load_params

# The params sections shown on the page: dvc.yaml lists the same ones, so editing any reruns it.
SECTIONS = ("models", "extract", "canny", "train", "generate", "metrics", "plots")
CASES = 5  # rows in each of the worst and best tables
PAIRED = ("lpips", "clip_score", "edge_f1", "edge_precision", "edge_recall")
# The backbone (backbones.json's key) behind each headline metric; edge F1 and prompt colour use none.
BACKBONE_OF = {"fid": "fid", "kid": "fid", "lpips": "lpips", "clip_score": "clip"}
DETAIL_KEYS = (["n", "warnings", "backbones"]
               + [f"settings.{k}" for k in ("bootstrap_resamples", "fid_bootstrap_resamples", "seed",
                                            "edge_tolerance_px", "tf32", "device")]
               + [f"{v}.kid.{k}" for v in dataset.VARIANTS for k in ("subset_size", "subsets")]
               + [f"{v}.{name}.{k}" for v in dataset.VARIANTS for name in ("edge_precision", "edge_recall")
                  for k in ("mean", "ci95_low", "ci95_high")]
               + [f"lora_minus_baseline.{name}.{k}" for name in PAIRED
                  for k in ("mean", "ci95_low", "ci95_high", "lora_better", "lora_worse")])
SUMMARY_KEYS = ["fixed_samples", "denoising_loss_base", "denoising_loss_lora", "denoising_loss_change"]

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; vertical-align: top; }
th:first-child, td:first-child, .text { text-align: left; }
.ci { color: #666; font-size: 0.85em; }
.better { color: #2ca02c; font-weight: 600; } .worse { color: #d62728; font-weight: 600; }
.standin { color: #666; font-style: italic; }
.warn { background: #fff6db; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; margin: 0.3em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 13px; }
"""


def require(path: str, stage: str) -> Path:
    if not Path(path).is_file():
        raise StageError(f"{path}: not found; run `dvc repro {stage}`")
    return Path(path)


def number(value, key: str) -> str:
    """A value shown with 4 significant digits; data-value keeps every digit for checking."""
    if value is None:
        return "<span>n/a</span>"
    return f'<span data-key="{key}" data-value="{value!r}">{value:.4g}</span>'


def interval(value, low, high, keys: tuple[str, str, str]) -> str:
    """A value and its 95% interval, as one cell; `keys` name the three for checking."""
    return (f"<td>{number(value, keys[0])}<br><span class=ci>[{number(low, keys[1])}, "
            f"{number(high, keys[2])}]</span></td>")


def cell(metrics: dict, block: str, key: str) -> str:
    m, names = metrics[block], (key, f"{key}_ci95_low", f"{key}_ci95_high")
    return interval(*(m[name] for name in names), tuple(f"{block}.{name}" for name in names))


def detail_cell(entry: dict, key: str) -> str:
    """An interval from metrics_detail.json ({"mean", "ci95_low", "ci95_high"} at `key`)."""
    names = ("mean", "ci95_low", "ci95_high")
    return interval(*(entry[name] for name in names), tuple(f"detail.{key}.{name}" for name in names))


def verdict(low, high, higher: bool, stand_in: bool = False) -> str:
    """What the delta's 95% interval [low, high] says, as a cell."""
    if stand_in:
        return "<td class=standin>no verdict: a random stand-in backbone</td>"
    if low is None:
        return "<td>no interval</td>"
    if low <= 0 <= high:
        return "<td>no clear difference</td>"
    better = (low > 0) == higher
    return f"<td class={'better' if better else 'worse'}>LoRA clearly {'better' if better else 'worse'}</td>"


def shares(better: float, worse: float, keys: tuple[str, str]) -> str:
    """The share of pairs LoRA wins, and of those it loses (the rest are ties); `keys` name them."""
    cells = [f'<span data-key="{key}" data-value="{value!r}">{100 * value:.0f}%</span>'
             for key, value in zip(keys, (better, worse), strict=True)]
    return f"<td>{cells[0]} / {cells[1]}</td>"


def stand_ins(backbones: dict) -> list[str]:
    """The headline metrics whose backbone is one of the demo's random networks."""
    return [key for key, backbone in BACKBONE_OF.items() if backbones.get(backbone, "").startswith(dataset.STAND_IN)]


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
    for key, label, higher in HEADLINE:
        sides = [f"{key}_lora_better", f"{key}_lora_worse"]
        won = (shares(*(delta[side] for side in sides), tuple(f"lora_minus_baseline.{side}" for side in sides))
               if sides[0] in delta else "<td>set-level</td>")
        rows.append(f"<tr><th>{label} <span class=ci>({direction(higher)})</span></th>"
                    f"{cell(metrics, 'baseline', key)}{cell(metrics, 'lora', key)}"
                    f"{cell(metrics, 'lora_minus_baseline', key)}{won}"
                    f"{verdict(delta[f'{key}_ci95_low'], delta[f'{key}_ci95_high'], higher, key in random)}</tr>")
    if "prompt_colour" in detail:
        rows.append(colour_row(detail))
    note = ""
    if random:
        names = ", ".join(label for key, label, _ in HEADLINE if key in random)
        note = (f"<p class=warn>{names}: computed with random stand-in networks (models/eval/backbones.json), so "
                "their numbers show that the pipeline runs, not which variant is better; the page gives them no "
                "verdict. Edge F1 and prompt colour measure edges and pixels directly.</p>")
    return ("<table id=headline><tr><th>metric</th><th>baseline</th><th>LoRA</th><th>LoRA − baseline (paired)</th>"
            "<th>pairs LoRA wins / loses</th><th></th></tr>" + "".join(rows) + "</table>" + note)


def cases_table(table: pd.DataFrame, ascending: bool) -> str:
    rows = table.sort_values(["lpips_delta", "index"], ascending=[ascending, True]).head(CASES)  # ties: by index
    body = "".join(
        f"<tr><td>#{r['index']}</td><td class=text>{html.escape(str(r['prompt']))}</td>"
        f"<td>{r['lpips_baseline']:.4f}</td><td>{r['lpips_lora']:.4f}</td><td>{r['lpips_delta']:+.4f}</td>"
        f"<td>{r['edge_f1_baseline']:.3f}</td><td>{r['edge_f1_lora']:.3f}</td><td>{r['clip_score_delta']:+.4f}</td></tr>"
        for _, r in rows.iterrows())
    return ("<table><tr><th>sample</th><th class=text>prompt</th><th>LPIPS baseline</th><th>LPIPS LoRA</th><th>Δ LPIPS</th>"
            "<th>edge F1 baseline</th><th>edge F1 LoRA</th><th>Δ CLIP</th></tr>" + body + "</table>")


def figure(title: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<h3>{html.escape(title)}</h3>\n<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def loss_figure(loss_log: Path) -> Figure:
    log_table = pd.read_csv(loss_log)
    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.subplots()
    ax.plot(log_table["step"], log_table["loss"], color="#1f77b4", linewidth=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def learned(summary: dict) -> str:
    """train-lora's answer to "did training learn?", beside the loss curve that cannot give it."""
    values = "".join(f'<span data-key="train.{key}" data-value="{summary[key]!r}"></span>'
                     for key in ("denoising_loss_base", "denoising_loss_lora"))
    return (f"<p>Did training learn? The denoising loss of the run's first {summary['fixed_samples']} samples "
            f"(their own images, noise and timesteps) is {summary['denoising_loss_base']:.4f} with the base UNet and "
            f"{summary['denoising_loss_lora']:.4f} with the LoRA ({100 * summary['denoising_loss_change']:+.1f}%). "
            f"The curve above is noisier than that: each step draws new timesteps.{values}</p>")


def page(params, metrics: dict, detail: dict, table: pd.DataFrame, figures: list[str], summary: dict) -> str:
    backbones = ", ".join(f"{k}: {html.escape(v)}" for k, v in detail["backbones"].items())
    warnings = "".join(f"<p class=warn>{html.escape(w)}</p>" for w in detail["warnings"])
    settings = detail["settings"]
    resolved = {s: dataclasses.asdict(getattr(params, s)) for s in SECTIONS}
    edge_rows = "".join(
        f"<tr><th>{name.replace('_', ' ')}</th>"
        + "".join(f"<td>{detail[v][name]['mean']:.4g} <span class=ci>[{detail[v][name]['ci95_low']:.4g}, "
                  f"{detail[v][name]['ci95_high']:.4g}]</span></td>" for v in dataset.VARIANTS)
        + f"<td>{detail['lora_minus_baseline'][name]['mean']:+.4g} <span class=ci>"
          f"[{detail['lora_minus_baseline'][name]['ci95_low']:+.4g}, {detail['lora_minus_baseline'][name]['ci95_high']:+.4g}]"
          "</span></td></tr>"
        for name in ("edge_precision", "edge_recall"))
    kid = detail["baseline"]["kid"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report: baseline vs LoRA</title>
<style>{STYLE}</style></head><body>
<h1>Canny ControlNet: baseline vs LoRA</h1>
<p>n = <span id=n data-value="{metrics['n']}">{metrics['n']}</span> eval images, each generated by both variants
with the same edge map, prompt and seed. Backbones: {backbones}.</p>
<h2>Headline</h2>
{headline_table(metrics, detail)}
<p class=ci>Means: Student-t 95% intervals. FID, KID and every delta: a paired bootstrap over eval images
({settings['bootstrap_resamples']} resamples, FID {settings['fid_bootstrap_resamples']}, seed {settings['seed']});
FID's interval is the bootstrap's spread centred on the estimate (resampling repeats images, which pushes FID
up; conservative). Wins / loses: the shares of pairs where LoRA is strictly better / worse; the rest tie. Edge F1: canny edges of each generated image vs its input edge map,
within {settings['edge_tolerance_px']:g} px. KID: subsets of {kid['subset_size']} images, {kid['subsets']} of them.
TF32: {'on' if settings['tf32'] else 'off'}; metrics device: {settings['device']}.</p>
{warnings}
<h2>Controllability</h2>
<table><tr><th></th><th>baseline</th><th>LoRA</th><th>LoRA − baseline</th></tr>{edge_rows}</table>
<h2>Charts</h2>
{figures[0]}
{figures[1]}
{figures[2]}
{learned(summary)}
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
    metrics = read_results(paths.metrics, HEADLINE_KEYS)
    detail = read_results(paths.metrics_detail, DETAIL_KEYS)
    table = read_scores(paths.per_sample)
    summary = read_results(paths.train_summary, SUMMARY_KEYS, "train-lora")
    if not metrics["n"] == detail["n"] == len(table):
        raise StageError(f"{paths.metrics}, {paths.metrics_detail} and {paths.per_sample} disagree on n; "
                         "rerun `dvc repro metrics`")
    charts = [("Headline metrics", paths.metrics_chart, "baseline vs LoRA with 95% intervals"),
              ("Paired deltas", paths.deltas_chart, "LoRA minus baseline with 95% intervals"),
              ("Training loss", None, "training loss per optimiser step"),
              ("Samples: seeded choice, then LoRA's best and worst", paths.samples_grid,
               "ground truth, edges, baseline, LoRA"),
              ("Edge overlays", paths.edge_overlays, "input edges and generated edges")]
    figures = [figure(title, png_bytes(loss_figure(require(paths.loss_log, "train-lora"))) if path is None
                      else require(path, "plots").read_bytes(), alt) for title, path, alt in charts]
    with atomic_file(paths.report) as tmp:
        Path(tmp).write_text(page(params, metrics, detail, table, figures, summary), encoding="utf-8")
    log.info("report: wrote %s (%.1f MB, self-contained; open it in any browser)", paths.report,
             Path(paths.report).stat().st_size / 1e6)


if __name__ == "__main__":
    run_cli(main)

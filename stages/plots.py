"""plots: the figures behind the numbers, each readable at 256-px tiles.

    python -m stages.plots

- `samples_grid`: ground truth | edges | baseline | LoRA, one row per sample with its wrapped
  prompt and per-sample scores. Rows: a seeded random choice, then LoRA's best and worst samples
  by the paired LPIPS delta (the cases a reader should see, not only typical ones).
- `metrics_chart`: baseline vs LoRA for each headline metric, with its 95% interval.
- `deltas_chart`: LoRA minus baseline for each metric, with its paired 95% interval.
- `edge_overlays`: the input edge map and the generated image's canny edges on one image.
The report stage puts all of them on one page. DVC draws train-lora's own curves from its
DVCLive folder (`dvc plots show`).
"""

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.edges import canny
from stages.common.figures import (HEADLINE, HEADLINE_KEYS, TILE_INCHES, VARIANT_COLORS, direction, label,
                                   png_bytes, read_results, read_scores)
from stages.common.io import atomic_file, check_images, image_size, load_rgb
from stages.common.params import load_params

INPUT_EDGE, GENERATED_EDGE, BOTH_EDGES = (0, 160, 255), (255, 150, 0), (255, 255, 255)


def image_columns(paths) -> list[tuple[str, str, object]]:
    """(title, the stage that writes it, index -> image path) for each column of the grid."""
    return [("ground truth", "extract", lambda i: dataset.gt_path(paths.eval_data, i)),
            ("edges", "canny-edges", lambda i: dataset.edge_path(paths.edges, i)),
            *[(v, f"generate-{v}", lambda i, v=v: dataset.generated_path(paths, v, i)) for v in dataset.VARIANTS]]


def choose_rows(table: pd.DataFrame, cfg) -> list[tuple[int, str]]:
    """(index, why it is shown): seeded random rows, then the best and worst by paired LPIPS."""
    by_delta = table.sort_values(["lpips_delta", "index"])["index"].tolist()  # most improved first
    k = min(cfg.extreme_samples, len(by_delta) // 2)
    best, worst = by_delta[:k], by_delta[::-1][:k]
    rest = [i for i in table["index"] if i not in best + worst]
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(rng.choice(rest, min(cfg.grid_samples, len(rest)), replace=False).tolist()) if rest else []
    return [(i, "random") for i in chosen] + [(i, "LoRA's best") for i in best] + [(i, "LoRA's worst") for i in worst]


def scores_label(row, variant: str) -> str:
    return (f"LPIPS {row[f'lpips_{variant}']:.3f}  CLIP {row[f'clip_score_{variant}']:.3f}\n"
            f"edge F1 {row[f'edge_f1_{variant}']:.3f}")


def grid_figure(rows, table, paths) -> Figure:
    columns = image_columns(paths)
    fig = Figure(figsize=(TILE_INCHES * len(columns) + 1.8, (TILE_INCHES + 0.75) * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (index, why) in enumerate(rows):
        row = table.loc[index]
        for c, (title, _, path_of) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(load_rgb(path_of(index)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=10)
            if title in dataset.VARIANTS:
                ax.set_xlabel(scores_label(row, title), fontsize=9)
        prompt = "\n".join(textwrap.wrap(str(row["prompt"]), 24)[:5])
        axes[r][0].set_ylabel(f"#{index} · {why}\nΔLPIPS {row['lpips_delta']:+.4f}\n\n{prompt}", fontsize=9,
                              rotation=0, ha="right", va="center", labelpad=8, parse_math=False)  # $ is text
    fig.tight_layout()
    return fig


def metrics_figure(metrics: dict) -> Figure:
    columns = -(-len(HEADLINE) // 2)
    fig = Figure(figsize=(3.0 * columns, 6.8))
    axes = fig.subplots(2, columns, squeeze=False).ravel()
    for ax in axes[len(HEADLINE):]:
        ax.set_visible(False)
    for ax, (key, text, higher) in zip(axes, HEADLINE, strict=False):
        for x, variant in enumerate(dataset.VARIANTS):
            m = metrics[variant]
            low, high = m[f"{key}_ci95_low"], m[f"{key}_ci95_high"]
            if m[key] is None:  # edge control without a same-category chance level
                continue
            ax.bar(x, m[key], color=VARIANT_COLORS[variant])
            if low is not None:  # drawn from its ends: an interval need not be symmetric
                ax.vlines(x, low, high, color="black", linewidth=1.5)
                ax.hlines([low, high], x - 0.12, x + 0.12, color="black", linewidth=1.5)
        ax.set_xticks(range(len(dataset.VARIANTS)), dataset.VARIANTS)
        ax.set_title(f"{label(key, text, metrics['n'])}\n({direction(higher)})", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
    fig.suptitle(f"n = {metrics['n']} eval images; bars: 95% intervals (FID: none, see the report)", fontsize=10)
    fig.tight_layout()
    return fig


def deltas_figure(metrics: dict) -> Figure:
    delta = metrics["lora_minus_baseline"]
    fig = Figure(figsize=(7.5, 1.25 * len(HEADLINE) + 0.6))
    for ax, (key, text, higher) in zip(fig.subplots(len(HEADLINE), 1), HEADLINE, strict=True):
        value, low, high = delta[key], delta[f"{key}_ci95_low"], delta[f"{key}_ci95_high"]
        if value is None:
            ax.set_axis_off()
            ax.set_title(f"{text}: not measured (see the report's warnings)", fontsize=10, loc="left")
            continue
        clear = low is not None and (low > 0 or high < 0)
        better = (value > 0) == higher
        color = ("#2ca02c" if better else "#d62728") if clear else "#7f7f7f"
        if low is not None:  # drawn from its ends: an interval need not be symmetric, nor hold the value
            ax.hlines(0, low, high, color=color, linewidth=2)
            ax.vlines([low, high], -0.3, 0.3, color=color, linewidth=2)
        ax.plot(value, 0, "o", color=color, markersize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_ylim(-1, 1)
        ends = [abs(v) for v in (value, low, high) if v is not None and np.isfinite(v)]
        span = max(ends, default=0) * 1.3 or 1.0
        ax.set_xlim(-span, span)
        ax.set_yticks([])
        share = (f"; LoRA better on {100 * delta[f'{key}_lora_better']:.0f}%, worse on "
                 f"{100 * delta[f'{key}_lora_worse']:.0f}% of pairs") if f"{key}_lora_better" in delta else ""
        p_value = delta.get(f"{key}_p_value")
        share += f"; permutation p = {p_value:.3g}" if p_value is not None else ""
        ax.set_title(f"{label(key, text, metrics['n'])}: {value:+.4g} ({direction(higher)}){share}", fontsize=10,
                     loc="left")
    fig.suptitle("LoRA minus baseline, paired, with 95% intervals (green: clearly better, red: clearly worse)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def overlay(input_edges: np.ndarray, generated_edges: np.ndarray) -> np.ndarray:
    given, made = input_edges[..., 0] > 0, generated_edges[..., 0] > 0
    image = np.zeros((*given.shape, 3), np.uint8)
    image[given], image[made], image[given & made] = INPUT_EDGE, GENERATED_EDGE, BOTH_EDGES
    return image


def overlays_figure(indices, table, paths, canny_cfg) -> Figure:
    fig = Figure(figsize=(TILE_INCHES * len(dataset.VARIANTS) + 0.4, (TILE_INCHES + 0.5) * len(indices) + 0.5))
    axes = fig.subplots(len(indices), len(dataset.VARIANTS), squeeze=False)
    for r, index in enumerate(indices):
        given = load_rgb(dataset.edge_path(paths.edges, index))
        for c, variant in enumerate(dataset.VARIANTS):
            made = canny(load_rgb(dataset.generated_path(paths, variant, index)), canny_cfg.low_threshold,
                         canny_cfg.high_threshold)
            ax = axes[r][c]
            ax.imshow(overlay(given, made), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            row = table.loc[index]
            ax.set_title(f"#{index} {variant}", fontsize=10)
            ax.set_xlabel(f"precision {row[f'edge_precision_{variant}']:.2f}  recall "
                          f"{row[f'edge_recall_{variant}']:.2f}  F1 {row[f'edge_f1_{variant}']:.2f}", fontsize=9)
    fig.suptitle("blue: input edges, orange: generated edges, white: both", fontsize=10)
    fig.tight_layout()
    return fig


def main() -> None:
    setup_logging()
    params = load_params()
    paths, cfg = params.paths, params.plots
    indices = [c["index"] for c in dataset.load_eval_configs(paths.eval_data)]
    table = read_scores(paths.per_sample, indices)
    metrics = read_results(paths.metrics_detail, HEADLINE_KEYS)["headline"]
    rows = choose_rows(table, cfg)
    overlaid = [i for i, _ in rows][:cfg.overlay_samples]
    gt_of = image_columns(paths)[0][2]
    size = image_size(gt_of(rows[0][0]))
    for _, stage, path_of in image_columns(paths):  # every image read, checked before drawing any
        check_images([path_of(i) for i, _ in rows], stage, size)

    # Every figure drawn before any is written: a failure leaves the last run's set whole.
    figures = {paths.samples_grid: grid_figure(rows, table, paths), paths.metrics_chart: metrics_figure(metrics),
               paths.deltas_chart: deltas_figure(metrics),
               paths.edge_overlays: overlays_figure(overlaid, table, paths, params.canny)}
    pngs = {path: png_bytes(fig) for path, fig in figures.items()}
    for path, png in pngs.items():
        with atomic_file(path) as tmp:
            tmp.write_bytes(png)
    log.info("plots: wrote %s", ", ".join(figures))


if __name__ == "__main__":
    run_cli(main)

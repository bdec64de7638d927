"""The report page's pieces: every number carries its exact value (data-value, for checking by
parsing and in a browser), intervals, verdicts and figures, all as HTML text."""

from __future__ import annotations

import base64
import html

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


def number(value, key: str) -> str:
    """A value shown with 4 significant digits; data-value keeps every digit for checking."""
    if value is None:
        return "<span>n/a</span>"
    return f'<span data-key="{html.escape(key)}" data-value="{value!r}">{value:.4g}</span>'


def interval(value, low, high, keys: tuple[str, str, str]) -> str:
    """A value and its 95% interval, as one cell; `keys` name the three for checking. A value
    without one (FID at this n) says so."""
    if value is not None and low is None and high is None:
        return f"<td>{number(value, keys[0])}<br><span class=ci>no interval</span></td>"
    return (f"<td>{number(value, keys[0])}<br><span class=ci>[{number(low, keys[1])}, "
            f"{number(high, keys[2])}]</span></td>")


HEADLINE = "detail.headline."  # the data-key prefix of metrics_detail.json's headline numbers


def cell(metrics: dict, block: str, key: str) -> str:
    """A headline number and its interval: `metrics` is metrics_detail.json's `headline`."""
    m, names = metrics[block], (key, f"{key}_ci95_low", f"{key}_ci95_high")
    return interval(*(m[name] for name in names), tuple(f"{HEADLINE}{block}.{name}" for name in names))


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


def p_value(delta: dict, key: str) -> str:
    """The permutation test's p-value under a delta's interval, where there is one."""
    value = delta.get(f"{key}_p_value")
    if value is None:
        return ""
    return f"<br><span class=ci>p = {number(value, f'{HEADLINE}lora_minus_baseline.{key}_p_value')}</span>"


def figure(title: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<h3>{html.escape(title)}</h3>\n<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

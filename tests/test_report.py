"""report: one self-contained page whose numbers are metrics.json's, checked by parsing the HTML
(fast, always) and in headless Chromium (every image loaded, the numbers as rendered)."""

from __future__ import annotations

import base64
import html.parser
import io
import os
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import report
from stages.common.errors import StageError
from stages.common.io import read_json


class Page(html.parser.HTMLParser):
    """What the checks need from the page: image sources, every data-key's value, other links."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.values, self.links, self.pre, self._in_pre = [], {}, [], "", False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif attrs.get("data-key"):
            self.values[attrs["data-key"]] = float(attrs["data-value"])
        elif attrs.get("id") == "n":
            self.values["n"] = float(attrs["data-value"])
        self.links += [attrs[k] for k in ("href", "src") if k in attrs and tag != "img"]
        self._in_pre = tag == "pre"

    def handle_data(self, data):
        if self._in_pre:
            self.pre += data

    def handle_endtag(self, tag):
        self._in_pre = False


def flat(metrics: dict) -> dict[str, float]:
    return {f"{block}.{k}": v for block, values in metrics.items() if isinstance(values, dict)
            for k, v in values.items()}


def test_report_is_self_contained_and_shows_metrics_json(finished_project):
    p = finished_project
    p.path("report").unlink()
    p.run("report")
    page = Page(p.path("report").read_text(encoding="utf-8"))
    assert len(page.images) == 5 and page.links == [], "charts, loss curve, grid, overlays; nothing fetched"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.width > 200
    metrics = read_json(p.path("metrics"))
    shown = flat(metrics)
    assert page.values.pop("n") == metrics["n"]
    summary = read_json(p.path("train_summary"))
    for key in ("denoising_loss_base", "denoising_loss_lora"):
        assert page.values.pop(f"train.{key}") == summary[key], key  # train-lora's, exactly
    assert page.values, "the headline numbers carry their exact values"
    for key, value in page.values.items():
        assert value == shown[key], key  # repr round-trips: exactly metrics.json's float
    for block in ("baseline", "lora", "lora_minus_baseline"):
        for name in ("fid", "kid", "lpips", "clip_score", "edge_f1"):
            assert f"{block}.{name}" in page.values
    printed = yaml.safe_load(page.pre)
    assert list(printed) == list(report.SECTIONS)
    assert printed["train"]["max_steps"] == p.params["train"]["max_steps"]


def test_a_missing_or_older_train_summary_is_one_line(finished_project):
    p = finished_project
    summary = p.path("train_summary")
    summary.write_text('{"fixed_samples": 64}')
    with pytest.raises(StageError, match=r"train_summary.json: has no denoising_loss_base .*rerun `dvc repro train-lora`"):
        p.run("report")
    summary.unlink()
    with pytest.raises(StageError, match=r"train_summary.json: not found; run `dvc repro train-lora`"):
        p.run("report")


def test_same_inputs_same_page(finished_project):
    p = finished_project
    first = p.path("report").read_bytes()
    p.run("report")
    assert p.path("report").read_bytes() == first


@pytest.mark.browser
def test_report_renders_in_headless_chromium(finished_project, chromium, tmp_path):
    p, driver = finished_project, chromium
    driver.get(p.path("report").resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) == 5 and all(done and width > 0 for done, width, _ in images), images
    rendered = driver.execute_script(
        "return Array.from(document.querySelectorAll('#headline [data-key]'))"
        ".map(e => [e.dataset.key, e.dataset.value, e.textContent])")
    shown = flat(read_json(p.path("metrics")))
    for key, value, text in rendered:
        assert float(value) == shown[key] and text.strip(), key
        if not key.endswith(("_lora_better", "_lora_worse")):  # shown as percentages
            assert float(text) == pytest.approx(shown[key], rel=5e-4), (key, text)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, height)
    screenshot = os.environ.get("FASHION_REPORT_SCREENSHOT", str(tmp_path / "report.png"))
    assert driver.save_screenshot(screenshot)
    with Image.open(screenshot) as shot:
        assert shot.width >= 1200 and shot.height > 2000
        assert np.asarray(shot.convert("L")).std() > 20, "the page is not blank"


def test_a_url_with_credentials_never_reaches_the_page(finished_project, monkeypatch, capsys):
    """The page prints the models section; params refuse a URL with a password or a query string."""
    from stages.common.cli import run_cli

    page = finished_project.path("report").read_bytes()
    finished_project.set({"models.inception_url": "https://mirror.example/i.pt?X-Amz-Signature=5ec7e7&token=tok99"})
    monkeypatch.setattr(sys, "argv", ["stages/report.py"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(report.main)
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and err.strip().splitlines() == [(
        "error: params.yaml: models.inception_url: https://mirror.example/i.pt?... carries a query string, which "
        "would be copied into dvc.lock, models/sources.json, the report and the bundle: put a token in "
        "$FASHION_URL_TOKEN instead (sent as an Authorization: Bearer header, never logged or recorded), or download "
        "the file yourself and set models.local.inception")]
    assert "5ec7e7" not in out + err and "tok99" not in out + err
    assert finished_project.path("report").read_bytes() == page

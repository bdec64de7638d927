"""report: one self-contained page whose numbers are metrics_detail.json's, checked by parsing the HTML
(fast, always) and in headless Chromium (every image loaded, the numbers as rendered)."""

from __future__ import annotations

import base64
import json
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


def flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number by its dotted path: what the page's data-keys name (metrics_detail's as detail.*)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def shown(p) -> dict[str, float]:
    """Every number the page may show, by the key it must carry: metrics_detail.json's (metrics.json,
    the terminal view, is not the page's source; only its n is)."""
    return {"n": read_json(p.path("metrics"))["n"], **flat(read_json(p.path("metrics_detail")), "detail.")}


def test_report_is_self_contained_and_shows_metrics_detail(finished_project):
    p = finished_project
    p.path("report").unlink()
    p.run("report")
    page = Page(p.path("report").read_text(encoding="utf-8"))
    assert len(page.images) == 6 and page.links == [], "charts, loss, validation strip, grid, overlays; nothing fetched"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.width > 200
    metrics, values = read_json(p.path("metrics_detail"))["headline"], shown(p)
    assert page.values.pop("n") == metrics["n"]
    summary = read_json(p.path("train_summary"))
    for key in ("denoising_loss_base", "denoising_loss_lora"):
        assert page.values.pop(f"train.{key}") == summary[key], key  # train-lora's, exactly
    assert page.values, "the headline numbers carry their exact values"
    for key, value in page.values.items():
        assert value == values[key], key  # repr round-trips: exactly metrics_detail.json's float
    for block in ("baseline", "lora", "lora_minus_baseline"):
        for name in ("fid", "kid", "lpips", "clip_score", "edge_f1"):
            assert f"detail.headline.{block}.{name}" in page.values
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
    assert len(images) == 6 and all(done and width > 0 for done, width, _ in images), images
    rendered = driver.execute_script(
        "return Array.from(document.querySelectorAll('#headline [data-key], #control [data-key], #categories [data-key]'))"
        ".map(e => [e.dataset.key, e.dataset.value, e.textContent])")
    values = shown(p)
    # the control delta against the same-category chance level, with its interval, as rendered
    assert {f"detail.headline.{block}.edge_control{part}" for block in ("baseline", "lora", "lora_minus_baseline")
            for part in ("", "_ci95_low", "_ci95_high")} <= {key for key, _, _ in rendered}
    for key, value, text in rendered:
        assert float(value) == values[key] and text.strip(), key
        if not key.endswith(("_lora_better", "_lora_worse", ".lora_better", ".lora_worse")):  # shown as percentages
            assert float(text) == pytest.approx(values[key], rel=5e-4), (key, text)
    verdicts = driver.execute_script(
        "return Array.from(document.querySelectorAll('#headline tr')).slice(1)"
        ".map(r => [r.cells[0].textContent, r.cells[r.cells.length - 1].textContent])")
    assert [label.split(" (")[0] for label, _ in verdicts] == [
        f"FID at n = {values['n']}", "KID", "CMMD", "LPIPS", "SSIM", "PSNR", "CLIP score", "edge F1", "edge control",
        "prompt colour match"]
    by_label = {label.split(" (")[0]: text for label, text in verdicts}
    stand_ins = ("KID", "CMMD", "LPIPS", "CLIP score")
    assert [by_label[label] for label in stand_ins] == ["no verdict: a random stand-in backbone"] * 4, verdicts
    assert not any("stand-in" in by_label[label] for label in ("SSIM", "PSNR", "edge F1", "edge control",
                                                                "prompt colour match")), "pixels and edges keep theirs"
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


def headline_verdicts(text: str) -> dict[str, str]:
    """Each headline row's label and its last cell, parsed from the page."""
    table = text.split("<table id=headline>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in table.split("<tr>")[2:]:
        label = row.split("<th>", 1)[1].split(" <span", 1)[0]
        rows[label] = row.rsplit("<td", 1)[1].split(">", 1)[1].split("</td>", 1)[0]
    return rows


def test_stand_in_backbones_get_numbers_but_no_verdict(finished_project):
    """The demo's Inception, AlexNet and CLIP are random: the page shows their numbers, never
    "LoRA clearly better/worse" from them. With the real networks the verdicts come back."""
    p = finished_project
    verdicts = headline_verdicts(p.path("report").read_text(encoding="utf-8"))
    n = read_json(p.path("metrics"))["n"]
    assert list(verdicts) == [f"FID at n = {n}", "KID", "CMMD", "LPIPS", "SSIM", "PSNR (dB)", "CLIP score", "edge F1",
                              "edge control", "prompt colour match"]
    for label in (f"FID at n = {n}", "KID", "CMMD", "LPIPS", "CLIP score"):
        assert verdicts[label] == "no verdict: a random stand-in backbone", label
    colour = read_json(p.path("metrics_detail"))["lora_minus_baseline"]["colour_match"]
    assert verdicts["prompt colour match"] == ("LoRA clearly better" if colour["ci95_low"] > 0 else
                                               "no clear difference" if colour["ci95_high"] >= 0 else "LoRA clearly worse")
    page = p.path("report").read_text(encoding="utf-8")
    assert "FID, KID, CMMD, LPIPS, CLIP score: computed with random stand-in networks" in page
    detail = read_json(p.path("metrics_detail"))
    keys = Page(page).values
    for name in ("edge_precision", "edge_recall"):  # every delta on the page has its interval
        assert {f"detail.lora_minus_baseline.{name}.{k}" for k in ("mean", "ci95_low", "ci95_high")} <= set(keys), name
    assert {f"detail.headline.lora_minus_baseline.{k}_p_value" for k in ("fid", "kid")} <= set(keys)

    detail["backbones"] = {"fid": "clean-fid inception-2015-12-05 (sha256 f58cb9b6ec32)",
                           "lpips": "lpips v0.1 alex", "clip": "openai/clip-vit-base-patch32@3d74acf9"}
    p.path("metrics_detail").write_text(json.dumps(detail))
    p.run("report")
    page = p.path("report").read_text(encoding="utf-8")
    verdicts = headline_verdicts(page)
    assert "stand-in" not in page and all("verdict" not in v for v in verdicts.values()), verdicts
    assert all(v in ("LoRA clearly better", "LoRA clearly worse", "no clear difference") for v in verdicts.values())


def test_several_images_per_condition_show_their_seed_variance(finished_project):
    """generate.images_per_condition 2: the page says so and shows each number's seed spread, every
    value metrics_detail.json's; with one image per condition there is no such table."""
    import shutil
    from stages.common import dataset
    p = finished_project
    assert "id=seeds" not in p.path("report").read_text(encoding="utf-8")
    paths = p.typed().paths
    for c in dataset.load_eval_configs(p.path("eval_data")):  # a second image per condition: the other variant's
        for variant, other in zip(dataset.VARIANTS, reversed(dataset.VARIANTS), strict=True):
            shutil.copy(dataset.generated_path(paths, other, c["index"]),
                        dataset.generated_path(paths, variant, c["index"], 1))
    p.run("metrics", generate__images_per_condition=2)
    p.run("report", generate__images_per_condition=2)
    text = p.path("report").read_text(encoding="utf-8")
    assert "id=seeds" in text and "2 seeds (images per condition)" in text
    page, values = Page(text), shown(p)
    for variant in dataset.VARIANTS:
        for name in ("fid", "kid", "cmmd", "lpips", "ssim", "edge_control"):
            key = f"detail.seed_variance.{variant}.{name}.seed_sd"
            assert page.values[key] == values[key] > 0, key

"""fashion-studio (`make studio`): a local web page for trying the pipeline's models on new inputs.

    fashion-studio                      # http://127.0.0.1:7860
    fashion-studio --port 8000 --host 0.0.0.0

Upload a photo (canny edges, with threshold sliders and a live preview) or an edge sketch, or pick
a random eval sample; write a prompt or take one of the eval prompts; set steps, guidance, seed,
image count and LoRA scale; and get baseline and LoRA side by side for the same seeds. It is
`fashion-generate` behind a page: the same edge maps, the same pipeline, the same seeds as the
generate stages. Models are read from the pipeline's models/ offline and loaded on the first
generation (and again whenever the LoRA file changes, e.g. after `dvc repro`).

Every error reaches the page as one line (`{"error": ...}`): models missing, an unreadable upload,
an empty prompt, a knob out of range.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import gc
import io
import random
import sys
import threading
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, Field

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import load_rgb
from stages.common.params import PARAMS_FILE, load_params
from stages.common.runtime import device
from fashion.sketch import (ModelsMissing, check_models, draw_pair, edge_map, load_pipeline, read_image,
                                  side_by_side)

PAGE = Path(__file__).with_name("studio.html")
MAX_UPLOAD = 20 * 2 ** 20  # bytes of image; a phone photo is a few MB
MAX_IMAGES = 8
PRESETS = 40


class EdgeRequest(BaseModel):
    image: str = Field(description="the upload as a data URL (or bare base64)")
    name: str = "upload"
    mode: Literal["photo", "sketch"] = "photo"
    low: int = Field(100, ge=0, le=1000)
    high: int = Field(200, ge=0, le=1000)


class GenerateRequest(EdgeRequest):
    prompt: str
    steps: int = Field(20, ge=1, le=200)
    guidance: float = Field(7.5, ge=0, le=30)
    seed: int = Field(0, ge=0, lt=2 ** 63)
    count: int = Field(1, ge=1, le=MAX_IMAGES)
    lora_scale: float = Field(1.0, ge=0, le=2)


def png_data_url(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def decode_upload(data: str, name: str):
    """The bytes of a data URL (or bare base64) upload, as a file object for PIL."""
    payload = data
    if data.startswith("data:"):
        _, comma, payload = data.partition(",")
        if not comma:
            raise StageError(f"{name}: the upload is not a data URL with a payload; choose the file again")
    if not payload:
        raise StageError(f"{name}: empty upload; choose a PNG or JPEG photo or sketch")
    if len(payload) > MAX_UPLOAD * 4 // 3 + 4:
        raise StageError(f"{name}: larger than {MAX_UPLOAD // 2 ** 20} MB; upload a smaller image")
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise StageError(f"{name}: the upload is not valid base64; choose the file again") from None


class Studio:
    """The page's handlers, without the web server: each takes and returns plain data."""

    def __init__(self):
        self.lock = threading.Lock()  # one generation at a time: the pipeline is not re-entrant
        self.pipe, self.pipe_key, self.params_mtime = None, None, None
        self.refresh()

    def refresh(self) -> None:
        """params.yaml again if it changed (a `dvc exp apply`, an edit): the studio draws as the stages would."""
        mtime = Path(PARAMS_FILE).stat().st_mtime_ns
        if mtime != self.params_mtime:
            self.params, self.params_mtime = load_params(), mtime
            self.paths = self.params.paths

    def models_problem(self) -> str | None:
        try:
            check_models(self.paths)
        except StageError as err:
            return str(err)
        return None

    def info(self) -> dict:
        self.refresh()
        g, c = self.params.generate, self.params.canny
        presets = []
        if Path(self.paths.eval_data, dataset.EVAL_CONFIGS).is_file():
            for config in dataset.load_eval_configs(self.paths.eval_data):
                if config["prompt"] not in presets:
                    presets.append(config["prompt"])
        return {"resolution": self.params.extract.resolution, "presets": presets[:PRESETS],
                "samples": len(presets) > 0, "models_problem": self.models_problem(),
                "defaults": {"low": c.low_threshold, "high": c.high_threshold, "steps": g.steps,
                             "guidance": g.guidance_scale, "seed": g.seed, "count": 1, "lora_scale": g.lora_scale},
                "limits": {"count": MAX_IMAGES}}

    def edges(self, request: EdgeRequest) -> tuple[Image.Image, list[str]]:
        if request.mode == "photo" and request.low > request.high:
            raise StageError(f"canny thresholds: low {request.low} > high {request.high}; lower the low one")
        image = read_image(decode_upload(request.image, request.name), request.name)
        return edge_map(image, self.params.extract.resolution, request.mode == "sketch", request.low, request.high)

    def preview(self, request: EdgeRequest) -> dict:
        edges, notes = self.edges(request)
        return {"edges": png_data_url(edges), "notes": [n.text for n in notes]}

    def sample(self, seed: int | None = None) -> dict:
        """A random eval sample: its ground-truth photo (canny at the default thresholds gives
        exactly its eval edge map) and its prompt."""
        if not Path(self.paths.eval_data, dataset.EVAL_CONFIGS).is_file():
            raise StageError(f"{self.paths.eval_data}: no eval set yet; run `make demo` or `dvc pull` first")
        config = random.Random(seed).choice(dataset.load_eval_configs(self.paths.eval_data))
        photo = Image.fromarray(load_rgb(dataset.gt_path(self.paths.eval_data, config["index"])))
        return {"index": config["index"], "prompt": config["prompt"], "image": png_data_url(photo),
                "name": f"eval {config['index']:06d}", "seed": self.params.generate.seed + config["index"]}

    def pipeline(self, dev):
        """Loaded once, and again when the models, the LoRA or the generate params changed (a new
        `dvc repro`). A few dozen stat() calls: nothing next to a generation."""
        g = self.params.generate
        key = (g.scheduler, g.precision, *(f.stat().st_mtime_ns for folder in (
            self.paths.base_model, self.paths.controlnet, self.paths.lora) for f in sorted(Path(folder).rglob("*"))))
        if self.pipe is None or key != self.pipe_key:
            self.pipe = None  # freed before the new one loads: two pipelines may not fit a small GPU
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            log.info("studio: loading the models from %s, %s and %s", self.paths.base_model, self.paths.controlnet,
                     self.paths.lora)
            self.pipe = load_pipeline(self.paths, g, g.scheduler, dev)
            self.pipe_key = key
        return self.pipe

    def generate(self, request: GenerateRequest) -> dict:
        prompt = request.prompt.strip()
        if not prompt:
            raise StageError("prompt: empty; describe the garment, e.g. 'Long sleeve dress in red'")
        edges, notes = self.edges(request)
        seeds = [request.seed + k for k in range(request.count)]
        dev = device()
        with self.lock:
            self.refresh()
            check_models(self.paths)
            cfg = dataclasses.replace(self.params.generate, steps=request.steps, guidance_scale=request.guidance)
            baseline, lora = draw_pair(self.pipeline(dev), edges, prompt, seeds, cfg, dev, request.lora_scale)
        sheet = side_by_side([[edges, b, l] for b, l in zip(baseline, lora, strict=True)])
        log.info("studio: %d seeds from %d for %r (%d steps, guidance %g, LoRA scale %g)", len(seeds), seeds[0],
                 prompt, request.steps, request.guidance, request.lora_scale)
        return {"edges": png_data_url(edges), "notes": [n.text for n in notes], "sheet": png_data_url(sheet),
                "results": [{"seed": s, "baseline": png_data_url(b), "lora": png_data_url(l)}
                            for s, b, l in zip(seeds, baseline, lora, strict=True)]}


def app(studio: Studio | None = None):
    """The FastAPI app: the page at /, its handlers under /api."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    studio = studio or Studio()
    api = FastAPI(title="fashion-studio", docs_url=None, redoc_url=None)

    @api.exception_handler(StageError)
    async def stage_error(_, err: StageError):
        return JSONResponse({"error": str(err)}, status_code=503 if isinstance(err, ModelsMissing) else 400)

    @api.exception_handler(RequestValidationError)
    async def bad_request(_, err: RequestValidationError):
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "request"
        return JSONResponse({"error": f"{field}: {first['msg']}"}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):  # 404, 405: the page reads "error", not "detail"
        return JSONResponse({"error": f"{err.status_code}: {err.detail}"}, status_code=err.status_code)

    @api.middleware("http")
    async def guard(request, call_next):
        """Too large a body is refused before it is read; a crash is one line in the page and one
        traceback in the terminal (an exception handler would let Starlette log it twice)."""
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_UPLOAD * 4 // 3 + 2 ** 16:
            return JSONResponse({"error": f"upload larger than {MAX_UPLOAD // 2 ** 20} MB; choose a smaller image"},
                                status_code=413)
        try:
            return await call_next(request)
        except Exception as err:
            log.exception("studio: %s %s failed", request.method, request.url.path)
            message = " ".join(f"{type(err).__name__}: {err}".split())
            return JSONResponse({"error": f"{message} (the terminal has the traceback)"}, status_code=500)

    @api.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @api.get("/api/info")
    def info():
        return studio.info()

    @api.post("/api/edges")
    def edges(request: EdgeRequest):
        return studio.preview(request)

    @api.get("/api/sample")
    def sample(seed: int | None = None):
        return studio.sample(seed)

    @api.post("/api/generate")
    def generate(request: GenerateRequest):
        return studio.generate(request)

    return api


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="fashion-studio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to reach it from other machines")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise StageError("fashion-studio needs the studio extra: pip install -e '.[studio]' (or run `make studio`)")
    studio = Studio()
    if problem := studio.models_problem():
        log.warning("studio: %s; the page will say so until they are there", problem)
    log.info("studio: open http://%s:%d (Ctrl+C stops it); %s", args.host, args.port,
             "generation on " + str(device()))
    uvicorn.run(app(studio), host=args.host, port=args.port, log_level="warning")


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

"""fashion-studio (`make studio`): a local web page for trying the pipeline's models on new inputs.

    fashion-studio                      # http://127.0.0.1:7860
    fashion-studio --port 8000          # on a remote box: ssh -L 7860:127.0.0.1:7860 box, then the URL above

Upload a photo (canny edges, with threshold sliders and a live preview) or an edge sketch, or pick
a random eval sample; write a prompt or take one of the eval prompts; set steps, guidance, seed,
image count and LoRA scale; and get baseline and LoRA side by side for the same seeds. It is
`fashion-generate` behind a page: the same edge maps, the same pipeline, the same seeds as the
generate stages. Models are read from the pipeline's models/ offline and loaded on the first
generation (and again whenever the LoRA file changes, e.g. after `dvc repro`).

Every error reaches the page as one line (`{"error": ...}`): models missing, an unreadable upload,
an empty prompt, a knob out of range, a full queue.

It serves no one but its own machine by default, and guards what it decodes and holds:
uploads are decoded only as PNG, JPEG or WebP, two at a time, at most 25 megapixels; a request body
is cut off at 413 as it arrives (chunked or not); a few generations wait in line, more get 429; only
`Host: 127.0.0.1`, `localhost` or `[::1]` is answered (DNS rebinding), plus each `--allow-host`; and a
non-loopback `--host` needs a token on every /api/ call (`--token`, or one generated and printed in
the URL, as Jupyter does), which the page takes from its own `?token=`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import gc
import hmac
import io
import json
import random
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, Field, field_validator

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import load_rgb
from stages.common.params import PARAMS_FILE, is_loopback, load_params
from stages.common.runtime import device
from fashion.sketch import (ACCEPTED, ModelsMissing, Note, check_models, draw_pair, edge_map, load_pipeline,
                           prompt_notes, read_image, side_by_side)

PAGE = Path(__file__).with_name("studio.html")
MAX_UPLOAD = 20 * 2 ** 20  # bytes of image; a phone photo is a few MB
MAX_BASE64 = MAX_UPLOAD * 4 // 3 + 4  # the upload as base64, padding included
MAX_BODY = MAX_BASE64 + 2 ** 16  # and the rest of the request
MAX_IMAGES = 8
PRESETS = 40
DECODES, DECODES_WAITING = 2, 8  # a decode of 25 MP (sketch.MAX_PIXELS) peaks at 0.1-0.2 GB
GENERATIONS_WAITING = 4  # behind the one drawing; each holds its upload while it waits
MAX_PROMPT = 2000  # characters; CLIP reads 77 tokens, a few hundred characters
MAX_NAME = 200
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # the Host names always answered
MIN_TOKEN = 16  # characters of a --token: a guessable one would be no door at all
# Connections at once (uvicorn answers 503 beyond): each may hold an upload of up to MAX_BODY while it is
# read and parsed, before any line above counts it. A page uses a few.
MAX_CONNECTIONS = 16


class EdgeRequest(BaseModel):
    image: str = Field(description="the upload as a data URL (or bare base64)")
    name: str = Field("upload", max_length=MAX_NAME)
    mode: Literal["photo", "sketch"] = "photo"
    low: int = Field(100, ge=0, le=1000)
    high: int = Field(200, ge=0, le=1000)

    @field_validator("name")
    @classmethod
    def one_line(cls, name: str) -> str:  # errors and notes start with it
        return " ".join(name.split()) or "upload"


class GenerateRequest(EdgeRequest):
    prompt: str = Field(max_length=MAX_PROMPT)
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
        raise StageError(f"{name}: empty upload; choose a {ACCEPTED} photo or sketch")
    if len(payload) > MAX_BASE64:
        raise StageError(f"{name}: larger than {MAX_UPLOAD // 2 ** 20} MB; upload a smaller image")
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise StageError(f"{name}: the upload is not valid base64; choose the file again") from None


class Busy(StageError):
    """The line for a decode or a generation is full: the studio answers 429."""


class Line:
    """A semaphore with a bounded line: at most `slots` holders at a time, at most `waiting` more
    waiting for one; one more is turned away at once (Busy) rather than left waiting with its upload
    in memory. `with line.place() as turn:` holds a place (the work before the turn counts too),
    then `with turn:` waits for a slot."""

    def __init__(self, slots: int, waiting: int, busy: str):
        self.turn = threading.BoundedSemaphore(slots)
        self.room, self.busy = slots + waiting, busy
        self.count, self.count_lock = 0, threading.Lock()

    @contextlib.contextmanager
    def place(self):
        with self.count_lock:
            if self.count >= self.room:
                raise Busy(self.busy)
            self.count += 1
        try:
            yield self.turn
        finally:
            with self.count_lock:
                self.count -= 1


class Studio:
    """The page's handlers, without the web server: each takes and returns plain data."""

    def __init__(self):
        # Handlers run on a thread pool, so these are threading primitives.
        self.decodes = Line(DECODES, DECODES_WAITING, f"busy: {DECODES} uploads are being read and {DECODES_WAITING} "
                            "more wait; try again in a moment")
        # one generation at a time: the pipeline is not re-entrant
        self.generations = Line(1, GENERATIONS_WAITING, f"busy: a generation is running and {GENERATIONS_WAITING} "
                                "more wait; try again when they are done")
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
                "models_loaded": self.models_loaded(),
                "defaults": {"low": c.low_threshold, "high": c.high_threshold, "steps": g.steps,
                             "guidance": g.guidance_scale, "seed": g.seed, "count": 1, "lora_scale": g.lora_scale},
                "limits": {"count": MAX_IMAGES}}

    def edges(self, request: EdgeRequest) -> tuple[Image.Image, list[str]]:
        if request.mode == "photo" and request.low > request.high:
            raise StageError(f"canny thresholds: low {request.low} > high {request.high}; lower the low one")
        with self.decodes.place() as turn, turn:
            image, notes = read_image(decode_upload(request.image, request.name), request.name,
                                      self.params.extract.resolution, request.mode == "sketch")
            edges, more = edge_map(image, request.mode == "sketch", request.low, request.high)
        return edges, notes + more

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

    def models_key(self) -> tuple:
        """What the loaded pipeline was made from: a few dozen stat() calls, nothing next to a generation."""
        g = self.params.generate
        return (g.scheduler, g.precision, *(f.stat().st_mtime_ns for folder in (
            self.paths.base_model, self.paths.controlnet, self.paths.lora) for f in sorted(Path(folder).rglob("*"))))

    def pipeline(self, dev):
        """Loaded once, and again when the models, the LoRA or the generate params changed (a new
        `dvc repro`)."""
        key = self.models_key()
        if self.pipe is None or key != self.pipe_key:
            self.pipe = None  # freed before the new one loads: two pipelines may not fit a small GPU
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            log.info("studio: loading the models from %s, %s and %s", self.paths.base_model, self.paths.controlnet,
                     self.paths.lora)
            g = self.params.generate
            self.pipe = load_pipeline(self.paths, g, g.scheduler, dev)
            self.pipe_key = key
        return self.pipe

    def models_loaded(self) -> bool:
        try:  # outside the generation line: a folder that `dvc checkout` is rewriting only means "not yet"
            return self.pipe is not None and self.pipe_key == self.models_key()
        except OSError:
            return False

    def load(self) -> dict:
        """The models loaded ahead of a generation, so the page can say that the first one waits
        for them: whether this call loaded them (another page may have), and the seconds it took."""
        with self.generations.place() as turn, turn:
            self.refresh()
            check_models(self.paths)
            before, started = self.pipe, time.perf_counter()
            pipe = self.pipeline(device())
            return {"loaded": pipe is not before, "seconds": time.perf_counter() - started}

    def generate(self, request: GenerateRequest) -> dict:
        prompt = request.prompt.strip()
        if not prompt:
            raise StageError("prompt: empty; describe the garment, e.g. 'Long sleeve dress in red'")
        seeds = [request.seed + k for k in range(request.count)]
        dev = device()
        with self.generations.place() as turn:  # a full line is a 429 before any work
            edges, notes = self.edges(request)
            with turn:
                self.refresh()
                check_models(self.paths)
                cfg = dataclasses.replace(self.params.generate, steps=request.steps, guidance_scale=request.guidance)
                pipe = self.pipeline(dev)
                notes += [Note(n.level, f"prompt {n.text}") for n in prompt_notes(prompt, pipe.tokenizer)]
                baseline, lora = draw_pair(pipe, edges, prompt, seeds, cfg, dev, request.lora_scale)
        sheet = side_by_side([[edges, b, l] for b, l in zip(baseline, lora, strict=True)], seeds, prompt)
        log.info("studio: %d seeds from %d for %r (%d steps, guidance %g, LoRA scale %g)", len(seeds), seeds[0],
                 prompt, request.steps, request.guidance, request.lora_scale)
        return {"edges": png_data_url(edges), "notes": [n.text for n in notes], "sheet": png_data_url(sheet),
                "results": [{"seed": s, "baseline": png_data_url(b), "lora": png_data_url(l)}
                            for s, b, l in zip(seeds, baseline, lora, strict=True)]}


def host_name(host: str) -> str:
    """A Host header or a --host address as a URL names it: `[::1]:7860` -> `[::1]`, `::1` -> `[::1]`,
    `LocalHost:7860` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    if host.count(":") > 1:  # a bare IPv6 address
        return f"[{host}]"
    return host.partition(":")[0]


class Guard:
    """The studio's door, a pure ASGI middleware (it sees the request before anything reads it):
    a Host outside the allow-list gets 403 (a page elsewhere that rebinds its DNS name to this machine
    sends its own name); an /api/ call without the token, when there is one, 401 or 403; a body
    longer than MAX_BODY 413, on its Content-Length or, chunked, as soon as the bytes `receive()` has
    delivered pass it (the rest is never read: the connection closes). Every refusal is one line
    of JSON, as the page reads errors."""

    def __init__(self, app, hosts: set[str], token: str | None):
        self.app, self.hosts, self.token = app, hosts, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            return await refuse(send, 403, f"Host {host or '(none)'}: not served (a guard against DNS rebinding); "
                                           "open the studio as 127.0.0.1 or localhost, or restart fashion-studio "
                                           f"with --allow-host {host_name(host) or 'NAME'}")
        if self.token and scope["path"].startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                return await refuse(send, 401, "no token: open the studio by the URL it printed, with its ?token=")
            if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await refuse(send, 403, "wrong token: open the studio by the URL it printed, with its ?token=")
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            return await refuse(send, 413, TOO_LARGE)

        received, refused, started = 0, False, False

        async def capped_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    refused = True
                    if not started:
                        await refuse(send, 413, TOO_LARGE)
                    return {"type": "http.disconnect"}  # to the app, the client is gone: it stops reading
            return message

        async def send_unless_refused(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            if not refused:  # after the 413, the app's own answer (a 400 for the cut body) goes nowhere
                await send(message)

        await self.app(scope, capped_receive, send_unless_refused)


TOO_LARGE = f"upload larger than {MAX_UPLOAD // 2 ** 20} MB; choose a smaller image"


async def refuse(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def app(studio: Studio | None = None, allow_hosts: list[str] = (), token: str | None = None):
    """The FastAPI app: the page at /, its handlers under /api, behind the Guard: the Host names
    LOOPBACK_HOSTS and `allow_hosts`, and `token` (None: none) on every /api/ call."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    studio = studio or Studio()
    api = FastAPI(title="fashion-studio", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(StageError)
    async def stage_error(_, err: StageError):
        status = 503 if isinstance(err, ModelsMissing) else 429 if isinstance(err, Busy) else 400
        return JSONResponse({"error": str(err)}, status_code=status)

    @api.exception_handler(RequestValidationError)
    async def bad_request(request, err: RequestValidationError):
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "request"
        if field == "request" and "json" not in request.headers.get("content-type", ""):
            # FastAPI's strict Content-Type check: a cross-site form or a no-cors fetch cannot send JSON
            return JSONResponse({"error": "request: send it as Content-Type: application/json"}, status_code=415)
        return JSONResponse({"error": f"{field}: {first['msg']}"}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):  # 404, 405: the page reads "error", not "detail"
        return JSONResponse({"error": f"{err.status_code}: {err.detail}"}, status_code=err.status_code)

    @api.middleware("http")
    async def crash(request, call_next):
        """A crash is one line in the page and one traceback in the terminal (an exception handler
        would let Starlette log it twice)."""
        try:
            return await call_next(request)
        except Exception as err:
            log.exception("studio: %s %s failed", request.method, request.url.path)
            message = " ".join(f"{type(err).__name__}: {err}".split())
            return JSONResponse({"error": f"{message} (the terminal has the traceback)"}, status_code=500)

    api.add_middleware(Guard, hosts={*LOOPBACK_HOSTS, *map(host_name, allow_hosts)}, token=token)

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

    @api.post("/api/load")
    def load():
        return studio.load()

    @api.post("/api/generate")
    def generate(request: GenerateRequest):
        return studio.generate(request)

    return api


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="fashion-studio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on; another than loopback needs a token (see --token). "
                             "For a remote box prefer ssh -L 7860:127.0.0.1:7860 box")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this Host name (the name or address in the URL you open; "
                             "127.0.0.1, localhost and [::1] always are); repeatable. A name other than loopback "
                             "(a proxy, a tunnel) needs a token too")
    parser.add_argument("--token", help=f"the token every /api/ call must carry, {MIN_TOKEN} characters or more "
                                        "(default off loopback: a random one, printed in the URL)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise StageError("fashion-studio needs the studio extra: pip install -e '.[studio]' (or run `make studio`)")
    wildcard = host_name(args.host) in ("0.0.0.0", "[::]", "")
    allow_hosts = args.allow_host + ([] if wildcard else [args.host])
    if args.token is not None and len(args.token) < MIN_TOKEN:
        raise StageError(f"--token: {len(args.token)} characters; give at least {MIN_TOKEN} (e.g. `python -c "
                         "'import secrets; print(secrets.token_urlsafe(24))'`), or leave it out for a printed one")
    # Reachable from elsewhere, by its address or by a name a proxy or tunnel forwards: a token
    exposed = not all(is_loopback(host_name(host)) for host in [args.host, *args.allow_host])
    token = args.token or (secrets.token_urlsafe(24) if exposed else None)
    studio = Studio()
    if problem := studio.models_problem():
        log.warning("studio: %s; the page will say so until they are there", problem)
    shown = host_name(args.allow_host[0] if args.allow_host else "127.0.0.1" if wildcard else args.host)
    log.info("studio: open http://%s:%d/%s (Ctrl+C stops it); %s", shown, args.port,
             f"?token={token}" if token else "", "generation on " + str(device()))
    if wildcard and not args.allow_host:
        log.warning("studio: listening on %s, but it answers only Host 127.0.0.1, localhost and [::1]; add "
                    "--allow-host NAME for the name or address you open it by", args.host)
    uvicorn.run(app(studio, allow_hosts, token), host=args.host, port=args.port, log_level="warning",
                limit_concurrency=MAX_CONNECTIONS)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

"""Atomic file and folder writes, image and JSON I/O shared by every stage.

Stage outputs are complete or absent: everything is written under a temporary name in the
same folder and renamed into place only once it is whole, so a crash never leaves a partial
file that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def index_name(index: int, suffix: str = ".png") -> str:
    """Eval images are named by their 6-digit index: 000042.png."""
    return f"{index:06d}{suffix}"


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temp folder beside `path`; swap it in for `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_png(path: str | Path, image: np.ndarray | Image.Image) -> None:
    """Write an RGB PNG atomically."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` with LANCZOS (the seed recipe's Resize); a no-op when it already is."""
    scale = size / min(img.size)
    if scale == 1:
        return img
    return img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                      Image.Resampling.LANCZOS)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an HxWx3 uint8 RGB array."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def source_files() -> list[Path]:
    """Every .py file of the `stages` package: the code behind any output. Resume fingerprints
    hash all of it, a superset of a stage's DVC code deps, so stale partial work is never reused."""
    return sorted(Path(__file__).resolve().parents[1].rglob("*.py"))


def fingerprint(settings: dict, *inputs: str | Path) -> str:
    """A short hash of `settings` plus the bytes of every file in `inputs` (files or folders).

    Resumable stages store it beside their partial work: DVC reruns a stage both after a crash
    (resume) and after an input changed (start again), and only this tells the two apart.
    Hashing a real SD 1.5 folder takes seconds, next to minutes of GPU work.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for root in map(Path, inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() if root.is_dir() else b"")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]

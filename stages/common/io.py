"""Atomic file and folder writes, image and JSON I/O shared by every stage.

Stage outputs are complete or absent: everything is written under a temporary name in the
same folder and renamed into place only once it is whole, so a crash never leaves a partial
file that looks valid. Temporary names all look like `.<name>.<token>.tmp[.suffix]`: each writer
removes its own leftovers from a killed run before it starts, and .dvcignore keeps DVC from
ever tracking one. A rename is durable only once the file's bytes and then its folder's
entries are on the disk: without the fsyncs a power cut can leave the new name pointing at an
empty file, which looks whole. Files and folders are created with the usual 0666/0777 & ~umask, so a
teammate on a shared machine can read them. Images many at a time go through `ImageWriter`,
which runs `save_png` on a few threads so encoding overlaps the caller's next reads or draws.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common.errors import StageError, restore_hint

TEMP_MARK = ".tmp"  # every temporary name has it after its token; .dvcignore matches `.*.tmp` and `.*.tmp.*`
OLD_SUFFIX = ".old"  # a folder moved aside while its replacement moves in
COMMIT_SUFFIX = ".commit"  # the journal of a folder swap in progress
# zlib's fastest level, not PIL's default 6: PNG is lossless, so this trades only file size for
# encode time, and docs/image-writes.md measures both
PNG_COMPRESS_LEVEL = 1
# The only formats any image is decoded from (`Image.open(..., formats=IMAGE_FORMATS)`): the stages
# write PNG, users bring PNG, JPEG or WebP. Without the list PIL tries its ~40 other decoders, and
# renders an EPS, whatever its name, by running Ghostscript on it.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def index_name(index: int, suffix: str = ".png") -> str:
    """Eval images are named by their 6-digit index: 000042.png."""
    return f"{index:06d}{suffix}"


def _temp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_MARK}{suffix}")


def _leftover_pattern(name: str) -> re.Pattern:
    """What writers of `name` leave beside it when killed: temp files or folders, and `.old`.
    (A swap's journal is never a leftover: the next run finishes the swap.)"""
    return re.compile(rf"\.{re.escape(name)}(\.[0-9a-f]{{8}}{re.escape(TEMP_MARK)}(\.[^.]+)?|{re.escape(OLD_SUFFIX)})")


def public_path(path: str) -> str:
    """A path inside a temp folder, as the output it becomes: data/.edges.0a1b2c3d.tmp/x.png -> data/edges/x.png."""
    return re.sub(rf"(^|/)\.([^/]+)\.[0-9a-f]{{8}}{re.escape(TEMP_MARK)}(\.[^./]+)?(?=/|$)", r"\1\2", str(path))


# What some file systems (network ones, FUSE) answer to fsync on a folder, which POSIX does not
# require them to support: their folder entries are as durable as they get (PostgreSQL's
# fsync_fname ignores the same).
UNSYNCABLE_FOLDER = {errno.EINVAL, errno.EBADF, errno.ENOTSUP}


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries (names just created, renamed or deleted), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno in UNSYNCABLE_FOLDER and os.path.isdir(path):
            return
        err.filename = err.filename or str(path)  # EIO, ENOSPC: named, for run_cli's one line
        raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root`, folders after their contents: a whole new output folder
    on the disk before the rename that publishes it. (Files atomic_file wrote are already clean,
    so their fsync costs little.)"""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> None:
    """Delete what a killed writer of `path` left beside it (temp files or folders, `.old`)."""
    pattern = _leftover_pattern(path.name)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if pattern.fullmatch(stale.name):
            _remove(stale)


def remove_temps(folder: str | Path) -> None:
    """Delete every temp file a killed run left inside `folder` (a resumable output: its finished
    files stay, its half-written ones go)."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".*{TEMP_MARK}*"):
            _remove(stale)


@contextlib.contextmanager
def atomic_file(path: str | Path, clean: bool = True):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds, with the
    file's bytes on the disk first and, after the rename, its folder's entry.
    `clean=False` is for the many files of one folder, which its stage cleans once (a look per file
    would make writing N files cost N^2) and whose folder is synced once, by `atomic_dirs` or by a
    resumable stage's rerun, which redraws a file whose name a power cut lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_leftovers(path)
    tmp = _temp_name(path, path.suffix)  # the suffix keeps writers that infer the format happy
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0666 & ~umask, unlike mkstemp's 0600
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        if clean:
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _journal(paths: list[Path]) -> Path:
    return paths[0].with_name(f".{paths[0].name}{COMMIT_SUFFIX}")


def _finish_swap(journal: Path) -> None:
    """Complete a swap that a kill interrupted: the journal is written once every new folder is
    whole, so finishing it forward is always right, and doing it twice is harmless."""
    moves = [tuple(map(Path, move)) for move in read_json(journal)]
    for tmp, path, old in moves:
        if tmp.exists():
            if path.exists() and not old.exists():
                os.replace(path, old)
            os.replace(tmp, path)
    for parent in dict.fromkeys(path.parent for _, path, _ in moves):  # the new names, before the old data goes
        fsync(parent)
    for _, _, old in moves:
        _remove(old)
    journal.unlink()


@contextlib.contextmanager
def atomic_dirs(*paths: str | Path):
    """Yield one empty temp folder per path; swap them all in only if the block succeeds.

    Several folders commit as one unit, so train and eval data, say, never come from two
    different runs. Once the new folders are whole, a journal lists the moves; then every old
    folder moves aside, every new one moves in, and the old ones go. An error in between puts
    the old ones back; a kill in between is finished by the next run, from the journal.
    """
    paths = [Path(p) for p in paths]
    journal = _journal(paths)
    if journal.exists():
        _finish_swap(journal)
    remove_leftovers(journal)  # a journal half-written when killed: its swap never began
    temps = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(path)
            temps.append(_temp_name(path))
            temps[-1].mkdir(0o777)  # 0777 & ~umask, unlike mkdtemp's 0700
        yield temps
        moves = [(tmp, path, path.with_name(f".{path.name}{OLD_SUFFIX}")) for tmp, path in zip(temps, paths, strict=True)]
        for tmp in temps:  # whole on the disk before the journal says they are
            _fsync_tree(tmp)
        write_json(journal, [[str(p) for p in move] for move in moves])
        done = []
        try:
            for tmp, path, old in moves:
                if path.exists():
                    os.replace(path, old)
                    done.append((old, path))
            for tmp, path, old in moves:
                os.replace(tmp, path)
                done.append((path, tmp))
        except BaseException:
            for source, target in reversed(done):  # each move undone on its own, whatever the others do
                with contextlib.suppress(OSError):
                    os.replace(source, target)
            journal.unlink()
            raise
        for parent in dict.fromkeys(path.parent for path in paths):  # the new names, before the old data goes
            fsync(parent)
        for _, _, old in moves:
            _remove(old)
        journal.unlink()
    finally:
        for tmp in temps:
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temp folder beside `path`; swap it in for `path` only if the block succeeds."""
    with atomic_dirs(path) as (tmp,):
        yield tmp


def write_json(path: str | Path, data, finite: bool = False) -> None:
    """`finite`: refuse NaN and Infinity (not JSON; a metrics file holds null for what is unknown)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=not finite) + "\n", encoding="utf-8")


def read_json(path: str | Path):
    """A JSON file a stage wrote; a damaged one is one clear line, not a decoder traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not valid JSON ({err}); {restore_hint()}") from None


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets, even in a
# CSV: "=HYPERLINK(...)" in a dataset's description would run when a user opens per_sample.csv.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CSV_ESCAPE = "'"  # what spreadsheets themselves use to mark a cell as text; it does not show there


def csv_text(text: str) -> str:
    """A text cell a spreadsheet shows as text, never runs: a leading formula character gets a `'`
    before it. A text that starts with `'` gets one too, so `csv_text_read` is an exact inverse."""
    return CSV_ESCAPE + text if text.startswith((*FORMULA_PREFIXES, CSV_ESCAPE)) else text


def csv_text_read(text: str) -> str:
    """The text `csv_text` was given."""
    return text[1:] if text.startswith(CSV_ESCAPE) else text


def save_png(path: str | Path, image: np.ndarray | Image.Image) -> None:
    """Write an RGB PNG atomically: the one PNG encoder of every stage (ImageWriter calls it)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_file(path, clean=False) as tmp:  # image folders are cleaned once per stage
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_png(path: str | Path, image: np.ndarray | Image.Image) -> None:
    """save_png, with a failure that names the file it was writing."""
    try:
        save_png(path, image)
    except Exception as err:
        if isinstance(err, OSError) and err.filename is None:  # a failed write(): run_cli's one line names the file
            err.filename = str(path)
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"while writing {path}")
        raise


class ImageWriter:
    """`save_png` on a few threads, so a stage's image writes leave its critical path.

        with ImageWriter() as writer:
            for path, image in ...:
                writer.submit(path, image)  # returns at once unless `in_flight` images are waiting

    Pillow's zlib encoder releases the GIL, so two threads write nearly twice as fast as one
    (docs/image-writes.md). At most `in_flight` images are held at a time: `submit` waits for a
    slot, so memory stays flat however fast the caller produces. The first failed write is raised
    in the caller, naming its file, by the next `submit` or on leaving the block. Leaving the block
    waits for every write; leaving it on an exception drops the writes not yet started and waits
    for the running ones, so each file is whole or absent and no temp file is left.
    """

    def __init__(self, threads: int = 2, in_flight: int = 16):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="image-writer")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._errors: list[BaseException] = []

    def submit(self, path: str | Path, image: np.ndarray | Image.Image) -> None:
        """Queue `image` (a PIL image or a uint8 array, left unchanged until written) for `path`."""
        self._raise_first_error()
        self._slots.acquire()
        self._pool.submit(_write_png, path, image).add_done_callback(self._finished)

    def _finished(self, future: Future) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None:
            self._errors.append(future.exception())

    def _raise_first_error(self) -> None:
        if self._errors:
            raise self._errors[0]

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._pool.shutdown(wait=True, cancel_futures=error is not None)
        if error is None:
            self._raise_first_error()


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the header's metadata in sorted order. safetensors writes it
    from a Rust HashMap, in a new order in every process, so the same weights would get new bytes
    (and a new DVC hash) on every run."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])  # tensors in safetensors' own (sorted) order
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes; data offsets are relative to its end
    with atomic_file(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` with LANCZOS (the seed recipe's Resize); a no-op when it already is."""
    scale = size / min(img.size)
    if scale == 1:
        return img
    return img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                      Image.Resampling.LANCZOS)


def _image_error(err: Exception, path) -> str:
    return str(err).replace(f" {str(path)!r}", "")  # PIL repeats the path: "cannot identify image file '...'"


def check_images(files: list[Path], stage: str, size: tuple[int, int] | None = None) -> None:
    """Every image a stage is about to read must exist and be readable (PNG chunks and checksums,
    no decoding), and be `size` (width, height) when given: checked before any work, so a bad one
    never costs outputs made so far."""
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise StageError(f"{missing[0]}: not found ({len(missing)} missing); run `dvc repro {stage}`")
    for path in files:
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                img.verify()
                found = img.size
        except (OSError, ValueError, SyntaxError) as err:  # PIL reports a broken PNG as SyntaxError
            raise StageError(f"{path}: not a readable image ({_image_error(err, path)}); {restore_hint(stage)}") from None
        if size is not None and found != tuple(size):
            raise StageError(f"{path}: {found[0]}x{found[1]} px, but the ground truth is {size[0]}x{size[1]}; "
                             f"rerun `dvc repro {stage}`")


def check_no_strays(files: list[Path], stage: str) -> None:
    """The folder holding `files` has no other images: a stray one means it was made for another
    eval set, and pairing by index would silently compare the wrong images."""
    folder = Path(files[0]).parent
    expected = {Path(f).name for f in files}
    strays = sorted(p.name for p in folder.glob("[!.]*.png") if p.name not in expected)  # not temp files
    if strays:
        raise StageError(f"{folder / strays[0]}: not one of the {len(files)} eval images ({len(strays)} such); "
                         f"the folder is from another eval set: rerun `dvc repro {stage}`")


@contextlib.contextmanager
def open_image(path: str | Path):
    """An image file opened as one of IMAGE_FORMATS; a missing or damaged file is one clear line."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            yield img
    except FileNotFoundError:
        raise StageError(f"{path}: not found; {restore_hint()}") from None
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the disk itself: run_cli says so
        raise StageError(f"{path}: not a readable image ({_image_error(err, path)}); {restore_hint()}") from None


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an HxWx3 uint8 RGB array."""
    with open_image(path) as img:
        return np.array(img.convert("RGB"))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height), from the header."""
    with open_image(path) as img:
        return img.size


def source_files() -> list[Path]:
    """Every .py file of the `stages` package: the code behind any output. Resume fingerprints
    hash all of it, a superset of a stage's DVC code deps, so stale partial work is never reused."""
    return sorted(Path(__file__).resolve().parents[1].rglob("*.py"))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: dict, *inputs: str | Path) -> str:
    """A short hash of `settings` plus the bytes of every file in `inputs` (files or folders).

    Resumable stages store it beside their partial work: DVC reruns a stage both after a crash
    (resume) and after an input changed (start again), and only this tells the two apart.
    Hashing a real SD 1.5 folder takes seconds, next to minutes of GPU work.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for root in map(Path, inputs):
        if not root.exists():
            raise StageError(f"{root}: not found; `dvc repro` builds it")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() if root.is_dir() else b"")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]

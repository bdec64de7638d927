"""The FashionGen H5 as the untrusted file it is: its layout checked from the header alone.

A FashionGen file comes from the internet, so nothing is read before its header is checked:
- every dataset's bytes lie inside the file: HDF5 external storage, external links and virtual
  datasets would copy any local file (a credentials file, say) into the prompts or the images, and
  a filter that is not built in makes HDF5 search for and load a plugin library;
- its declared sizes are bounded: a 28 kB file can declare terabytes of images, and h5py allocates
  what a slice declares before it reads a byte.
Text is latin-1 bytes of shape (N, 1); decoding it as UTF-8 would silently drop é and ®.
"""

import math
from pathlib import Path

import h5py
import numpy as np
from h5py import h5l, h5z

from stages.common.errors import StageError

TEXT_KEYS = ("input_description", "input_name", "input_category")
READ_KEYS = ("input_image", "input_productID", *TEXT_KEYS)
# What a header may declare: far above FashionGen (293k rows of 256 px), small enough for any memory.
MAX_ROWS = 10_000_000  # 34x FashionGen; input_productID[:] (read whole) is then at most 80 MB
MAX_IMAGE_SIDE = 4096  # px, 16x FashionGen's: one row is then at most 48 MiB
MAX_TEXT_WIDTH = 64 * 1024  # bytes a text cell, over 160x FashionGen's widest (|S400 descriptions)
MAX_CHUNK_BYTES = 64 * 1024 ** 2  # HDF5 decodes a whole chunk to read one row of it: one 4096 px image
SLICE_BUDGET = 512 * 1024 ** 2  # bytes a covering slice may decode to; read_rows shrinks slices to fit
# Filters compiled into HDF5 or h5py: any other id makes HDF5 search for and load a plugin library.
BUILTIN_FILTERS = {h5z.FILTER_DEFLATE: "gzip", h5z.FILTER_SHUFFLE: "shuffle", h5z.FILTER_FLETCHER32: "fletcher32",
                   h5z.FILTER_SZIP: "szip", h5z.FILTER_NBIT: "nbit", h5z.FILTER_SCALEOFFSET: "scaleoffset",
                   h5z.FILTER_LZF: "lzf"}


def decode(cell) -> str:
    """One fixed-width latin-1 cell, of shape (1,) as in FashionGen or a scalar -> str."""
    return bytes(np.asarray(cell).reshape(-1)[0]).decode("latin-1").strip()


def open_h5(path: Path) -> h5py.File:
    if path.is_dir():
        raise StageError(f"extract.h5: {path} is a folder; set extract.h5 to the H5 file in it "
                         "(e.g. fashiongen_256_256_train.h5)")
    if not path.is_file():
        raise StageError(f"extract.h5: {path} not found; set extract.h5 in params.yaml to a FashionGen "
                         "H5 (e.g. fashiongen_256_256_train.h5), or run `dvc repro demo-data` for the demo")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = str(err).split("(")[0].strip().rstrip(":")
        raise StageError(f"extract.h5: {path} is not a readable HDF5 file ({reason}); a truncated "
                         "download? Compare its size with the source's and fetch it again") from None


def open_dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    """`f[key]`, refused unless its bytes lie inside the file, in chunks HDF5 decodes on its own. Reads
    the header only: links are inspected, never followed (`key in f` would open an external link)."""
    name, outside = key.encode(), None
    if not f.id.links.exists(name):
        raise StageError(f"{path}: key {key!r} missing; extract.h5 must point to a FashionGen H5")
    link = f.id.links.get_info(name).type
    if link == h5l.TYPE_EXTERNAL:
        file_name, target = (part.decode(errors="replace") for part in f.id.links.get_val(name))
        outside = f"an external link to {target} in {file_name}"
    elif link == h5l.TYPE_SOFT:
        outside = f"a soft link to {f.id.links.get_val(name).decode(errors='replace')}"
    elif link != h5l.TYPE_HARD:
        outside = f"a link of user-defined type {link}"
    elif not isinstance(dset := f[key], h5py.Dataset):
        raise StageError(f"{path}: {key} is a {type(dset).__name__.lower()}, not a dataset; extract.h5 must point to a "
                         "FashionGen H5")
    elif dset.external:
        outside = f"stored in an external file ({', '.join(file for file, _, _ in dset.external)})"
    elif dset.is_virtual:
        sources = sorted({source.file_name for source in dset.virtual_sources()})
        outside = f"a virtual dataset, its rows taken from {', '.join(sources)}"
    if outside:
        raise StageError(f"{path}: {key} is {outside}; a FashionGen H5 keeps every dataset inside itself, so "
                         f"{path} is not read: fetch it from its source again")
    pipeline = dset.id.get_create_plist()
    for code in (pipeline.get_filter(i)[0] for i in range(pipeline.get_nfilters())):
        if code not in BUILTIN_FILTERS:
            raise StageError(f"{path}: {key} needs HDF5 filter {code}, which HDF5 would load as a plugin library "
                             f"(only {', '.join(BUILTIN_FILTERS.values())} are read); rewrite it with gzip "
                             "(h5repack -f GZIP=4) or fetch it from its source again")
    chunk_bytes = math.prod(dset.chunks or ()) * dset.dtype.itemsize
    if dset.chunks and chunk_bytes > MAX_CHUNK_BYTES:
        raise StageError(f"{path}: {key} is stored in chunks of {chunk_bytes:,} bytes, above the {MAX_CHUNK_BYTES:,} "
                         f"(MAX_CHUNK_BYTES) read; rechunk it smaller (h5repack -l {key}:CHUNK=...; FashionGen "
                         "stores one image a chunk)")
    return dset


def check_layout(f: h5py.File, path: Path, resolution: int) -> int:
    """FashionGen's layout and sizes, from the header alone, before any work: returns the row count."""
    datasets = {key: open_dataset(f, key, path) for key in READ_KEYS}
    images = datasets["input_image"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise StageError(f"{path}: input_image is {images.dtype} of shape {images.shape}; expected uint8 "
                         "(N, H, W, 3) RGB as in FashionGen")
    rows = images.shape[0]
    if rows > MAX_ROWS:
        raise StageError(f"{path}: input_image declares {rows:,} rows, above the {MAX_ROWS:,} (MAX_ROWS) read; "
                         "FashionGen's training file has 260,490: fetch the file from its source again")
    if max(images.shape[1:3]) > MAX_IMAGE_SIDE:
        raise StageError(f"{path}: input_image declares {images.shape[2]}x{images.shape[1]} px images, above the "
                         f"{MAX_IMAGE_SIDE} px a side (MAX_IMAGE_SIDE) read; FashionGen's are 256 px: resize them or "
                         "fetch the file from its source again")
    if min(images.shape[1:3]) < resolution:
        raise StageError(f"extract.resolution: {resolution} px is above {path}'s {min(images.shape[1:3])} px "
                         "images; lower it rather than upscale")
    ids = datasets["input_productID"]
    if ids.shape not in ((rows,), (rows, 1)) or ids.dtype.kind not in "iu":
        raise StageError(f"{path}: input_productID is {ids.dtype} of shape {ids.shape}; expected integers of "
                         f"shape ({rows}, 1), one per input_image row")
    for key in TEXT_KEYS:
        column = datasets[key]
        if column.shape not in ((rows,), (rows, 1)) or column.dtype.kind != "S":
            raise StageError(f"{path}: {key} is {column.dtype} of shape {column.shape}; expected fixed-width "
                             f"bytes of shape ({rows}, 1), one per input_image row")
        if column.dtype.itemsize > MAX_TEXT_WIDTH:
            raise StageError(f"{path}: {key} declares cells of {column.dtype.itemsize:,} bytes, above the "
                             f"{MAX_TEXT_WIDTH:,} (MAX_TEXT_WIDTH) read; FashionGen's descriptions are |S400")
    for key, dset in datasets.items():
        check_stored(dset, key, path)
    return rows


def check_stored(dset: h5py.Dataset, key: str, path: Path) -> None:
    """Every byte `dset` declares is stored. HDF5 reads what was never written as zeros, so a few
    kB of header could otherwise have extract grind through terabytes of blank images (and write
    them to disk). Counts chunks in the file's index: no data is read."""
    if dset.chunks:
        declared = math.prod(math.ceil(n / c) for n, c in zip(dset.shape, dset.chunks, strict=True))
        stored, unit = dset.id.get_num_chunks(), "chunks"
    else:
        declared, stored, unit = dset.nbytes, dset.id.get_storage_size(), "bytes"
    if stored < declared:
        raise StageError(f"{path}: {key} declares shape {dset.shape}, but the file stores {stored:,} of its "
                         f"{declared:,} {unit}; a truncated or made-up file: fetch it from its source again")


def rows_per_slice(f: h5py.File, chunk: int) -> int:
    """`chunk` (extract.read_chunk) rows, fewer where they would decode to more than SLICE_BUDGET:
    256 rows of 256 px are 48 MiB, of 4096 px 12 GiB. check_layout's bounds keep it >= 10."""
    row_bytes = sum(f[key].dtype.itemsize * math.prod(f[key].shape[1:]) for key in READ_KEYS)
    return max(1, min(chunk, SLICE_BUDGET // row_bytes))

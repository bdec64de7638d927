"""Benchmark: `extract` on FashionGen-sized files, for throughput and peak memory, and the
image writer alone.

    python -m bench.extract [--rows 30000] [--workdir /tmp/fashion-bench] [--skip-large] [--levels]

Writes a synthetic FashionGen H5 of `--rows` rows with the project's own writer (the real file's
layout: one gzip chunk per 256x256x3 image, text fields (N, 1) latin-1 bytes), its drawn garments
given a photo's noise so that a chunk takes 55-70 kB as in the real file (clean drawings compress
to a few kB and make every image write look cheap), then a file 4x as large by copying its
compressed chunks under new product ids. Prints the writer's images/s on those images with 1 and
2 threads (what generation's writes see), and with `--levels` the PNG encode time and size of
every zlib level. Then runs the real stage on each file, as DVC would (`python -m stages.extract`
in a scratch project, 256 px), and prints images/s and peak RSS. The goals (issues 5 and 24, on a
2-core machine): >= 300 images/s end to end, peak RSS <= 1 GB and flat when the file is 4x
larger, and >= 100 images/s from the writer alone. Files are kept in --workdir and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import cv2
import h5py
import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.full_size_models import clip_bpe_merges  # noqa: E402
from stages.common.io import ImageWriter  # noqa: E402
from stages.demo import garments, kit  # noqa: E402

SIZE = garments.IMAGE_SIZE


def photo_like(draw, seed: int = 0):
    """`draw` with a photo's noise on top: a faint sensor noise on the white background and a
    textured, shaded garment, so an image compresses about as badly as a real photo (gzip chunks
    of 66 kB on average, 5-95%: 49-78 kB; the real file's average 54 kB). The noise is cut at a
    random offset from one fixed field and added with OpenCV's saturating add: 0.8 ms an image,
    next to 3.3 ms for the drawing and about 3 ms for h5py's gzip (30,000 rows: 4 minutes)."""
    rng = np.random.default_rng(seed)
    grain = rng.standard_normal((2 * SIZE, 2 * SIZE, 3), np.float32)
    shade = cv2.resize(rng.standard_normal((32, 32), np.float32), (2 * SIZE, 2 * SIZE),
                       interpolation=cv2.INTER_CUBIC)[..., None]  # light and shadow over the cloth
    garment_noise = np.rint(6 * grain + 20 * shade).astype(np.int16)
    background_noise = np.rint(0.6 * grain).astype(np.int16)

    def noisy(g: garments.Garment, pose: int) -> np.ndarray:
        image = draw(g, pose)
        y, x = rng.integers(0, SIZE, 2)
        window = np.s_[y:y + SIZE, x:x + SIZE]
        noise = garment_noise[window].copy()
        cv2.copyTo(background_noise[window], cv2.inRange(image, garments.BACKGROUND, garments.BACKGROUND), noise)
        return cv2.add(image, noise, dtype=cv2.CV_8U)

    return noisy


def write_base_file(path: Path, rows: int) -> None:
    """A FashionGen-schema file of exactly `rows` photo-like rows (the last product keeps fewer poses)."""
    products, total = [], 0
    for g in garments.make_garments(seed=1, products=rows):  # more than enough products
        take = min(g.poses, rows - total)
        products.append(dataclasses.replace(g, poses=take))
        total += take
        if total == rows:
            break
    tmp = path.with_suffix(".tmp")
    started = time.perf_counter()
    with mock.patch.object(garments, "draw", photo_like(garments.draw)):  # write_h5's own drawing, made noisy
        garments.write_h5(tmp, products)
    tmp.rename(path)
    print(f"wrote {path} ({rows} rows, {len(products)} products) in {time.perf_counter() - started:.0f} s")


def write_scaled_file(source: Path, path: Path, factor: int) -> None:
    """`factor` copies of `source`, product ids shifted per copy; image chunks copied compressed."""
    tmp = path.with_suffix(".tmp")
    with h5py.File(source) as f, h5py.File(tmp, "w") as g:
        rows = f["input_image"].shape[0]
        offset = int(f["input_productID"][:].max()) + 1
        for key in f:
            d = f[key]
            if key == "input_image":
                out = g.create_dataset(key, shape=(rows * factor, *d.shape[1:]), dtype=d.dtype, chunks=d.chunks,
                                       compression=d.compression)
                for i in range(rows):
                    mask, chunk = d.id.read_direct_chunk((i, 0, 0, 0))
                    for k in range(factor):
                        out.id.write_direct_chunk((k * rows + i, 0, 0, 0), chunk, mask)
            else:
                data = d[:]
                tiled = np.concatenate([data + k * offset if key == "input_productID" else data
                                        for k in range(factor)])
                g.create_dataset(key, data=tiled)
    tmp.rename(path)
    print(f"wrote {path} ({rows * factor} rows) by copying chunks")


def run_extract(workdir: Path, h5: Path, train_products: int, eval_products: int) -> dict:
    """The real stage in a scratch project; returns wall time, peak RSS and the split summary."""
    project = workdir / "project"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["extract"].update(h5=str(h5), resolution=256, train_products=train_products,
                             eval_products=eval_products)
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tokenizer = project / params["paths"]["base_model"] / "tokenizer"
    if not tokenizer.exists():
        try:
            kit.write_clip_tokenizer(tokenizer, clip_bpe_merges())  # the real CLIP vocabulary
        except RuntimeError:
            kit.write_clip_tokenizer(tokenizer)
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "stages.extract"], cwd=project,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(result.stderr)
    peak_kb = int(result.stderr.strip().splitlines()[-1])
    summary = json.loads((project / params["paths"]["split_summary"]).read_text())
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "summary": summary}


def sample_images(h5: Path, count: int) -> list[np.ndarray]:
    """The first `count` images of `h5`, and a line on how large its gzip chunks are."""
    with h5py.File(h5) as f:
        d = f["input_image"]
        chunk_kb = [d.id.get_chunk_info(i).size / 1000 for i in range(min(1000, d.shape[0]))]
        print(f"{h5.name}: gzip chunks of {np.mean(chunk_kb):.0f} kB on average "
              f"(5-95%: {np.percentile(chunk_kb, 5):.0f}-{np.percentile(chunk_kb, 95):.0f} kB)")
        return list(d[:count])


def report_levels(images: list[np.ndarray]) -> None:
    """PNG encode time (one thread, median over images of the best of 3) and size at each zlib level."""
    options = [("PIL default", {})] + [(f"level {level}", {"compress_level": level}) for level in range(10)]
    print(f"{'':<12} {'ms/image':>9} {'kB/image':>9}")
    for name, kwargs in options:
        times, sizes = [], []
        for image in map(Image.fromarray, images):
            best = np.inf
            for _ in range(3):
                buffer = io.BytesIO()
                started = time.perf_counter()
                image.save(buffer, format="PNG", **kwargs)
                best = min(best, time.perf_counter() - started)
            times.append(best)
            sizes.append(buffer.tell())
        print(f"{name:<12} {1000 * np.median(times):9.1f} {np.mean(sizes) / 1000:9.1f}")


def writer_rate(images: list[np.ndarray], folder: Path, threads: int) -> tuple[float, float]:
    """Images/s of ImageWriter writing `images` as PNGs into `folder` (emptied first), and the cores
    it kept busy: above 1 only if the encoder releases the GIL."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started, cpu = time.perf_counter(), time.process_time()
    with ImageWriter(threads=threads) as writer:
        for i, image in enumerate(images):
            writer.submit(folder / f"{i:06d}.png", image)
    wall = time.perf_counter() - started
    return len(images) / wall, (time.process_time() - cpu) / wall


def report(name: str, rows: int, run: dict) -> None:
    train, evaluation = run["summary"]["train"], run["summary"]["eval"]
    images = train["images"] + evaluation["images"]
    print(f"{name:<34} file {rows:>7} rows | train {train['images']:>6} img ({train['products']} products), "
          f"eval {evaluation['images']:>5} | {run['wall_s']:6.1f} s, {images / run['wall_s']:5.0f} images/s, "
          f"peak RSS {run['peak_rss_mb']:6.0f} MB | prompts cut to 77 tokens: {train['prompts_cut_to_77_tokens']}")


def products_for(h5: Path, train_images: int, eval_products: int) -> int:
    """Train products (after the eval hold-out, in the stage's own order) that give `train_images`."""
    from stages.extract import split_products

    with h5py.File(h5) as f:
        ids = f["input_productID"][:].reshape(-1)
    unique, counts = np.unique(ids, return_counts=True)
    order = np.random.default_rng(0).permutation(len(unique))
    per_product = counts[order[eval_products:]]
    train = int(np.searchsorted(np.cumsum(per_product), train_images)) + 1
    assert len(split_products(ids, train, eval_products, 0, str(h5))[0]) >= train_images
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--eval-products", type=int, default=3_000)
    parser.add_argument("--train-images", type=int, default=30_000, help="training images from the 4x file")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fashion-bench"))
    parser.add_argument("--skip-large", action="store_true", help="only the --rows file")
    parser.add_argument("--writer-images", type=int, default=600, help="images per writer measurement")
    parser.add_argument("--levels", action="store_true", help="also time PNG encoding at every zlib level")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, large = (args.workdir / f"fashiongen_photo_{args.rows}.h5",
                   args.workdir / f"fashiongen_photo_{4 * args.rows}.h5")
    if not base.exists():
        write_base_file(base, args.rows)
    images = sample_images(base, args.writer_images)
    if args.levels:
        report_levels(images[:60])
    for threads in (1, 2):
        rate, cores = writer_rate(images, args.workdir / "writer", threads)
        print(f"ImageWriter, {threads} thread{'s' * (threads > 1)}: {rate:5.0f} images/s, {cores:.1f} cores busy "
              f"({len(images)} images)")
    shutil.rmtree(args.workdir / "writer")
    with h5py.File(base) as f:
        all_products = len(np.unique(f["input_productID"][:]))
    runs = [(f"{args.rows} rows, every product", base, all_products - args.eval_products)]
    if not args.skip_large:
        if not large.exists():
            write_scaled_file(base, large, 4)
        runs += [(f"4x file, {args.train_images} train images", large,
                  products_for(large, args.train_images, args.eval_products)),
                 ("4x file, every product", large, 4 * all_products - args.eval_products)]
    for name, h5, train_products in runs:
        with h5py.File(h5) as f:
            rows = f["input_image"].shape[0]
        report(name, rows, run_extract(args.workdir, h5, train_products, args.eval_products))


if __name__ == "__main__":
    main()

"""extract: split a FashionGen H5 by product into training images and an eval set.

    python -m stages.extract

Reads `extract.h5` in slices (the real file is 51 GB decoded), shuffles *products* with
`extract.seed`, holds out `eval_products` of them (first pose each) and trains on all poses of
the next `train_products`, so no eval garment leaks into training. Text is latin-1 bytes of
shape (N, 1); decoding it as UTF-8 would silently drop é and ®.
"""

from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.io import atomic_dir, resize_shorter_side, save_png, write_json
from stages.common.params import load_params

REQUIRED_KEYS = ("input_image", "input_productID", "input_description", "input_name", "input_category")


def decode(cell) -> str:
    """One (1,)-shaped fixed-width latin-1 cell -> str."""
    return bytes(np.asarray(cell).reshape(-1)[0]).decode("latin-1").strip()


def make_prompt(description: str, name: str, style: str) -> str:
    if style == "name":
        return name
    if style == "first_clause":  # the seed recipe, minus its bytes-repr bug
        description = description.split(",")[0].strip()
    return description or name


def to_resolution(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` with LANCZOS, then a centre crop (FashionGen is square already)."""
    img = resize_shorter_side(Image.fromarray(image), size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def split_products(product_ids: np.ndarray, train: int, evaluate: int, seed: int, source: str):
    """Rows of the train products (all poses) and of the eval products (first pose each)."""
    unique, first_row = np.unique(product_ids, return_index=True)
    if train + evaluate > len(unique):
        raise StageError(f"extract: asked for {train} train + {evaluate} eval = {train + evaluate} products, "
                         f"but {source} has only {len(unique)}; lower extract.train_products or extract.eval_products")
    order = np.random.default_rng(seed).permutation(len(unique))
    eval_rows = np.sort(first_row[order[:evaluate]])
    train_rows = np.flatnonzero(np.isin(product_ids, unique[order[evaluate:evaluate + train]]))
    return train_rows, eval_rows


def read_rows(f: h5py.File, rows: np.ndarray, chunk: int, size: int, desc: str):
    """Yield (row, image, description, name, category) for sorted `rows`, reading `chunk` at a time."""
    for start in tqdm(range(0, len(rows), chunk), desc=desc, unit="chunk"):
        idx = rows[start:start + chunk]
        images = f["input_image"][idx]  # h5py fancy indexing wants increasing indices
        texts = [f[k][idx] for k in ("input_description", "input_name", "input_category")]
        for j, row in enumerate(idx):
            yield int(row), to_resolution(images[j], size), *(decode(t[j]) for t in texts)


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.extract, params.paths
    h5_path = Path(cfg.h5)
    if not h5_path.is_file():
        raise StageError(f"extract.h5: {h5_path} not found; set extract.h5 in params.yaml to a FashionGen "
                                "H5 (e.g. fashiongen_256_256_train.h5), or run `dvc repro demo-data` for the demo")
    with h5py.File(h5_path, "r") as f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise StageError(f"{h5_path}: key {missing[0]!r} missing; extract.h5 must point to a FashionGen H5")
        product_ids = f["input_productID"][:].reshape(-1)
        train_rows, eval_rows = split_products(product_ids, cfg.train_products, cfg.eval_products, cfg.seed,
                                               str(h5_path))

        with atomic_dir(paths.train_data) as train_dir:
            images = np.lib.format.open_memmap(train_dir / dataset.TRAIN_IMAGES, mode="w+", dtype=np.uint8,
                                               shape=(len(train_rows), cfg.resolution, cfg.resolution, 3))
            prompts = []
            for i, (_, image, description, name, _) in enumerate(
                    read_rows(f, train_rows, cfg.read_chunk, cfg.resolution, "extract train")):
                images[i] = image
                prompts.append(make_prompt(description, name, cfg.prompt))
            images.flush()
            del images
            write_json(train_dir / dataset.TRAIN_CAPTIONS, {
                "prompts": prompts, "product_ids": product_ids[train_rows].tolist(), "rows": train_rows.tolist()})

        with atomic_dir(paths.eval_data) as eval_dir:
            configs = []
            for index, (row, image, description, name, category) in enumerate(
                    read_rows(f, eval_rows, cfg.read_chunk, cfg.resolution, "extract eval")):
                gt = dataset.gt_path(eval_dir, index)
                save_png(gt, image)
                configs.append({"index": index, "image": gt.relative_to(eval_dir).as_posix(),
                                "prompt": make_prompt(description, name, cfg.prompt),
                                "product_id": int(product_ids[row]), "row": row, "name": name, "category": category})
            write_json(eval_dir / dataset.EVAL_CONFIGS, configs)

    log.info("extract: wrote %d train images (%d products) to %s and %d eval images to %s",
             len(train_rows), cfg.train_products, paths.train_data, len(eval_rows), paths.eval_data)


if __name__ == "__main__":
    run_cli(main)

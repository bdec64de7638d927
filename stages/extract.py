"""extract: split a FashionGen H5 by product into training images and an eval set.

    python -m stages.extract

Shuffles *products* with `extract.seed`, holds out `eval_products` of them (first pose each) and
trains on all poses of the next `train_products` (0: all the others), so no eval garment leaks
into training. `train_images` caps the training images: products are taken in the same shuffled
order until the cap is reached (the seed's "30k samples" were H5 rows, i.e. images). The
real file is 51 GB decoded: it is read once, front to back, in covering slices (h5py reads a
slice about 20x faster than the same rows picked by a list with gaps), and training images are
streamed to disk, so memory stays flat whatever the file's size. Both folders appear together or
not at all, with a split summary (`dvc metrics show`) beside them.

The file comes from the internet: stages/common/fashiongen.py checks its header before any data is
read (every dataset inside the file, declared sizes bounded).
"""

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.fashiongen import TEXT_KEYS, check_layout, decode, open_h5, rows_per_slice
from stages.common.io import ImageWriter, atomic_dirs, resize_shorter_side, write_json
from stages.common.params import load_params

MAX_GAP = 4  # rows: reading a few unwanted rows in a slice costs less than a second read call


def make_prompt(description: str, name: str, style: str) -> str:
    if style == "name":
        return name
    if style == "first_clause":  # the seed recipe, minus its bytes-repr bug
        description = description.split(",")[0].strip()
    return description or name


def to_resolution(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` with LANCZOS, then a centre crop (FashionGen is square already)."""
    if image.shape[:2] == (size, size):
        return image
    img = resize_shorter_side(Image.fromarray(image), size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def split_products(product_ids: np.ndarray, train: int, evaluate: int, seed: int, source: str, images: int = 0):
    """Rows of the train products (all poses, at most `images` in all) and of the eval products
    (first pose each). `train` 0 means every product not held out."""
    unique, first_row, product_of_row = np.unique(product_ids, return_index=True, return_inverse=True)
    if train + evaluate > len(unique) or evaluate >= len(unique):
        raise StageError(f"extract: asked for {train} train + {evaluate} eval = {train + evaluate} products, "
                         f"but {source} has only {len(unique)}; lower extract.train_products or extract.eval_products")
    order = np.random.default_rng(seed).permutation(len(unique))
    eval_rows = np.sort(first_row[order[:evaluate]])
    chosen = order[evaluate:evaluate + train] if train else order[evaluate:]
    train_rows = np.flatnonzero(np.isin(product_ids, unique[chosen]))
    if images:
        if len(train_rows) < images:
            raise StageError(f"extract.train_images: {images} asked for, but the {len(chosen)} train products have "
                             f"only {len(train_rows)} images; raise extract.train_products (0 takes all) or lower it")
        position = np.empty(len(unique), dtype=np.int64)
        position[chosen] = np.arange(len(chosen))
        # products in their shuffled order, each product's poses in file order, cut at the cap
        by_product = train_rows[np.lexsort((train_rows, position[product_of_row.reshape(-1)[train_rows]]))]
        train_rows = np.sort(by_product[:images])
    return train_rows, eval_rows


def blocks(rows: np.ndarray, chunk: int):
    """Split sorted `rows` into (start, stop, picks): covering slices of at most `chunk` rows, cut
    wherever the gap between wanted rows exceeds MAX_GAP."""
    first = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[i - 1] > MAX_GAP or rows[i] - rows[first] >= chunk:
            start = int(rows[first])
            yield start, int(rows[i - 1]) + 1, rows[first:i] - start
            first = i


def read_rows(f: h5py.File, rows: np.ndarray, chunk: int, size: int, path: Path):
    """Yield (row, image, description, name, category) for sorted `rows`, one covering slice at a time."""
    progress = tqdm(total=len(rows), desc="extract", unit="img")
    for start, stop, picks in blocks(rows, rows_per_slice(f, chunk)):
        try:
            images = f["input_image"][start:stop]
            texts = [f[k][start:stop] for k in TEXT_KEYS]
        except OSError as err:  # a corrupt or truncated chunk
            raise StageError(f"extract.h5: {path}: cannot read rows {start}-{stop - 1} "
                             f"({str(err).split('(')[0].strip()}); the file is damaged: fetch it again") from None
        for j in picks:
            yield start + int(j), to_resolution(images[j], size), *(decode(t[j]) for t in texts)
        progress.update(len(picks))
    progress.close()


def load_tokenizer(base_model: str):
    """SD 1.5's CLIP tokenizer, checked before the long pass over the file."""
    from transformers import CLIPTokenizer

    folder = Path(base_model) / dataset.TOKENIZER_DIR
    if not (folder / "vocab.json").is_file():
        raise StageError(f"{folder / 'vocab.json'}: not found; run `dvc repro fetch-models` first")
    return CLIPTokenizer.from_pretrained(folder)


def fit_prompts(prompts: list[str], tokenizer) -> tuple[list[str], int]:
    """Prompts cut to what CLIP reads (77 tokens with BOS and EOS), at a word boundary, once, here:
    training, generation and the CLIP score then see the same text, and diffusers never logs the
    cut-off tokens for every batch. Returns the prompts and how many were cut."""
    limit = tokenizer.model_max_length - 2  # BOS and EOS
    unique = sorted(set(prompts))
    encoded = tokenizer(unique, truncation=False, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    fitted = {}
    for prompt, offsets in zip(unique, encoded["offset_mapping"], strict=True):
        if len(offsets) <= limit:
            fitted[prompt] = prompt
            continue
        end = offsets[limit - 1][1]  # the last token that fits
        space = prompt.rfind(" ", 0, end)
        if prompt[end:end + 1].isalnum() and space > 0:  # mid-word: back off to the word's start
            end = space
        fitted[prompt] = prompt[:end].rstrip(" ,;:-")
    return [fitted[p] for p in prompts], sum(fitted[p] != p for p in prompts)


def side_summary(ids: list[int], categories: set[str], empty_descriptions: int, cut_prompts: int) -> dict:
    """Headline counts only: `dvc metrics show` puts every key in a column."""
    return {"products": len(set(ids)), "images": len(ids), "categories": len(categories),
            "empty_descriptions": empty_descriptions, "prompts_cut_to_77_tokens": cut_prompts}


def main() -> None:
    setup_logging()
    params = load_params()
    cfg, paths = params.extract, params.paths
    h5_path = Path(cfg.h5)
    tokenizer = load_tokenizer(paths.base_model)
    with open_h5(h5_path) as f, atomic_dirs(paths.train_data, paths.eval_data) as (train_dir, eval_dir):
        total = check_layout(f, h5_path, cfg.resolution)
        product_ids = f["input_productID"][:].reshape(-1)
        train_rows, eval_rows = split_products(product_ids, cfg.train_products, cfg.eval_products, cfg.seed,
                                               str(h5_path), cfg.train_images)
        rows = np.union1d(train_rows, eval_rows)  # one pass over the file for both sides
        is_eval = np.isin(rows, eval_rows)
        shape = (len(train_rows), cfg.resolution, cfg.resolution, 3)
        # Per training image only what captions.json needs; the rest is counted as it streams past.
        prompts, categories, empty = [], {"train": set(), "eval": set()}, Counter()
        configs = []
        # Plain buffered writes: a memmap's dirty pages would count against memory, 5 GB for 30k images.
        # Eval PNGs are encoded on the writer's threads while the next rows are read.
        with ImageWriter() as writer, (train_dir / dataset.TRAIN_IMAGES).open("wb") as images:
            np.lib.format.write_array_header_1_0(images, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for wanted_eval, (row, image, description, name, category) in zip(
                    is_eval, read_rows(f, rows, cfg.read_chunk, cfg.resolution, h5_path), strict=True):
                prompt = make_prompt(description, name, cfg.prompt)
                side = "eval" if wanted_eval else "train"
                categories[side].add(category)
                empty[side] += description == ""
                if wanted_eval:
                    index = len(configs)
                    gt = dataset.gt_path(eval_dir, index)
                    writer.submit(gt, image.copy())  # a view would hold its whole slice while it waits
                    configs.append({"index": index, "image": gt.relative_to(eval_dir).as_posix(), "prompt": prompt,
                                    "product_id": int(product_ids[row]), "row": row, "name": name,
                                    "category": category})
                else:
                    images.write(np.ascontiguousarray(image).tobytes())
                    prompts.append(prompt)
        prompts, train_cut = fit_prompts(prompts, tokenizer)
        eval_prompts, eval_cut = fit_prompts([c["prompt"] for c in configs], tokenizer)
        for config, prompt in zip(configs, eval_prompts, strict=True):
            config["prompt"] = prompt
        write_json(train_dir / dataset.TRAIN_CAPTIONS, {
            "prompts": prompts, "product_ids": product_ids[train_rows].tolist(), "rows": train_rows.tolist()})
        write_json(eval_dir / dataset.EVAL_CONFIGS, configs)
        summary = {
            "source_rows": total, "source_products": len(np.unique(product_ids)),
            "train": side_summary(product_ids[train_rows].tolist(), categories["train"], empty["train"], train_cut),
            "eval": side_summary([c["product_id"] for c in configs], categories["eval"], empty["eval"], eval_cut),
            "train_categories_not_in_eval": len(categories["train"] - categories["eval"]),
        }
    write_json(paths.split_summary, summary)  # once the folders it describes are in place

    log.info("extract: wrote %d train images (%d products) to %s and %d eval images to %s; summary in %s",
             len(train_rows), len(np.unique(product_ids[train_rows])), paths.train_data, len(eval_rows), paths.eval_data,
             paths.split_summary)


if __name__ == "__main__":
    run_cli(main)

"""Every bad input is one clear line, and costs nothing: a table of cases, one per way to get it wrong.

Each case starts from a project where every stage has run (the last good run), breaks one thing,
runs one stage under the real CLI wrapper (`run_cli`, as `python -m stages.<stage>` does) and checks:
- the exit code is 1;
- stderr ends with exactly one `error:` line, no traceback, naming the culprit (the regex);
- the workspace is unchanged, byte for byte, and no temporary file is left.
The cases of one stage share one copy of the finished project, put back byte for byte after each.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stages import extract
from stages.common import dataset, fashiongen
from stages.common.cli import run_cli
from stages.common.io import TEMP_MARK
from stages.common.dataset import LORA_WEIGHTS
from tests.conftest import EPS, Project


@dataclass
class Case:
    id: str
    stage: str  # module under stages/, generate_* included
    setup: object  # (project, monkeypatch) -> None
    message: str  # regex for what follows `error: `


def params(**overrides):
    return lambda p, mp: p.set({k.replace("__", "."): v for k, v in overrides.items()})


def params_text(old: str, new: str):
    """Edit params.yaml as text: YAML mistakes that a dict cannot express."""
    def setup(p, mp):
        text = (p.root / "params.yaml").read_text()
        assert old in text
        (p.root / "params.yaml").write_text(text.replace(old, new, 1))
    return setup


def both(*setups):
    def setup(p, mp):
        for one in setups:
            one(p, mp)
    return setup


def truncate(rel: str, keep: int = 100):
    def setup(p, mp):
        path = p.root / rel
        path.write_bytes(path.read_bytes()[:keep])
    return setup


def delete(rel: str):
    return lambda p, mp: (p.root / rel).unlink()


def copy(rel: str, to: str):
    return lambda p, mp: (p.root / to).write_bytes((p.root / rel).read_bytes())


def small_image(rel: str):
    return lambda p, mp: Image.new("RGB", (32, 32)).save(p.root / rel)


def drop_key(rel: str, block: str, key: str):
    """Delete `key` from the JSON file's dotted `block`."""
    def setup(p, mp):
        data = json.loads((p.root / rel).read_text())
        node = data
        for part in block.split("."):
            node = node[part]
        del node[key]
        (p.root / rel).write_text(json.dumps(data))
    return setup


def drop_first_row(rel: str):
    def setup(p, mp):
        lines = (p.root / rel).read_text().splitlines(keepends=True)
        (p.root / rel).write_text("".join(lines[:1] + lines[2:]))
    return setup


def env(name: str, value: str):
    return lambda p, mp: mp.setenv(name, value)


# --- FashionGen files with one thing wrong

def h5_variant(change):
    """A copy of the demo H5 with `change(arrays)` applied, set as extract.h5. A value may also be a
    link, or a function `(file, key)` that makes the entry itself."""
    def setup(p, mp):
        with h5py.File(p.path("demo_h5")) as f:
            arrays = {k: f[k][:] for k in fashiongen.READ_KEYS}
        change(arrays)
        with h5py.File(p.root / "bad.h5", "w") as f:
            for key, value in arrays.items():
                if callable(value):
                    value(f, key)
                else:
                    f[key] = value
        p.set({"extract.h5": "bad.h5"})
    return setup


def h5_bytes(content):
    def setup(p, mp):
        (p.root / "bad.h5").write_bytes(content(p.path("demo_h5").read_bytes()))
        p.set({"extract.h5": "bad.h5"})
    return setup


# --- hostile FashionGen files: bytes from outside the file, or sizes that only the header claims

SECRET = "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY"


def secrets(p, mp):
    """A local credentials file, and an H5 holding it as descriptions: what a hostile file points to."""
    (p.root / "credentials").write_text(f"[default]\n{SECRET}\n" * 10_000)
    with h5py.File(p.root / "other.h5", "w") as f:
        f["input_description"] = np.full((64, 1), SECRET.encode(), "S400")


def declared(shape, dtype, **options):
    """A dataset with a header but no data: `shape` costs nothing on disk."""
    return lambda f, key: f.create_dataset(key, shape, dtype, **options)


def external_storage(like: np.ndarray):
    """`like`'s shape and dtype, its bytes taken from the credentials file (HDF5 external storage)."""
    return declared(like.shape, like.dtype, external=[(str(Path("credentials").resolve()), 0, h5py.h5f.UNLIMITED)])


def virtual(like: np.ndarray):
    def make(f, key):
        layout = h5py.VirtualLayout(like.shape, like.dtype)
        layout[:] = h5py.VirtualSource("other.h5", "input_description", like.shape)
        f.create_virtual_dataset(key, layout)
    return make


def hostile(**entries):
    """The demo H5 with some entries replaced, each `arrays -> entry`, beside the secrets it points to."""
    return both(secrets, h5_variant(lambda d: d.update({key: make(d[key]) for key, make in entries.items()})))


OUTSIDE = r"; a FashionGen H5 keeps every dataset inside itself, so bad.h5 is not read: fetch it from its source again"
IMAGES = (1, 256, 256, 3)  # one chunk per image, as in FashionGen


def corrupt_last_eval_chunk(p, mp):
    """Garbage inside the gzip chunk of the last eval row: the read fails after most of the pass."""
    last_eval_row = dataset.load_eval_configs(p.path("eval_data"))[-1]["row"]
    damaged = p.root / "damaged.h5"
    damaged.write_bytes(p.path("demo_h5").read_bytes())
    with h5py.File(damaged) as f:
        info = f["input_image"].id.get_chunk_info(last_eval_row)
    with damaged.open("r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\xff" * 64)
    p.set({"extract.h5": "damaged.h5", "extract.seed": 1})  # new inputs, as a rerun would have


def not_lora(p, mp):
    save_file({"text_model.weight": torch.zeros(2, 2)}, p.path("lora") / LORA_WEIGHTS)


def no_space_on_the_second_edge(p, mp):
    """The disk fills while the writer's threads encode edge maps: the error reaches the stage."""
    from stages.common import io

    real, calls = io.save_png, []

    def save_png(path, image):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, image)
    mp.setattr(io, "save_png", save_png)


def disk_fault_on_fsync(p, mp):
    """The disk reports a fault when the new edge maps are flushed before their folder is published."""
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    mp.setattr(os, "fsync", fsync)


def not_png(fmt: str, rel: str):
    """Another format under a .png name: decoded by nothing (PIL would run Ghostscript for an EPS)."""
    def setup(p, mp):
        if fmt == "EPS":
            (p.root / rel).write_bytes(EPS)
        else:
            Image.new("RGB", (64, 64)).save(p.root / rel, format=fmt)
    return setup


UNET = "models/base/unet"
INCEPTION = "models/eval/inception/inception-2015-12-05.pt"
EDGE0 = "data/edges/000000.png"
NEW_STEPS = params(generate__steps=2)  # changed inputs: a good run would replace every image

CASES = [
    # --- extract: the FashionGen file
    Case("h5-missing", "extract", params(extract__h5="data/raw/missing.h5"),
         r"extract.h5: data/raw/missing.h5 not found; set extract.h5 in params.yaml"),
    Case("h5-is-a-folder", "extract", params(extract__h5="data/raw"), r"extract.h5: data/raw is a folder; set"),
    Case("h5-not-hdf5", "extract", h5_bytes(lambda b: b"product,description\n1,dress\n"),
         r"extract.h5: bad.h5 is not a readable HDF5 file \(.+\); a truncated download\?"),
    Case("h5-truncated", "extract", h5_bytes(lambda b: b[:100_000]), r"extract.h5: bad.h5 is not a readable HDF5"),
    Case("h5-corrupt-eval-chunk", "extract", corrupt_last_eval_chunk,
         r"extract.h5: damaged.h5: cannot read rows \d+-\d+ .*the file is damaged: fetch it again"),
    Case("h5-key-missing", "extract", h5_variant(lambda d: d.pop("input_productID")),
         r"bad.h5: key 'input_productID' missing; extract.h5 must point to a FashionGen H5"),
    Case("image-chw", "extract", h5_variant(lambda d: d.update(input_image=d["input_image"].transpose(0, 3, 1, 2))),
         r"bad.h5: input_image is uint8 of shape \(\d+, 3, 256, 256\); expected uint8 \(N, H, W, 3\) RGB"),
    Case("image-grayscale", "extract", h5_variant(lambda d: d.update(input_image=d["input_image"][..., 0])),
         r"bad.h5: input_image is uint8 of shape \(\d+, 256, 256\); expected"),
    Case("image-rgba", "extract", h5_variant(
        lambda d: d.update(input_image=np.concatenate([d["input_image"], d["input_image"][..., :1]], -1))),
         r"bad.h5: input_image is uint8 of shape \(\d+, 256, 256, 4\)"),
    Case("image-float32", "extract", h5_variant(lambda d: d.update(input_image=d["input_image"].astype(np.float32))),
         r"bad.h5: input_image is float32 of shape"),
    Case("image-uint16", "extract", h5_variant(lambda d: d.update(input_image=d["input_image"].astype(np.uint16))),
         r"bad.h5: input_image is uint16 of shape"),
    Case("fewer-ids-than-images", "extract", h5_variant(
        lambda d: d.update(input_productID=d["input_productID"][:-3])),
         r"bad.h5: input_productID is int\d+ of shape \(\d+, 1\); expected integers of shape \(\d+, 1\), one per"),
    Case("description-two-columns", "extract", h5_variant(
        lambda d: d.update(input_description=np.repeat(d["input_description"], 2, axis=1))),
         r"bad.h5: input_description is \|S\d+ of shape \(\d+, 2\); expected fixed-width bytes"),
    Case("name-not-bytes", "extract", h5_variant(lambda d: d.update(input_name=np.zeros((len(d["input_name"]), 1)))),
         r"bad.h5: input_name is float64"),
    Case("description-in-external-file", "extract", hostile(input_description=external_storage),
         r"bad.h5: input_description is stored in an external file \(/.+/credentials\)" + OUTSIDE),
    Case("image-in-external-file", "extract", hostile(input_image=external_storage),
         r"bad.h5: input_image is stored in an external file \(/.+/credentials\)" + OUTSIDE),
    Case("description-external-link", "extract",
         hostile(input_description=lambda d: h5py.ExternalLink("other.h5", "/input_description")),
         r"bad.h5: input_description is an external link to /input_description in other.h5" + OUTSIDE),
    Case("name-soft-link", "extract", hostile(input_name=lambda d: h5py.SoftLink("/input_description")),
         r"bad.h5: input_name is a soft link to /input_description" + OUTSIDE),
    Case("description-virtual-dataset", "extract", hostile(input_description=virtual),
         r"bad.h5: input_description is a virtual dataset, its rows taken from other.h5" + OUTSIDE),
    Case("category-is-a-group", "extract", hostile(input_category=lambda d: lambda f, key: f.create_group(key)),
         r"bad.h5: input_category is a group, not a dataset; extract.h5 must point to a FashionGen H5"),
    Case("image-plugin-filter", "extract", hostile(input_image=lambda d: declared(
        d.shape, np.uint8, chunks=IMAGES, compression=32015, allow_unknown_filter=True)),  # zstd's registered id
         r"bad.h5: input_image needs HDF5 filter 32015, which HDF5 would load as a plugin library \(only gzip, "
         r"shuffle, fletcher32, szip, nbit, scaleoffset, lzf are read\); rewrite it with gzip"),
    Case("image-huge-declared", "extract", hostile(
        input_image=lambda d: declared((1000, 40_000, 40_000, 3), np.uint8, chunks=IMAGES)),
         r"bad.h5: input_image declares 40000x40000 px images, above the 4096 px a side \(MAX_IMAGE_SIDE\) read"),
    Case("image-huge-chunks", "extract", hostile(
        input_image=lambda d: declared((len(d), 4096, 4096, 3), np.uint8, chunks=(2, 4096, 4096, 3))),
         r"bad.h5: input_image is stored in chunks of 100,663,296 bytes, above the 67,108,864 \(MAX_CHUNK_BYTES\)"),
    Case("rows-huge-declared", "extract", hostile(
        input_image=lambda d: declared((20_000_000, 256, 256, 3), np.uint8, chunks=IMAGES)),
         r"bad.h5: input_image declares 20,000,000 rows, above the 10,000,000 \(MAX_ROWS\) read"),
    Case("description-huge-width", "extract", hostile(input_description=lambda d: declared(d.shape, "S100000000")),
         r"bad.h5: input_description declares cells of 100,000,000 bytes, above the 65,536 \(MAX_TEXT_WIDTH\)"),
    Case("images-declared-not-stored", "extract", hostile(input_image=lambda d: declared(d.shape, np.uint8, chunks=IMAGES)),
         r"bad.h5: input_image declares shape \(\d+, 256, 256, 3\), but the file stores 0 of its \d+ chunks; a "
         r"truncated or made-up file: fetch it from its source again"),
    Case("ids-declared-not-stored", "extract", hostile(input_productID=lambda d: declared(d.shape, d.dtype)),
         r"bad.h5: input_productID declares shape \(\d+, 1\), but the file stores 0 of its \d+ bytes"),
    Case("resolution-above-source", "extract", params(extract__resolution=512),
         r"extract.resolution: 512 px is above data/raw/fashiongen_demo.h5's 256 px images; lower it"),
    Case("tokenizer-missing-extract", "extract", delete("models/base/tokenizer/vocab.json"),
         r"models/base/tokenizer/vocab.json: not found; run `dvc repro fetch-models` first"),
    Case("too-many-products", "extract", params(extract__train_products=15),
         r"extract: asked for 15 train \+ 4 eval = 19 products, but .* has only 16; lower extract.train_products"),
    # --- params.yaml
    Case("yaml-syntax", "train_lora", params_text("  max_steps: 4\n", "  max_steps: [4\n"),
         r"params.yaml:\d+:\d+: while parsing a flow sequence: expected ',' or '\]'.*; fix the YAML there"),
    Case("yaml-tab", "train_lora", params_text("  max_steps: 4\n", "\tmax_steps: 4\n"),
         r"params.yaml:\d+:1: while scanning for the next token: found character '\\t'"),
    Case("yaml-duplicate-key", "train_lora", params_text("  alpha: 4\n", "  alpha: 4\n  alpha: 8\n"),
         r"params.yaml:\d+:3: duplicate key 'alpha' \(also on line \d+\); delete one of the two"),
    Case("params-missing", "train_lora", lambda p, mp: (p.root / "params.yaml").unlink(),
         r"params.yaml: not found; run stages from the repository root"),
    Case("params-typo", "train_lora", params_text("  learning_rate:", "  learnin_rate:"),
         r"params.yaml: train.learnin_rate: unknown key; did you mean train.learning_rate\?"),
    Case("warmup-above-max-steps", "train_lora", params(train__warmup_steps=10),
         r"params.yaml: train.warmup_steps: must be >= 0 and <= train.max_steps \(4\)"),
    Case("validate-every-above-max-steps", "train_lora", params(train__validate_every=10),
         r"params.yaml: train.validate_every: 10 is above train.max_steps \(4\), so no validation would run after "
         r"step 0; use at most 4, or 0 to turn validation off"),
    Case("validations-too-many", "train_lora", params(train__max_steps=400, train__validate_every=2),
         r"params.yaml: train.validate_every: 2 validates 200 times in train.max_steps \(400\); at most 100: use at "
         r"least 4"),
    Case("validation-samples-above-the-eval-set", "train_lora", params(train__validation_samples=5),
         r"params.yaml: train.validation_samples: 5 is above the eval set's 4 products \(data/eval\); use at most 4"),
    Case("report-to-unknown", "train_lora", params(train__report_to=["wandb"]),
         r"params.yaml: train.report_to\[0\]: expected one of 'tensorboard', got 'wandb'"),
    Case("alpha-zero", "train_lora", params(train__alpha=0), r"params.yaml: train.alpha: must be positive"),
    Case("processes-do-not-divide-the-step", "train_lora", params(train__processes=3),
         r"params.yaml: train.processes: must divide batch_size x grad_accumulation \(4\) so that every process"),
    Case("generate-processes-zero", "generate_lora", params(generate__processes=0),
         r"params.yaml: generate.processes: must be at least 1"),
    Case("images-per-condition-do-not-divide-the-batch", "generate_baseline",
         params(generate__batch_size=4, generate__images_per_condition=3),
         r"params.yaml: generate.images_per_condition: 3 does not divide generate.batch_size \(4\), and a batch draws "
         r"whole conditions; use a batch_size that is a multiple of 3"),
    Case("images-per-condition-zero", "generate_lora", params(generate__images_per_condition=0),
         r"params.yaml: generate.images_per_condition: must be at least 1"),
    Case("beta1-above-one", "train_lora", params(train__adam_beta1=1.5),
         r"params.yaml: train.adam_beta1: must be in \[0, 1\)"),
    Case("beta2-one", "train_lora", params(train__adam_beta2=1.0), r"params.yaml: train.adam_beta2: must be in"),
    Case("weight-decay-negative", "train_lora", params(train__adam_weight_decay=-0.01),
         r"params.yaml: train.adam_weight_decay: must be >= 0"),
    Case("epsilon-zero", "train_lora", params(train__adam_epsilon=0), r"params.yaml: train.adam_epsilon: must be"),
    Case("learning-rate-nan", "train_lora", params(train__learning_rate=float("nan")),
         r"params.yaml: train.learning_rate: expected a finite number, got nan"),
    Case("guidance-inf", "generate_baseline", params(generate__guidance_scale=float("inf")),
         r"params.yaml: generate.guidance_scale: expected a finite number, got inf"),
    Case("lora-scale-nan", "generate_lora", params(generate__lora_scale=float("nan")),
         r"params.yaml: generate.lora_scale: expected a finite number"),
    Case("target-module-unknown", "train_lora", params(train__target_modules=["to_q", "to_zz"]),
         r"train.target_modules: 'to_zz' is not a module of the UNet; the UNet's attention projections are "
         r"to_k, to_out.0, to_q, to_v"),
    Case("target-module-not-a-layer", "train_lora", params(train__target_modules=["to_q", "to_out"]),
         r"train.target_modules: 'to_out' names a ModuleList, not a layer LoRA can wrap \(Linear, Conv or "
         r"Embedding\); the UNet's attention projections are to_k, to_out.0, to_q, to_v"),
    Case("text-encoder-target-module-unknown", "train_lora",
         params(train__text_encoder_rank=4, train__text_encoder_target_modules=["q_proj", "to_q"]),
         r"train.text_encoder_target_modules: 'to_q' is not a module of the text encoder; the text encoder's "
         r"layers are mlp.fc1, mlp.fc2, self_attn.k_proj, self_attn.out_proj, self_attn.q_proj, self_attn.v_proj"),
    Case("text-encoder-target-module-not-linear", "train_lora",
         params(train__text_encoder_rank=4, train__text_encoder_target_modules=["token_embedding"]),
         r"train.text_encoder_target_modules: 'token_embedding' names an Embedding, not a layer LoRA can wrap "
         r"\(Linear\); the text encoder's layers are mlp.fc1"),
    Case("device-unknown", "train_lora", env("FASHION_DEVICE", "gpu"),
         r"FASHION_DEVICE='gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    # --- several machines (launch.*)
    Case("machine-rank-beyond-machines", "train_lora", params(launch__machines=2, launch__machine_rank=2),
         r"params.yaml: launch.machine_rank: must be >= 0 and < launch.machines \(2\): machines are numbered from 0"),
    Case("machine-rank-env-beyond-machines", "train_lora",
         both(params(launch__machines=2, launch__main_address="127.0.0.1"), env("FASHION_MACHINE_RANK", "2")),
         r"FASHION_MACHINE_RANK=2, but launch.machines is 2: machines are numbered 0 to 1"),
    Case("main-address-missing", "generate_lora", params(launch__machines=2, launch__machine_rank=1),
         r"launch.main_address: empty, but launch.machines is 2; give machine 0's address"),
    Case("main-address-unreachable", "train_lora",
         params(launch__machines=2, launch__machine_rank=1, launch__main_address="127.0.0.1", launch__main_port=9,
                launch__connect_timeout=1),
         r"launch.main_address: 127.0.0.1:9 did not answer in 1 s \(.*\); start machine 0 first, check the "
         r"address and that the port is open between the machines, or raise launch.connect_timeout"),
    # --- models/ and the LoRA
    Case("unet-config-missing-train", "train_lora", delete(f"{UNET}/config.json"),
         rf"{UNET}/config.json: not found, so models/base is not an SD 1.5 diffusers folder; restore it with "
         r"`dvc checkout fetch-models`"),
    Case("unet-config-missing-generate", "generate_baseline", both(NEW_STEPS, delete(f"{UNET}/config.json")),
         rf"{UNET}/config.json: not found"),
    Case("unet-weights-corrupt", "generate_baseline",
         both(NEW_STEPS, truncate(f"{UNET}/diffusion_pytorch_model.safetensors", 1000)),
         r"models/base: does not load \(.+\); restore it with `dvc checkout fetch-models`"),
    Case("tokenizer-missing", "train_lora", delete("models/base/tokenizer/vocab.json"),
         r"models/base/tokenizer/vocab.json: not found"),
    Case("controlnet-weights-missing", "generate_baseline",
         both(NEW_STEPS, delete("models/controlnet/diffusion_pytorch_model.safetensors")),
         r"models/controlnet/diffusion_pytorch_model.safetensors \(or another fp32 weights file\): not found"),
    Case("lora-corrupt", "generate_lora", both(NEW_STEPS, truncate(f"models/lora/{LORA_WEIGHTS}", 50)),
         rf"models/lora/{LORA_WEIGHTS}: not a readable safetensors file \(.+\); restore it with "
         r"`dvc checkout train-lora` or rebuild it with `dvc repro -f train-lora`"),
    Case("lora-not-a-lora", "generate_lora", both(NEW_STEPS, not_lora),
         rf"models/lora/{LORA_WEIGHTS}: holds no UNet LoRA weights \(1 tensors\)"),
    Case("lora-missing", "generate_lora", both(NEW_STEPS, delete(f"models/lora/{LORA_WEIGHTS}")),
         rf"models/lora/{LORA_WEIGHTS}: not found; run `dvc repro train-lora` first"),
    Case("alexnet-corrupt", "metrics", truncate("models/eval/lpips/alexnet.pth", 500),
         r"models/eval/lpips/alexnet.pth: does not load"),
    Case("backbones-missing", "metrics", delete("models/eval/backbones.json"),
         r"models/eval/backbones.json: not found; run `dvc repro fetch-models`"),
    # --- TorchScript runs code when it loads: only the pinned file
    Case("inception-replaced", "metrics", copy("models/eval/lpips/alexnet.pth", INCEPTION),
         rf"{INCEPTION}: sha256 [0-9a-f]{{16}}\.\.\., not the pinned [0-9a-f]{{16}}\.\.\. \(models/sources.json\); "
         r"restore it with `dvc checkout fetch-models` or rebuild it with `dvc repro -f fetch-models`"),
    Case("inception-truncated", "metrics", truncate(INCEPTION, 500),
         rf"{INCEPTION}: sha256 [0-9a-f]{{16}}\.\.\., not the pinned"),
    Case("inception-pin-missing", "metrics", drop_key("models/sources.json", "inception", "sha256"),
         rf"models/sources.json: records no sha256 for {INCEPTION} \(an older fetch-models wrote it\), and "
         r"TorchScript loads only pinned; rerun `dvc repro fetch-models`"),
    Case("sources-missing-metrics", "metrics", delete("models/sources.json"),
         r"models/sources.json: not found; run `dvc repro fetch-models`"),
    Case("inception-sha256-prefix", "train_lora", params(models__inception_sha256="f58cb9b6"),
         r"params.yaml: models.inception_sha256: expected the file's full sha256 \(64 lowercase hex digits"),
    # --- credentials in URLs: refused, and never repeated
    Case("inception-url-with-password", "report",
         params(models__inception_url="https://alice:hunter2@mirror.example/i.pt"),
         r"params.yaml: models.inception_url: https://\.\.\.@mirror\.example/i\.pt carries a user name or password, "
         r"which would be copied into dvc\.lock(?!.*(alice|hunter2))"),
    Case("alexnet-url-presigned", "metrics",
         params(models__alexnet_url="https://bucket.example/a.pth?X-Amz-Signature=5ec7e7&token=tok99"),
         r"params.yaml: models.alexnet_url: https://bucket\.example/a\.pth\?\.\.\. carries a query string"
         r"(?!.*(5ec7e7|tok99))"),
    Case("clip-config-missing", "metrics", delete("models/eval/clip/config.json"),
         r"models/eval/clip/config.json: not found, so models/eval/clip is not a transformers CLIP folder"),
    # --- the data between stages
    Case("train-images-truncated", "train_lora", truncate("data/train/images.npy", 60),
         r"data/train/images.npy: not a readable .npy \(.+\); restore it with `dvc checkout extract`"),
    Case("eval-configs-damaged", "canny_edges", truncate("data/eval/eval_configs.json", 30),
         r"data/eval/eval_configs.json: not valid JSON \(.+\); restore it with `dvc checkout`"),
    Case("ground-truth-damaged", "canny_edges", truncate("data/eval/gt/000001.png", 60),
         r"data/eval/gt/000001.png: not a readable image \(.+\); restore it with `dvc checkout extract` or "
         r"rebuild it with `dvc repro -f extract`"),
    Case("edge-damaged", "generate_baseline", both(NEW_STEPS, truncate(EDGE0, 60)),
         rf"{EDGE0}: not a readable image \(.+\); restore it with `dvc checkout canny-edges`"),
    Case("edges-missing", "generate_lora", both(NEW_STEPS, delete(EDGE0)),
         rf"{EDGE0}: not found \(1 missing\); run `dvc repro canny-edges`"),
    Case("generated-missing-metrics", "metrics", delete("data/generated/lora/000002.png"),
         r"data/generated/lora/000002.png: not found \(1 missing\); run `dvc repro generate-lora`"),
    Case("generated-damaged-metrics", "metrics", truncate("data/generated/baseline/000000.png", 80),
         r"data/generated/baseline/000000.png: not a readable image"),
    Case("generated-stray-metrics", "metrics", copy("data/generated/lora/000001.png", "data/generated/lora/000099.png"),
         r"data/generated/lora/000099.png: not one of the \d+ eval images \(1 such\); the folder is from another eval "
         r"set: rerun `dvc repro generate-lora`"),
    Case("generated-wrong-size-metrics", "metrics", small_image("data/generated/baseline/000002.png"),
         r"data/generated/baseline/000002.png: 32x32 px, but the ground truth is 64x64; rerun "
         r"`dvc repro generate-baseline`"),
    Case("per-sample-missing-plots", "plots", delete("metrics/per_sample.csv"),
         r"metrics/per_sample.csv: not found; run `dvc repro metrics`"),
    Case("per-sample-other-eval-set", "plots", drop_first_row("metrics/per_sample.csv"),
         r"metrics/per_sample.csv: is not the per-sample table of these \d+ eval images; rerun `dvc repro metrics`"),
    Case("metrics-from-an-older-stage-report", "report",
         drop_key("metrics/metrics_detail.json", "headline.lora", "edge_f1_ci95_low"),
         r"metrics/metrics_detail.json: has no headline.lora.edge_f1_ci95_low \(an older metrics stage wrote it\?\); "
         r"rerun `dvc repro metrics`"),
    Case("generated-wrong-size-plots", "plots", small_image("data/generated/lora/000000.png"),
         r"data/generated/lora/000000.png: 32x32 px, but the ground truth is 64x64; rerun `dvc repro generate-lora`"),
    Case("metrics-missing-report", "report", delete("metrics/metrics_detail.json"),
         r"metrics/metrics_detail.json: not found; run `dvc repro metrics`"),
    Case("chart-missing-report", "report", delete("plots/deltas.png"),
         r"plots/deltas.png: not found; run `dvc repro plots`"),
    Case("card-lora-missing", "model_card", delete("models/lora/training_config.json"),
         r"models/lora/training_config.json: not found; run `dvc repro train-lora`"),
    Case("card-grid-missing", "model_card", delete("plots/samples_grid.png"),
         r"plots/samples_grid.png: not found; run `dvc repro plots`"),
    Case("train-log-missing", "report", delete("metrics/train/plots/metrics/loss.tsv"),
         r"metrics/train/plots/metrics: the training log is incomplete; run `dvc repro train-lora`"),
    Case("generated-missing-plots", "plots", delete("data/generated/baseline/000001.png"),
         r"data/generated/baseline/000001.png: not found \(1 missing\); run `dvc repro generate-baseline`"),
    # --- the disk
    Case("disk-full", "canny_edges", both(params(canny__low_threshold=50), no_space_on_the_second_edge),
         r"data/edges/000001.png: no space left on the device; free some .*then rerun "
         r"`dvc repro canny-edges`"),
    Case("disk-fault-on-fsync", "canny_edges", both(params(canny__low_threshold=50), disk_fault_on_fsync),
         # the first image whose fsync fails: the writer's threads race for it
         r"data/edges/\d{6}.png: input/output error from the disk or its file system; the stage's previous outputs "
         r"stay as they were: check the disk \(`dmesg`\), then rerun `dvc repro canny-edges`"),
    # --- images that are not what their name says
    Case("ground-truth-is-eps", "canny_edges", not_png("EPS", "data/eval/gt/000001.png"),
         r"data/eval/gt/000001.png: not a readable image \(cannot identify image file\); restore it with "
         r"`dvc checkout extract`"),
    Case("generated-is-bmp", "metrics", not_png("BMP", "data/generated/lora/000001.png"),
         r"data/generated/lora/000001.png: not a readable image \(cannot identify image file\)"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def run_stage(stage: str, monkeypatch) -> None:
    """`python -m stages.<stage>`, in-process: run_cli around the stage's main."""
    monkeypatch.setattr(sys, "argv", [f"/repo/stages/{stage}.py"])
    if stage.startswith("generate_"):
        from stages.common.generation import run

        run_cli(lambda: run(stage.removeprefix("generate_")))
    else:
        run_cli(importlib.import_module(f"stages.{stage}").main)


def folders(root: Path) -> set[Path]:
    return {d for d in root.rglob("*") if d.is_dir()}


def restore(root: Path, pristine: dict[str, bytes], pristine_folders: set[Path]) -> None:
    """Put `root` back to `pristine` (a snapshot): what a case added goes, what it changed returns."""
    now = snapshot(root)
    for name in now.keys() - pristine.keys():
        (root / name).unlink()
    for name, data in pristine.items():
        if now.get(name) != data:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    for folder in sorted(folders(root) - pristine_folders, key=lambda d: -len(d.parts)):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stage_copies(finished, tmp_path_factory):
    """One copy of the finished project per stage, with its pristine snapshot."""
    copies = {}

    def get(stage: str) -> tuple[Path, dict[str, bytes], set[Path]]:
        if stage not in copies:
            root = tmp_path_factory.mktemp(f"bad-{stage}")
            shutil.copytree(finished, root, dirs_exist_ok=True)
            copies[stage] = root, snapshot(root), folders(root)
        return copies[stage]
    return get


@pytest.fixture
def shared_project(request, stage_copies, monkeypatch) -> Project:
    """The case's stage's copy of the finished project, cwd set to it; restored afterwards."""
    root, pristine, pristine_folders = stage_copies(request.node.callspec.params["case"].stage)
    monkeypatch.chdir(root)
    yield Project(root)
    restore(root, pristine, pristine_folders)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_costs_nothing(case, shared_project: Project, monkeypatch, capsys):
    p = shared_project
    case.setup(p, monkeypatch)
    before = snapshot(p.root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_stage(case.stage, monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    assert re.fullmatch(f"error: {case.message}.*", errors[0]), errors[0]
    after = snapshot(p.root)
    assert after.keys() == before.keys(), f"added {after.keys() - before.keys()}, lost {before.keys() - after.keys()}"
    assert [name for name in after if after[name] != before[name]] == [], "outputs of the last good run changed"
    assert not [f for f in p.root.rglob(f"*{TEMP_MARK}*")], "no temporary file left"


def test_every_stage_that_reads_inputs_has_cases():
    """fetch-models' bad inputs (hub ids, local folders, checksums) are in test_model_sources.py;
    demo-data reads only params."""
    stages = {p.stem for p in Path(extract.__file__).parent.glob("*.py")} - {"__init__", "demo_data", "fetch_models"}
    assert stages == {c.stage for c in CASES}

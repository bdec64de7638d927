"""What a model folder holds, in one place: fetch-models installs folders by it and every loader
checks them by it before loading, so a missing file is named (`models/base/unet/config.json:
not found`) instead of surfacing as a loader's OSError about some other folder.

Installed folders hold plain names only (`*.fp16.*` files are installed without the `.fp16`),
so checking one is `select()` with the fp32 order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import StageError, restore_hint

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers, transformers, transformers .bin
WEIGHT_ORDER = {"fp16": (".fp16.safetensors", ".safetensors", ".fp16.bin", ".bin"), "fp32": (".safetensors", ".bin")}
CONFIG_SUFFIXES = (".json", ".txt")


@dataclass(frozen=True)
class Layout:
    """What one model folder must hold. `required` maps each subfolder ("" is the top) to the files
    it needs ("a|b": either); `weights` lists the subfolders that need one weights file."""

    what: str
    required: dict[str, tuple[str, ...]]
    weights: tuple[str, ...]


LAYOUTS = {
    "base": Layout("an SD 1.5 diffusers folder", {
        "": ("model_index.json",),
        "scheduler": ("scheduler_config.json",),
        "tokenizer": ("vocab.json", "merges.txt"),
        "text_encoder": ("config.json",),
        "vae": ("config.json",),
        "unet": ("config.json",),
    }, weights=("text_encoder", "vae", "unet")),
    "controlnet": Layout("a diffusers ControlNet folder", {"": ("config.json",)}, weights=("",)),
    "clip": Layout("a transformers CLIP folder", {
        "": ("config.json", "preprocessor_config.json|processor_config.json", "vocab.json|tokenizer.json"),
    }, weights=("",)),
}


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def select(layout: Layout, files: list[str], variant: str) -> tuple[dict[str, str], list[str]]:
    """Pick the files to install from a repo's (or folder's) relative paths.

    Returns ({installed name: source name}, [missing required files]). Only files directly in
    a layout subfolder are considered, so nothing outside them (safety_checker/, images/,
    root-level checkpoints) is ever picked.
    """
    by_folder: dict[str, set[str]] = {}
    for path in files:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    chosen, missing = {}, []
    for folder, needed in layout.required.items():
        names = by_folder.get(folder, set())
        for name in sorted(names):
            if name.endswith(CONFIG_SUFFIXES) and ".index.json" not in name:
                chosen[_join(folder, name)] = _join(folder, name)
        missing += [_join(folder, n.split("|")[0]) for n in needed if not any(a in names for a in n.split("|"))]
        if folder in layout.weights:
            weights = next((stem + suffix for suffix in WEIGHT_ORDER[variant] for stem in WEIGHT_STEMS
                            if stem + suffix in names), None)
            if weights is None:
                missing.append(_join(folder, f"diffusion_pytorch_model{WEIGHT_ORDER[variant][0]} "
                                             f"(or another {variant} weights file)"))
            else:
                chosen[_join(folder, weights.replace(".fp16.", "."))] = _join(folder, weights)
    return chosen, missing


def list_folder(folder: Path) -> list[str]:
    """Every file under `folder` as a relative posix path (symlinked files count as files)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def check_folder(folder: str | Path, key: str) -> Path:
    """An installed models/ folder must hold everything LAYOUTS[key] names; else one line saying
    which file is missing and how to get it back."""
    folder = Path(folder)
    layout = LAYOUTS[key]
    if not folder.is_dir():
        raise StageError(f"{folder}: not found; run `dvc repro fetch-models` (or `dvc pull fetch-models`) "
                         f"to create {layout.what}")
    _, missing = select(layout, list_folder(folder), "fp32")
    if missing:
        raise StageError(f"{folder / missing[0]}: not found, so {folder} is not {layout.what}; "
                         f"{restore_hint('fetch-models')}")
    return folder

"""fetch-models: put SD 1.5, the canny ControlNet and the metric backbones under models/.

    python -m stages.fetch_models

`models.mode` says where they come from:
- `tiny` (the demo): tiny models built offline from `models.seed` and taught garments
  (`models.pretrain`, on drawings at `extract.resolution` with canny edges at `canny.*`). For the
  committed recipe the taught weights ship with the repo (stages/demo/kit.py) and install in
  seconds; any other recipe is pretrained here (stages/demo/pretrain.py, minutes of CPU); all
  steps 0 leaves them random.
- `hub`: the real weights. SD 1.5, the ControlNet and CLIP come from the Hugging Face hub
  (`models.*_id` at `models.*_revision`; HF_ENDPOINT and HF_TOKEN are honoured), only the files
  the stages load, fp16 where `models.variant` asks and the repo has it. clean-fid's Inception and
  torchvision's AlexNet come from their URLs, checked against `models.*_sha256`. Downloads go
  to the usual caches and resume when rerun. This is the only stage that touches the network.
- `local`: the same models from folders and files you already have (`models.local.*`),
  checked the same way, then hard-linked (or copied) into models/.

Whatever the mode, the folders have the same layout, all or nothing, and models/sources.json
records where each file came from (repo commit, URL, sha256), and the Inception's sha256 in every
mode: it is TorchScript, code that runs when loaded, so metrics loads no other file.
Credentials never go in params (dvc.lock records them): a mirror's token goes in
$FASHION_URL_TOKEN (an Authorization header, sent to no default URL), the hub's in HF_TOKEN.
"""

from pathlib import Path

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.io import atomic_dirs, sha256_of, write_json
from stages.common.model_layouts import LAYOUTS
from stages.common.params import load_params


def fetch_real(models, base: Path, controlnet: Path, eval_models: Path) -> tuple[dict, dict]:
    """Hub or local mode: every model installed into the temp folders; returns (record, backbones)."""
    from stages.common import model_sources as sources

    targets = {"base": base, "controlnet": controlnet, "clip": eval_models / dataset.CLIP_DIR}
    files = {"inception": eval_models / dataset.INCEPTION_FILE, "alexnet": eval_models / dataset.ALEXNET_FILE}
    record = {"mode": models.mode, "variant": models.variant}
    for key, target in targets.items():
        if models.mode == "hub":
            record[key] = sources.from_hub(getattr(models, f"{key}_id"), getattr(models, f"{key}_revision"),
                                           LAYOUTS[key], models.variant, key, target)
        else:
            record[key] = sources.from_local(getattr(models.local, key), LAYOUTS[key], models.variant,
                                             f"models.local.{key}", target)
    for key, target in files.items():
        sha_key, torchscript = f"models.{key}_sha256", key == "inception"
        if models.mode == "hub":
            record[key] = sources.from_url(getattr(models, f"{key}_url"), getattr(models, f"{key}_sha256"),
                                           f"models.{key}_url", sha_key, target, torchscript)
        else:
            record[key] = sources.local_file(getattr(models.local, key), getattr(models, f"{key}_sha256"),
                                             f"models.local.{key}", sha_key, target, torchscript)
    downloaded = sum(r.pop("downloaded_bytes", 0) for r in record.values() if isinstance(r, dict))
    if models.mode == "hub":
        log.info("fetch-models: downloaded %.1f MB (the rest was already in the caches)", downloaded / 1e6)

    clip_weights = next(name for name in record["clip"]["files"] if name.endswith((".safetensors", ".bin")))
    # the hub listed it already; a local copy is hashed here
    clip_digest = (record["clip"]["files"][clip_weights].get("sha256")
                   or sources.sha256_of(targets["clip"] / clip_weights))[:12]
    revision = f"@{record['clip']['commit'][:12]}" if models.mode == "hub" else ""
    backbones = {
        "fid": f"clean-fid inception-2015-12-05 (sha256 {record['inception']['sha256'][:12]})",
        "lpips": f"lpips v0.1 alex on torchvision AlexNet (sha256 {record['alexnet']['sha256'][:12]})",
        "clip": f"{models.clip_id}{revision} (weights sha256 {clip_digest})",
    }
    return record, backbones


def main() -> None:
    setup_logging(network=True)
    params = load_params()
    paths, models = params.paths, params.models
    if models.mode == "hub":  # before any folder is made, as for a bad param
        from stages.common.model_sources import check_endpoint

        check_endpoint()
    with atomic_dirs(paths.base_model, paths.controlnet, paths.eval_models) as (base, controlnet, eval_models):
        if models.mode == "tiny":
            from stages.demo import kit

            backbones, record = kit.build_all(Path(base), Path(controlnet), Path(eval_models), models,
                                              params.extract.resolution, params.canny)
            # Built here, so pinned as built: metrics loads this TorchScript only with this digest.
            record["inception"] = {"sha256": sha256_of(Path(eval_models) / dataset.INCEPTION_FILE)}
        else:  # a full disk or a read-only folder is one line too (run_cli)
            record, backbones = fetch_real(models, Path(base), Path(controlnet), Path(eval_models))
        write_json(Path(eval_models) / dataset.BACKBONES_FILE, backbones)
    write_json(paths.model_sources, record)  # once the folders it describes are in place
    log.info("fetch-models: %s models in %s, %s and %s (sources: %s)", models.mode, paths.base_model,
             paths.controlnet, paths.eval_models, paths.model_sources)


if __name__ == "__main__":
    run_cli(main)

"""fetch-models: put SD 1.5, the canny ControlNet and the metric backbones under models/.

    python -m stages.fetch_models

`models.mode: tiny` (the default) builds random-initialised tiny models offline from
`models.seed`, in the real diffusers/transformers layouts. `hub` mode downloads the real
weights; it is the only stage allowed to touch the network.
"""

from pathlib import Path

from stages.common import dataset, tiny_models
from stages.common.cli import StageError, log, run_cli, setup_logging
from stages.common.io import atomic_dir, write_json
from stages.common.params import load_params


def main() -> None:
    setup_logging()
    params = load_params()
    paths, models = params.paths, params.models
    if models.mode == "hub":
        raise StageError(
            "models.mode: hub is not implemented yet (snapshot download of "
            f"{models.base_id}, {models.controlnet_id}, {models.clip_id}); "
            "use models.mode: tiny, or place the diffusers folders under models/ yourself")
    with atomic_dir(paths.base_model) as base, atomic_dir(paths.controlnet) as controlnet, \
            atomic_dir(paths.eval_models) as eval_models:
        backbones = tiny_models.build_all(Path(base), Path(controlnet), Path(eval_models), models.seed)
        write_json(Path(eval_models) / dataset.BACKBONES_FILE, backbones)
    log.info("fetch-models: built tiny models (seed %d) in %s, %s and %s",
             models.seed, paths.base_model, paths.controlnet, paths.eval_models)


if __name__ == "__main__":
    run_cli(main)

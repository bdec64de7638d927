"""canny-edges: the ControlNet condition for every eval image (data/edges/000000.png, ...).

    python -m stages.canny_edges

`edges.canny`: cv2.Canny on the RGB ground truth, stacked to 3 channels, exactly as the seed
recipe fed its canny ControlNet. The metrics stage runs the same function on generated images.
"""

from tqdm import tqdm

from stages.common import dataset
from stages.common.cli import log, run_cli, setup_logging
from stages.common.edges import canny
from stages.common.io import ImageWriter, atomic_dir, check_images, load_rgb
from stages.common.params import load_params


def main() -> None:
    setup_logging()
    params = load_params()
    configs = dataset.load_eval_configs(params.paths.eval_data)
    check_images([dataset.gt_path(params.paths.eval_data, c["index"]) for c in configs], "extract")
    # each edge map is encoded on the writer's threads while the next one is found
    with atomic_dir(params.paths.edges) as edges_dir, ImageWriter() as writer:
        for config in tqdm(configs, desc="canny-edges"):
            gt = load_rgb(dataset.gt_path(params.paths.eval_data, config["index"]))
            writer.submit(dataset.edge_path(edges_dir, config["index"]),
                          canny(gt, params.canny.low_threshold, params.canny.high_threshold))
    log.info("canny-edges: wrote %d edge maps to %s", len(configs), params.paths.edges)


if __name__ == "__main__":
    run_cli(main)

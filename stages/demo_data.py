"""demo-data: write the embedded synthetic FashionGen file (data/raw/fashiongen_demo.h5).

    python -m stages.demo_data

Procedural garments with truthful descriptions, in the real file's exact schema; see
stages/demo/garments.py. Deterministic from `demo.seed`.
"""

from stages.demo import garments
from stages.common.cli import log, run_cli, setup_logging
from stages.common.io import atomic_file
from stages.common.params import load_params


def main() -> None:
    setup_logging()
    params = load_params()
    products = garments.make_garments(params.demo.seed, params.demo.products)
    with atomic_file(params.paths.demo_h5) as tmp:
        rows = garments.write_h5(tmp, products)
    log.info("demo-data: wrote %d products (%d rows) to %s", len(products), rows, params.paths.demo_h5)


if __name__ == "__main__":
    run_cli(main)

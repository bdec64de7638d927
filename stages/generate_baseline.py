"""generate-baseline: `generate.images_per_condition` images (one by default) per eval config from
its canny edges and prompt, with the canny ControlNet on the base SD 1.5 and no LoRA: the reference
the LoRA is judged against.

    python -m stages.generate_baseline

Writes `paths.generated_baseline`/000000.png, ...; see stages/common/generation.py.
"""

from stages.common.cli import run_cli
from stages.common.generation import run

if __name__ == "__main__":
    run_cli(lambda: run("baseline"))

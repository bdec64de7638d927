"""generate-lora: `generate.images_per_condition` images (one by default) per eval config from its
canny edges and prompt, with the canny ControlNet on SD 1.5 plus the trained LoRA at
`generate.lora_scale`.

    python -m stages.generate_lora

Writes `paths.generated_lora`/000000.png, ...; see stages/common/generation.py.
"""

from stages.common.cli import run_cli
from stages.common.generation import run

if __name__ == "__main__":
    run_cli(lambda: run("lora"))

"""How a stage talks to the person running it: one-line errors for bad input, and logging.
Nothing here changes what a stage produces, so no stage lists this file as a DVC dep."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("stages")


class StageError(Exception):
    """A problem the user fixes (a param, a path, a missing upstream stage). The message names
    the file, key or param and says what to do."""


def setup_logging(network: bool = False) -> None:
    """Log to stderr. Stages load everything from local folders, so unless `network` (only
    fetch-models' hub mode) any accidental hub access fails fast instead of hanging."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface_hub's client logs every request
    if not network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StageError exits 1 with a single `error: ...` line."""
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

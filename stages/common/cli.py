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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    # Everything loads from local folders; make any accidental hub access fail fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StageError exits 1 with a single `error: ...` line."""
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

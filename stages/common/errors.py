"""User-facing errors: bad params, missing inputs. They print as one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class StageError(Exception):
    """A problem the user fixes (a param, a path, a missing upstream stage). The message names
    the file, key or param and says what to do."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StageError exits 1 with a single `error: ...` line."""
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

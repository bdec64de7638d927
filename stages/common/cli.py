"""How a stage talks to the person running it: one-line errors for bad input, and logging.
Nothing here changes what a stage produces, so no stage lists this file as a DVC dep.

The error contract: a problem the user can fix (a param, a file, a full disk) ends the stage
with exit code 1 and one line, `error: <file, key or param>: <what is wrong>; <what to do>`.
`--debug` after the module name (`python -m stages.extract --debug`) or FASHION_DEBUG=1 (for
`dvc repro`) shows the traceback as well. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from stages.common.errors import StageError
from stages.common.io import public_path

log = logging.getLogger("stages")


def setup_logging(network: bool = False) -> None:
    """Log to stderr. Stages load everything from local folders, so unless `network` (only
    fetch-models' hub mode) any accidental hub access fails fast instead of hanging."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface_hub's client logs every request
    if not network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def disk_error(err: OSError, stage: str) -> str:
    """One line for a file-system failure (disk full, read-only, permissions)."""
    where = public_path(err.filename) if err.filename else "the disk"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the device; free some (`dvc gc` trims DVC's cache), or move the big "
                "caches to a larger disk (`dvc cache dir`, HF_HOME, XDG_CACHE_HOME), then rerun "
                f"`dvc repro {stage}`")
    if err.errno == errno.EIO:  # a failed read, write or fsync: the device or its file system, not a path
        return (f"{where}: input/output error from the disk or its file system; the stage's previous outputs stay as "
                f"they were: check the disk (`dmesg`), then rerun `dvc repro {stage}`")
    return f"{where}: {err.strerror or err}; check the path and its permissions, then rerun `dvc repro {stage}`"


def debugging() -> bool:
    return "--debug" in sys.argv[1:] or os.environ.get("FASHION_DEBUG", "").lower() in ("1", "true", "yes", "on")


def _close_progress_bars() -> None:
    """End a progress bar the error cut short, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's main() under the error contract above."""
    stage = Path(sys.argv[0]).stem.replace("_", "-")  # `python -m stages.train_lora` -> train-lora
    try:
        main()
    except (StageError, OSError, KeyboardInterrupt) as err:
        if isinstance(err, OSError) and err.errno not in DISK_ERRNOS:
            raise  # not the user's disk: a bug, with its traceback
        if debugging():
            raise
        _close_progress_bars()
        if isinstance(err, KeyboardInterrupt):
            print(f"error: {stage} interrupted; rerun it to finish (training and generation resume where they "
                  "stopped)", file=sys.stderr)
            sys.exit(130)
        message = disk_error(err, stage) if isinstance(err, OSError) else str(err)
        print("error: " + " ".join(message.split("\n")), file=sys.stderr)  # one line, whatever a library said
        sys.exit(1)

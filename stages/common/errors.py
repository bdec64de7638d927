"""The error vocabulary every module shares: a leaf, importing nothing of the project, so any
module can raise a user-facing error without an import circle (cli prints them, io raises them).
"""


class StageError(Exception):
    """A problem the user fixes (a param, a path, a missing upstream stage). The message names
    the file, key or param and says what to do."""


def restore_hint(stage: str | None = None) -> str:
    """What to do about a damaged output of `stage` (an input of the stage that found it)."""
    if stage is None:
        return "restore it with `dvc checkout` or rebuild it with `dvc repro`"
    return f"restore it with `dvc checkout {stage}` or rebuild it with `dvc repro -f {stage}`"

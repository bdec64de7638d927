"""train-lora's live log: what a user watches while training runs, and its readers.

- `paths.train_log`, a DVCLive folder and DVC output of train-lora: loss, learning rate and
  gradient norm (before clipping) per optimiser step, and every `train.validate_every` steps the
  held-out loss and the validation images. `dvc exp show`, `dvc plots show` and DVC's VS Code
  extension read it while the stage runs. It holds only what the declared inputs decide (no
  timestamps), so a rerun writes the same bytes.
  Samples/s is there too while the run lasts, and removed when it ends: throughput differs
  between otherwise identical runs, and left in the output it would make every rerun change
  train-lora's outputs. The stage's last log line gives the run's mean.
- TensorBoard, when `train.report_to` lists it: the same scalars (samples/s kept) and images, to
  `paths.tensorboard`.

Only the writer process logs. A resumed run replays its checkpoint's history into a fresh
`paths.train_log`, so the step axis continues and the files equal an unbroken run's; a folder
left by any other run is replaced, never appended to.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.common.cli import log
from stages.common.errors import StageError

SUMMARY_FILE = "metrics.json"   # DVCLive's names inside its folder
SCALARS_DIR = "plots/metrics"
IMAGES_DIR = "plots/images"
STEP_METRICS = ("loss", "lr", "grad_norm")
HELDOUT = "heldout_loss"
SPEED = "samples_per_s"
VALIDATION = "validation"       # images: validation/<eval index>/<step>.png, DVCLive's slider layout


def validation_image(index: int, step: int) -> str:
    return f"{VALIDATION}/{index:06d}/{step:06d}.png"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def live(folder: str):
    """DVCLive writing `folder`: no dvc.yaml of its own (the pipeline's declares these files) and no
    experiment of its own (`dvc exp run` makes one). Its experiment bookkeeping reads the git repo,
    which fails on a repo without a commit yet (a fresh `git init`): then the files are written all
    the same, without that bookkeeping."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class Writer(Live):
        def _init_dvc(self):
            try:
                super()._init_dvc()
            except SCMError as err:
                self._dvc_file = "dvc.yaml"
                log.info("train-lora: DVCLive's experiment bookkeeping is off (%s); the log is written all the same",
                         err)

    os.environ.pop("DVCLIVE_RESUME", None)  # it would append to the folder: the log is rebuilt, never appended to
    return Writer(dir=folder, dvcyaml=None, save_dvc_exp=False)


class TrainLog:
    """The writer's loggers. `history` is the checkpoint's: the loss rows and validation records
    (step, held-out loss, {eval index: PNG bytes}) of the steps already trained."""

    def __init__(self, paths, report_to: list[str], rows: list[dict], validations: list[dict]):
        self.live = live(str(paths.train_log))
        self.board = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise StageError("params.yaml: train.report_to lists tensorboard, which is not installed; "
                                 "pip install -e '.[tensorboard]', or drop it from the list") from None

            # Rebuilt as DVCLive's folder is, with the history replayed: no other run's events, none past
            # the checkpoint (only the replayed steps' samples/s is not kept)
            shutil.rmtree(paths.tensorboard, ignore_errors=True)
            self.board = SummaryWriter(paths.tensorboard)
        for record in validations:  # the checkpoint's history
            self.validation(record)
        if rows:
            self.rows(rows, None)

    def rows(self, rows: list[dict], samples_per_s: float | None) -> None:
        for row in rows:
            self.live.step = row["step"]
            for name in STEP_METRICS:
                self.live.log_metric(name, row[name])
                if self.board is not None:
                    self.board.add_scalar(f"train/{name}", row[name], row["step"])
        if rows and samples_per_s is not None:
            self.live.log_metric(SPEED, samples_per_s)
            if self.board is not None:
                self.board.add_scalar(f"train/{SPEED}", samples_per_s, rows[-1]["step"])
        self._summary()

    def validation(self, record: dict) -> None:
        step = record["step"]
        self.live.step = step
        self.live.log_metric(HELDOUT, record[HELDOUT])
        for index, data in record["images"].items():
            image = Image.open(io.BytesIO(data))
            self.live.log_image(validation_image(index, step), image)
            if self.board is not None:
                self.board.add_image(f"{VALIDATION}/{index:06d}", np.asarray(image.convert("RGB")), step,
                                     dataformats="HWC")
        if self.board is not None:
            self.board.add_scalar(f"{VALIDATION}/{HELDOUT}", record[HELDOUT], step)
        self._summary()

    def _summary(self) -> None:
        # Keys in one order whatever order they were logged in: a resumed run's summary is byte
        # for byte an unbroken one's. The step is the newest logged.
        summary = self.live.summary
        self.live.summary = {key: summary[key] for key in sorted(summary) if key != "step"}
        self.live.step = max(self.live.step, summary.get("step", 0))
        self.live.make_summary()
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        # The images folder is a DVC output of its own (DVC-cached, not in git): there even empty.
        (Path(self.live.dir) / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.live.summary.pop(SPEED, None)  # live only: see the module's docstring
        (Path(self.live.dir) / SCALARS_DIR / f"{SPEED}.tsv").unlink(missing_ok=True)
        self.live.end()
        if self.board is not None:
            self.board.close()


def _scalars(folder: Path, name: str) -> pd.DataFrame | None:
    path = Path(folder) / SCALARS_DIR / f"{name}.tsv"
    return pd.read_csv(path, sep="\t") if path.is_file() else None


def read_history(folder: str | Path) -> pd.DataFrame:
    """One row per optimiser step: step, loss, lr, grad_norm."""
    tables = [_scalars(folder, name) for name in STEP_METRICS]
    if any(table is None for table in tables):
        raise StageError(f"{Path(folder) / SCALARS_DIR}: the training log is incomplete; run `dvc repro train-lora`")
    history = tables[0]
    for table in tables[1:]:
        history = history.merge(table, on="step", validate="one_to_one")
    return history


def read_heldout(folder: str | Path) -> pd.DataFrame | None:
    """step, heldout_loss; None when the run did not validate (train.validate_every: 0)."""
    return _scalars(folder, HELDOUT)


def validation_images(folder: str | Path) -> dict[int, dict[int, Path]]:
    """{eval index: {step: PNG path}}, both sorted."""
    root = Path(folder) / IMAGES_DIR / VALIDATION
    return {int(sample.name): {int(image.stem): image for image in sorted(sample.glob("*.png"))}
            for sample in sorted(root.iterdir())} if root.is_dir() else {}

"""Several processes, one per GPU: `accelerate launch --num_processes N -m stages.<stage>`.

accelerate's launcher starts the processes and sets the usual environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the stages need only this much of torch.distributed on top:
who they are, a barrier, a sum. Rank 0 is the one writer. With `train.processes` or
`generate.processes` above 1, `python -m stages.<stage>` (what dvc.yaml runs) launches itself
that way, so the same `dvc repro` uses every GPU and the params stay out of dvc.yaml's command.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from stages.common.cli import log
from stages.common.errors import StageError


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_writer() -> bool:
    return rank() == 0


def init(dev: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) when launched as several processes."""
    if world_size() > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # else pinned memory and stray contexts land on GPU 0
        # An hour, not the default 10 minutes: a process may wait while the writer saves.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=dev if dev.type == "cuda" else None)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def relaunch(processes: int, module: str, key: str) -> bool:
    """Run `module` as `processes` processes under accelerate's launcher and wait for them, unless
    this already is one of them (or one process is asked for). True if it ran them."""
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return False
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise StageError(f"{key}: {processes} processes, one per GPU, but torch sees {torch.cuda.device_count()} "
                         "GPUs; lower it")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        raise StageError(f"{key}: {processes} processes need accelerate's launcher; pip install accelerate")
    with socket.socket() as probe:  # a free port, so that two launches on one machine do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu is accelerate's torchrun launcher; it also runs CPU processes (gloo), as the tests do.
    command = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module]
    stage = module.rsplit(".", 1)[-1].replace("_", "-")
    log.info("%s: %d processes: %s", stage, processes, " ".join(command))
    status = subprocess.run(command).returncode
    if status:
        raise StageError(f"{stage}: its {processes} processes failed (exit status {status}); their errors are "
                         f"above; set {key}: 1 to run in one")
    return True

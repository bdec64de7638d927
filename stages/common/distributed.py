"""Several processes, one per GPU: `accelerate launch --num_processes N -m stages.<stage>`.

accelerate's launcher starts the processes and sets the usual environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the stages need only this much of torch.distributed on top:
who they are, a barrier, a sum. Rank 0 is the one writer. With `train.processes` or
`generate.processes` above 1, `python -m stages.<stage>` (what dvc.yaml runs) launches itself
that way, so the same `dvc repro` uses every GPU and the params stay out of dvc.yaml's command.
With launch.machines above 1 it does so on several machines: each starts the stage (machine 0
through `dvc repro`, the others with `python -m stages.<stage>`) and the launchers meet at machine
0's address. paths.resume must be on a file system they all see: checkpoints and the latent cache
are shared there.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

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
        die_with_launcher()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # else pinned memory and stray contexts land on GPU 0
        # An hour, not the default 10 minutes: a process may wait while the writer saves.
        dist.init_process_group(backend(dev), timeout=datetime.timedelta(hours=1),
                                device_id=dev if dev.type == "cuda" else None)


def die_with_launcher() -> None:
    """Ask Linux to stop this process when its launcher dies. torchrun starts each worker in a
    session of its own, so a signal to the launcher's group never reaches them: a launcher killed
    outright (the OOM killer, a second Ctrl-C) would otherwise leave them on the GPUs."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def backend(dev: torch.device) -> str:
    """NCCL between GPUs (ROCm's torch runs RCCL under the same name), gloo between CPU processes."""
    return "nccl" if dev.type == "cuda" else "gloo"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def broadcast(tensors: Iterable[torch.Tensor]) -> None:
    """Process 0's values in every process, in place."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def machine_rank(launch) -> int:
    """This machine's rank: $FASHION_MACHINE_RANK, else launch.machine_rank."""
    wanted = os.environ.get("FASHION_MACHINE_RANK")
    if wanted is None:
        return launch.machine_rank
    if not wanted.isdigit() or int(wanted) >= launch.machines:
        raise StageError(f"FASHION_MACHINE_RANK={wanted}, but launch.machines is {launch.machines}: machines are "
                         f"numbered 0 to {launch.machines - 1}")
    return int(wanted)


def wait_for(address: str, port: int, timeout: int) -> None:
    """Wait until machine 0 listens on address:port, or fail naming it: without this a machine
    started with a wrong address waits in the rendezvous for many minutes, saying nothing."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=min(5, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise StageError(f"launch.main_address: {address}:{port} did not answer in {timeout} s ({err}); "
                                 "start machine 0 first, check the address and that the port is open between "
                                 "the machines, or raise launch.connect_timeout") from None
        time.sleep(1)


def launch_command(launcher: str, processes: int, launch, module: str, key: str) -> list[str]:
    """accelerate's command line for `processes` processes on each of launch.machines machines."""
    if launch.config_file:
        if not os.path.isfile(launch.config_file):
            raise StageError(f"launch.config_file: {launch.config_file} not found; write it with `accelerate "
                             "config --config_file ...` or set it to ''")
        return [launcher, "launch", "--config_file", launch.config_file, "-m", module]
    machines, rank = launch.machines, machine_rank(launch)
    if machines == 1:
        address = "127.0.0.1"
        with socket.socket() as probe:  # a free port, so that two launches on one machine do not collide
            probe.bind((address, 0))
            port = probe.getsockname()[1]
    else:
        address, port = os.environ.get("FASHION_MAIN_ADDRESS") or launch.main_address, launch.main_port
        if not address:
            raise StageError(f"launch.main_address: empty, but launch.machines is {machines}; give machine 0's "
                             "address (or set FASHION_MAIN_ADDRESS)")
        if rank > 0:
            log.info("%s: machine %d of %d: waiting for machine 0 at %s:%d", key.split(".")[0], rank, machines,
                     address, port)
            wait_for(address, port, launch.connect_timeout)
    # --multi_gpu is accelerate's torchrun launcher; it also runs CPU processes (gloo), as the tests do.
    # --num_processes counts the processes of all machines.
    return [launcher, "launch", "--multi_gpu", "--num_processes", str(processes * machines),
            "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", address,
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module]


def relaunch(processes: int, launch, module: str, key: str) -> bool:
    """Run `module` as `processes` processes (on each of launch.machines machines) under
    accelerate's launcher and wait for them, unless this already is one of them (or one process
    on one machine is asked for). True if it ran them."""
    several = processes > 1 or launch.machines > 1 or launch.config_file
    if not several or "WORLD_SIZE" in os.environ:
        return False
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise StageError(f"{key}: {processes} processes, one per GPU, but torch sees {torch.cuda.device_count()} "
                         "GPUs; lower it")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        raise StageError(f"{key}: {processes} processes need accelerate's launcher; pip install accelerate")
    command = launch_command(launcher, processes, launch, module, key)
    stage = module.rsplit(".", 1)[-1].replace("_", "-")
    log.info("%s: %s", stage, " ".join(command))
    status, stopped_by = run_forwarding_signals(command)
    if stopped_by:
        log.warning("%s: stopped by %s; its processes were stopped too", stage, signal.Signals(stopped_by).name)
        raise SystemExit(128 + stopped_by)
    if status:
        raise StageError(f"{stage}: its processes failed (exit status {status}); their errors are above; set "
                         f"{key}: 1{' and launch.machines: 1' if launch.machines > 1 else ''} to run in one")
    return True


def run_forwarding_signals(command: list[str], grace: float = 30.0) -> tuple[int, int | None]:
    """Run `command` (accelerate's launcher) in a process group of its own, and pass SIGTERM,
    SIGINT and SIGHUP on to it: a killed `dvc repro` or a stopped Kaggle cell then stops the
    launcher, which stops its workers (and a worker whose launcher dies outright stops itself:
    `die_with_launcher`), instead of leaving them on the GPU writing into the resume folder. What is
    left of the group after `grace` seconds is killed. Returns the exit status and the signal that
    stopped it, if any."""
    child = subprocess.Popen(command, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        status = child.wait()
        if received:  # the launcher is gone; its workers get the grace period to follow
            deadline = time.monotonic() + grace
            while _group_alive(child.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(child.pid, signal.SIGKILL)
    return status, (received[0] if received else None)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True

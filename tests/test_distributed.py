"""Several processes: the device each process takes, a faked ROCm GPU's choices, and a stop
signal that reaches every worker. Two "machines" training as one process does: test_train_lora."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from stages.common import distributed, runtime, training
from stages.common.errors import StageError
from tests.conftest import REPO, stage_env


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("wanted, world, local, expected", [
    ("cuda", "2", "1", "cuda:1"),   # indexless: init_process_group would refuse it
    ("cuda:0", "2", "1", "cuda:1"),  # an index: every process would share GPU 0
    ("auto", "2", "1", "cuda:1"),
    ("cuda", "1", "0", "cuda:0"),
    ("cuda:1", "1", "0", "cuda:1"),  # one process keeps the GPU it names
    ("cpu", "2", "1", "cpu"),
])
def test_each_process_takes_its_local_gpu(two_gpus, monkeypatch, wanted, world, local, expected):
    monkeypatch.setenv("FASHION_DEVICE", wanted)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_RANK", local)
    assert runtime.device() == torch.device(expected)


def test_more_processes_than_gpus_is_one_line(two_gpus, monkeypatch):
    monkeypatch.setenv("FASHION_DEVICE", "cuda")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(StageError, match=r"FASHION_DEVICE=cuda \(process 2 of this machine\), but torch sees 2 "
                                         r"CUDA devices"):
        runtime.device()


@pytest.mark.parametrize("arch, capability, expected", [
    ("gfx942:sramecc+:xnack-", (9, 4), torch.bfloat16),  # MI300X
    ("gfx90a:sramecc+:xnack-", (9, 0), torch.bfloat16),  # MI250
    ("gfx1100", (11, 0), torch.bfloat16),  # RX 7900 (RDNA3)
    ("gfx906:sramecc+:xnack-", (9, 0), torch.float16),  # MI50: no bf16 units, whatever its "capability"
    ("gfx1030", (10, 3), torch.float16),  # RX 6800 (RDNA2)
])
def test_a_rocm_gpu_gets_its_precision_fused_adamw_and_rccl(monkeypatch, arch, capability, expected):
    """ROCm's torch answers to "cuda": the same code paths, with AMD's answers. bf16 comes from the
    gfx arch, not from NVIDIA's capability scale (which would give every AMD GPU bf16)."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        gcnArchName=arch, major=capability[0], minor=capability[1]))
    gpu = torch.device("cuda", 0)
    assert runtime.training_dtype("auto", gpu) == expected
    assert runtime.inference_dtype("auto", gpu) == torch.float16
    assert runtime.fused_adamw(gpu)
    assert distributed.backend(gpu) == "nccl"  # RCCL, under NCCL's name
    assert runtime.uses_cuda_graphs("reduce-overhead")  # hipGraphs, under CUDA's name
    monkeypatch.setattr(torch.version, "hip", None)  # the same numbers read as NVIDIA's capability
    assert runtime.training_dtype("auto", gpu) == torch.bfloat16


@pytest.mark.parametrize("how", ["SIGTERM to the stage", "SIGKILL to the launcher"])
def test_a_stop_signal_stops_every_process(tmp_path, how):
    """SIGTERM to a stage running its processes under accelerate's launcher (what a killed `dvc
    repro` or a stopped Kaggle cell sends) stops the launcher and both workers, and the stage exits
    with 128 + 15. A launcher killed outright (the OOM killer) takes its workers with it too: they
    joined the process group, and a worker whose launcher dies stops itself."""
    (tmp_path / "sleeper.py").write_text(textwrap.dedent("""
        import os, pathlib, time
        import torch
        from stages.common import distributed
        distributed.init(torch.device("cpu"))
        pathlib.Path("pids", f"{os.getpid()}-{os.getppid()}").touch()
        time.sleep(300)
    """))
    (tmp_path / "pids").mkdir()
    launch = "types.SimpleNamespace(machines=1, machine_rank=0, main_address='', main_port=1, " \
             "connect_timeout=1, config_file='')"
    stage = subprocess.Popen(
        [sys.executable, "-c", f"import types; from stages.common import distributed; "
                               f"distributed.relaunch(2, {launch}, 'sleeper', 'train.processes')"],
        cwd=tmp_path, env=stage_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "pids").iterdir())) < 2:
        assert stage.poll() is None and time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    workers, launchers = zip(*(map(int, f.name.split("-")) for f in (tmp_path / "pids").iterdir()))
    if how == "SIGTERM to the stage":
        stage.send_signal(signal.SIGTERM)
    else:
        os.kill(launchers[0], signal.SIGKILL)
    err = stage.communicate(timeout=60)[1]
    if how == "SIGTERM to the stage":
        assert stage.returncode == 128 + signal.SIGTERM, err
        assert "stopped by SIGTERM; its processes were stopped too" in err
    else:
        assert stage.returncode == 1 and "its processes failed" in err, err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "a worker outlived its launcher"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_loader_workers_share_the_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    gpu = torch.device("cuda", 0)
    assert training.loader_workers(-1, gpu) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on 16 cores: 1 worker each, not 32
    assert training.loader_workers(-1, gpu) == 1
    assert training.loader_workers(-1, torch.device("cpu")) == 0
    assert training.loader_workers(3, gpu) == 3, "a number asked for is a number given"

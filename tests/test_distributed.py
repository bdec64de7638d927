"""Several processes: the device each process takes, a faked ROCm GPU's choices, and a stop
signal that reaches every worker. Two "machines" training as one process does: test_train_lora."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from stages.common import distributed, runtime
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


@pytest.mark.parametrize("capability", [(9, 4), (11, 0), (9, 0)])  # MI300, RDNA3, MI50: gfx numbers, not sm_
def test_a_rocm_gpu_gets_bf16_fused_adamw_and_rccl(monkeypatch, capability):
    """ROCm's torch answers to "cuda": the same code paths, with AMD's answers. bf16 comes from
    torch's own rule for ROCm (every arch it builds for), not from NVIDIA's capability scale."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert runtime.training_dtype("auto", gpu) == torch.bfloat16
    assert runtime.inference_dtype("auto", gpu) == torch.float16
    assert runtime.fused_adamw(gpu)
    assert distributed.backend(gpu) == "nccl"  # RCCL, under NCCL's name
    assert runtime.uses_cuda_graphs("reduce-overhead")  # hipGraphs, under CUDA's name
    monkeypatch.setattr(torch.version, "hip", None)  # the same capability read as NVIDIA's
    assert runtime.training_dtype("auto", gpu) == torch.bfloat16 if capability[0] >= 8 else torch.float16


def test_a_stop_signal_stops_every_process(tmp_path):
    """SIGTERM to a stage running its processes under accelerate's launcher (what a killed `dvc
    repro` or a stopped Kaggle cell sends) stops the launcher and both workers, and the stage exits
    with 128 + 15."""
    (tmp_path / "sleeper.py").write_text(textwrap.dedent("""
        import os, pathlib, time
        pathlib.Path("pids", str(os.getpid())).touch()
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
    workers = [int(f.name) for f in (tmp_path / "pids").iterdir()]
    stage.send_signal(signal.SIGTERM)
    err = stage.communicate(timeout=60)[1]
    assert stage.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; its processes were stopped too" in err
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

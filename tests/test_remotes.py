"""Sharing results through a DVC remote: a local folder, and S3 against a local moto server.

Each test publishes a copy of the suite's one reproduced repo (every stage run, committed), pushes
it, clones it as a teammate would and checks that nothing expensive runs again.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import GIT, copy_reproduced, stage_env

pytestmark = pytest.mark.slow
# what a generate param touches, and a plots param
AFTER_GENERATE = ["generate-baseline", "generate-lora", "metrics", "plots", "report", "model-card"]
# (model-card is skipped: the small eval set's 4 products fill the samples grid at any grid_samples,
# so the card's image comes out the same)
AFTER_PLOTS = ["plots", "report"]


def run(*args, cwd, env=None) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env or os.environ)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def round_trip(origin: Path, remote_args: list[list[str]], workdir: Path, env: dict, change: tuple[str, str],
               touched: list[str]) -> None:
    """Push from `origin`; a clone pulls and reruns nothing; another clone changes the param
    `change` (section, key) and `dvc repro --pull --allow-missing` pulls what it needs and reruns
    only the stages `touched`."""
    for args in remote_args:
        run("dvc", "remote", *args, cwd=origin, env=env)
    run(*GIT, "commit", "-qam", "remote", cwd=origin)
    assert "pushed" in run("dvc", "push", cwd=origin, env=env)

    teammate = workdir / "teammate"
    run("git", "clone", "-q", str(origin), str(teammate), cwd=workdir)
    run("dvc", "pull", cwd=teammate, env=env)
    assert (teammate / "models" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    status = run("dvc", "status", cwd=teammate, env=env)
    assert "Data and pipelines are up to date" in status, status
    assert "Running stage" not in run("dvc", "repro", cwd=teammate, env=env)

    tuner = workdir / "tuner"
    run("git", "clone", "-q", str(origin), str(tuner), cwd=workdir)
    params = yaml.safe_load((tuner / "params.yaml").read_text())
    params[change[0]][change[1]] += 1
    (tuner / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run("dvc", "repro", "--pull", "--allow-missing", cwd=tuner, env=env)
    ran = sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(touched), log
    assert "train-lora:" not in log, "never trains"


def test_local_folder_remote(reproduced, tmp_path):
    origin = tmp_path / "origin"
    copy_reproduced(reproduced, origin)
    round_trip(origin, [["add", "-d", "store", str(tmp_path / "remote")]], tmp_path, stage_env(),
               ("generate", "steps"), AFTER_GENERATE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3():
    """A local S3 (moto's server) on 127.0.0.1 with one bucket; skipped without the s3 extra."""
    pytest.importorskip("dvc_s3", reason="the s3 extra (pip install -e '.[s3]') is not installed")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="fashion")
        yield url, creds
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_s3_remote(reproduced, tmp_path, moto_s3):
    url, creds = moto_s3
    origin = tmp_path / "origin"
    copy_reproduced(reproduced, origin)
    round_trip(origin, [["add", "-d", "s3store", "s3://fashion/dvc"], ["modify", "s3store", "endpointurl", url]],
               tmp_path, stage_env(**creds), ("plots", "grid_samples"), AFTER_PLOTS)  # S3's transfers, fewer stages

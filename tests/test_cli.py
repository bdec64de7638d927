"""The error contract of every stage: exit 1 and one `error:` line; --debug or FASHION_DEBUG=1 adds
the traceback; a bug keeps its traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.cli import run_cli
from stages.common.errors import StageError
from stages.common.dataset import LORA_WEIGHTS
from tests.conftest import REPO

LOG_LINE = re.compile(r"\d\d:\d\d:\d\d \S+: ")


def stage(cwd, module, *args, **env):
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "FASHION_DEVICE": "cpu", **env}, timeout=300)


def broken_yaml(tmp_path):
    text = re.sub(r"  max_steps: (\d+)\n", r"  max_steps: [\1\n", (REPO / "params.yaml").read_text(), count=1)
    assert "max_steps: [" in text
    (tmp_path / "params.yaml").write_text(text)


def test_malformed_yaml_is_one_line_with_its_position(tmp_path):
    broken_yaml(tmp_path)
    result = stage(tmp_path, "train_lora")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: params.yaml:\d+:\d+: while parsing a flow sequence: .*", lines[0])


@pytest.mark.parametrize("how", ["--debug", "FASHION_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    broken_yaml(tmp_path)
    result = stage(tmp_path, "train_lora", how) if how == "--debug" else stage(tmp_path, "train_lora", FASHION_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ParamsError: params.yaml:" in result.stderr


def test_a_failing_stage_logs_then_ends_with_one_error_line(finished_project):
    (finished_project.path("lora") / LORA_WEIGHTS).write_bytes(b"not safetensors")
    finished_project.set({"generate.steps": 2})
    result = stage(finished_project.root, "generate_lora")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: models/lora/{LORA_WEIGHTS}: not a readable safetensors file")
    assert all(LOG_LINE.match(line) for line in lines[:-1]), result.stderr


def test_interrupt_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        f"error: {Path(sys.argv[0]).stem.replace('_', '-')} interrupted; rerun it to finish (training and generation "
        "resume where they stopped)"]


def test_a_bug_keeps_its_traceback():
    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(bug)
    with pytest.raises(FileNotFoundError):  # not the user's disk: a missing file is a bug here too
        run_cli(lambda: open("/nonexistent/file"))


def test_a_multi_line_message_is_printed_as_one(capsys):
    def fails():
        raise StageError("first\nsecond")

    with pytest.raises(SystemExit):
        run_cli(fails)
    assert capsys.readouterr().err == "error: first second\n"

"""presets.yaml: every preset validates against the params schema, and fashion-exp expands it."""

import re
import subprocess

import pytest

from fashion import presets
from stages.common.cli import run_cli
from stages.common.errors import StageError
from stages.common.params import ParamsError
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_every_preset_validates():
    shipped = presets.load_presets()
    assert {"demo", "seed-5k-0.5k-s20", "seed-30k-3k-s20", "seed-30k-3k-s40"} <= set(shipped)
    for name in shipped:
        cmd = presets.check(name, shipped, [])
        assert cmd[:5] == ["dvc", "exp", "run", "-n", name], "exp show names the experiment after its preset"


def test_the_seed_presets_say_what_the_seed_did():
    shipped = presets.load_presets()
    for name, images, evaluated, steps, guidance in [("seed-5k-0.5k-s20", 5000, 500, 20, 7.5),
                                                     ("seed-30k-3k-s20", 30000, 3000, 20, 7.5),
                                                     ("seed-30k-3k-s40", 30000, 3000, 40, 10)]:
        p = shipped[name]
        assert (p["extract.train_images"], p["extract.eval_products"], p["generate.steps"],
                p["generate.guidance_scale"]) == (images, evaluated, steps, guidance)
        assert (p["train.max_steps"], p["train.learning_rate"], p["extract.resolution"]) == (5000, 1e-4, 256)
        # the demo's own training knobs must not leak into a seed run
        assert (p["train.batch_size"], p["train.grad_accumulation"], p["train.warmup_steps"], p["train.rank"],
                p["train.alpha"], p["train.controlnet"]) == (2, 2, 500, 4, 4, False)


def test_user_overrides_go_through_and_are_checked_first():
    shipped = presets.load_presets()
    cmd = presets.check("seed-30k-3k-s40", shipped, ["-S", "extract.h5=/data/x.h5", "--queue"])
    assert cmd[-3:] == ["-S", "extract.h5=/data/x.h5", "--queue"] and "generate.steps=40" in cmd
    assert 'models.mode="hub"' in cmd
    with pytest.raises(ParamsError, match=r"presets.yaml: seed-30k-3k-s20: train.alpha: must be positive"):
        presets.check("seed-30k-3k-s20", shipped, ["-S", "train.alpha=0"])
    with pytest.raises(ParamsError, match="train.alphas: unknown key; did you mean train.alpha"):
        presets.check("demo", shipped, ["-S", "train.alphas=2"])


def test_an_unknown_preset_lists_the_valid_ones(capsys):
    with pytest.raises(StageError, match=r"no preset 'seed-30k'; the presets are demo, seed-5k-0.5k-s20, "):
        presets.check("seed-30k", presets.load_presets(), [])
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: presets.main(["nope"]))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: presets.yaml: no preset 'nope'; the presets are demo")


def test_a_preset_starts_from_the_committed_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run([*git, *cmd], check=True)
    presets.check_params_clean()
    edited = re.sub(r"max_steps: \d+", "max_steps: 5", (REPO / "params.yaml").read_text(), count=1)
    assert edited != (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(edited)
    with pytest.raises(StageError, match=r"params.yaml: differs from HEAD \(the last experiment applied its params\)"):
        presets.check_params_clean()


def test_string_values_stay_one_value_for_dvc():
    cmd = presets.command("x", {"generate.negative_prompt": "low quality, blurry", "generate.steps": 20}, [])
    assert cmd[-4:] == ["-S", 'generate.negative_prompt="low quality, blurry"', "-S", "generate.steps=20"]

"""presets.yaml: every preset validates against the params schema, and fashion-exp expands it."""

import re
import subprocess

import pytest

from fashion import presets
from stages.common.cli import run_cli
from stages.common.errors import StageError
from stages.common.params import ParamsError
from tests.conftest import REPO


CHECK_PARAMS_CLEAN = presets.check_params_clean


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    """At the repo's root, whatever its params.yaml's git state (test_a_preset_starts_from_the_committed_params
    checks that refusal)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(presets, "check_params_clean", lambda: None)


def test_every_preset_validates():
    shipped = presets.load_presets()
    assert {"demo", "seed-5k-0.5k-s20", "seed-30k-3k-s20", "seed-30k-3k-s40"} <= set(shipped)
    for name in shipped:
        cmd, runs, sweep = presets.check(name, shipped, [])
        assert len(runs) == 1 and not sweep
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
    cmd, _, _ = presets.check("seed-30k-3k-s40", shipped, ["-S", "extract.h5=/data/x.h5", "--queue"])
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
    CHECK_PARAMS_CLEAN()
    edited = re.sub(r"max_steps: \d+", "max_steps: 5", (REPO / "params.yaml").read_text(), count=1)
    assert edited != (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(edited)
    with pytest.raises(StageError, match=r"params.yaml: differs from HEAD \(the last experiment applied its params\)"):
        CHECK_PARAMS_CLEAN()


def test_string_values_stay_one_value_for_dvc():
    cmd = presets.command("x", {"generate.negative_prompt": "low quality, blurry", "generate.steps": 20}, [])
    assert cmd[-4:] == ["-S", 'generate.negative_prompt="low quality, blurry"', "-S", "generate.steps=20"]


def test_a_sweep_expands_as_dvc_does_and_checks_every_point(capsys):
    """DVC's own expansion (Hydra's grammar): a comma list, range() and choice() make a grid, one
    experiment per point; a value that fails the schema is named with its point."""
    shipped = presets.load_presets()
    cmd, runs, sweep = presets.check("demo", shipped, ["-S", "train.rank=4,8", "-Sgenerate.steps=range(10,31,10)",
                                                       "--set-param=params.yaml:train.lr_scheduler=choice(cosine,linear)",
                                                       "--queue"])
    assert sweep and len(runs) == 12
    assert runs[0] == {"train.rank": 4, "generate.steps": 10, "train.lr_scheduler": "cosine"}
    assert {(r["train.rank"], r["generate.steps"], r["train.lr_scheduler"]) for r in runs} == {
        (rank, steps, scheduler) for rank in (4, 8) for steps in (10, 20, 30) for scheduler in ("cosine", "linear")}
    assert cmd[-5:] == ["-S", "train.rank=4,8", "-Sgenerate.steps=range(10,31,10)",
                        "--set-param=params.yaml:train.lr_scheduler=choice(cosine,linear)", "--queue"], \
        "DVC expands it again itself"
    with pytest.raises(ParamsError, match=r"^presets.yaml: demo, sweep run 3 of 4 \(train.rank=0, "
                                          r"train.learning_rate=0.001\): train.rank: must be at least 1$"):
        presets.check("demo", shipped, ["-S", "train.rank=4,0", "-S", "train.learning_rate=1e-3,5e-3"])
    with pytest.raises(ParamsError, match=r"sweep run 2 of 2 \(train.caption_dropout=1.5\): "
                                          r"train.caption_dropout: must be in \[0, 1\]"):
        presets.check("demo", shipped, ["-S", "train.caption_dropout=0.1,1.5"])
    with pytest.raises(StageError, match=r"^-S train.rank=4,: not DVC's -S grammar \(mismatched input"):
        presets.check("seed-30k-3k-s20", shipped, ["-S", "generate.steps=5", "-S", "train.rank=4,"])
    with pytest.raises(StageError, match=r"^-S: Glob override 'train.target_modules=glob\(\*\)' is not supported"):
        presets.check("demo", shipped, ["-S", "train.target_modules=glob(*)"])
    with pytest.raises(StageError, match=r"^-S dvc.yaml:x=1: fashion-exp checks params.yaml only"):
        presets.check("demo", shipped, ["-S", "dvc.yaml:x=1"])
    _, runs, sweep = presets.check("demo", shipped, ["-S", "train.rank=choice(4)"])
    assert sweep and runs == [{"train.rank": 4}], "a one-point sweep is still a sweep to DVC (named demo-1)"
    with pytest.raises(ParamsError, match=r"^presets.yaml: demo, sweep run 1 of 1: train.rank: must be at least 1$"):
        presets.check("demo", shipped, ["-S=train.rank=choice(0)"])
    with pytest.raises(StageError, match=r"^-S: BasicSweeper does not support sweep type : INTERVAL_SWEEP"):
        presets.check("demo", shipped, ["-S", "train.learning_rate=interval(1e-4,1e-3)"])
    with pytest.raises(StageError, match=r"^-S train.rank=shuffle\(4,8\): shuffle\(\) queues in an order"):
        presets.check("demo", shipped, ["-S", "train.rank=shuffle(4,8)"])

    presets.main(["demo", "-S", "train.rank=4,16", "-S", "train.learning_rate=1e-3,5e-3", "--sweep"])
    assert capsys.readouterr().out.splitlines() == [
        "4 experiments:", "experiment  train.rank  train.learning_rate", "demo-1      4           0.001",
        "demo-2      4           0.005", "demo-3      16          0.001", "demo-4      16          0.005"]


@pytest.mark.parametrize("args, message", [
    (["-S", "train.rank=4,8"], r"^-S: a sweep \(2 experiments\) runs from DVC's queue: add --queue"),
    (["-S", "train.rank=range(4,5)"], r"^-S: a sweep \(1 experiment\) runs from DVC's queue"),
    (["-S", "train.rank=range(1,21)", "--queue"],
     r"^-S: the sweep expands to 20 experiments, more than --max-runs 16; check it with --sweep, then add --yes"),
    (["-S", "train.rank=4,8,16", "--queue", "--max-runs", "2"], r"more than --max-runs 2"),
    (["-S", "train.rank=4,8,16", "--queue", "--max-runs=2"], r"more than --max-runs 2"),
    (["--max-runs", "none"], r"^--max-runs none: expected a whole number of experiments, at least 1$"),
    (["--max-runs=²"], r"^--max-runs ²: expected a whole number"),
])
def test_a_sweep_queues_only_when_asked_and_only_as_large_as_allowed(args, message):
    with pytest.raises(StageError, match=message):
        presets.main(["demo", *args])


def test_a_large_sweep_queues_with_yes_and_our_flags_stay_ours(capsys):
    """--yes and --max-runs lift the limit; neither they nor --dry-run reach `dvc exp run`."""
    for flags in (["--yes"], ["--max-runs", "20"], ["--max-runs=20"]):
        presets.main(["demo", "-S", "train.rank=range(1,21)", "--queue", *flags, "--dry-run"])
        assert capsys.readouterr().out.strip() == "$ dvc exp run -n demo -S train.rank=range(1,21) --queue"

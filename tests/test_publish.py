"""fashion-publish against a local stand-in of the hub's upload API (tests/hub_standin.py): the
real huggingface_hub client, its LFS protocol and one NDJSON commit. `dvc status`'s refusal is
the bundle's check, run for real in tests/test_pipeline_e2e.py."""

import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants, hf_hub_download

from fashion import publish
from stages.common.errors import StageError
from stages.common.dataset import CARD_FILE, LORA_WEIGHTS
from tests.conftest import Project
from tests.hub_standin import StandIn

TOKEN = "hf_write_token"
REPO = "you/fashion-lora"


@pytest.fixture
def lora_project(finished, tmp_path, monkeypatch) -> Project:
    """What fashion-publish reads of a finished run: params.yaml and the LoRA folder (not the
    whole project: a copy per test stays cheap)."""
    shutil.copy(finished / "params.yaml", tmp_path / "params.yaml")
    project = Project(tmp_path)
    shutil.copytree(finished / project.params["paths"]["lora"], project.path("lora"))
    monkeypatch.chdir(tmp_path)
    return project


@pytest.fixture
def hub(lora_project, monkeypatch, tmp_path_factory):
    standin = StandIn(write_token=TOKEN)
    url = standin.start()
    monkeypatch.setattr(constants, "ENDPOINT", url)  # read when a client is made; the download template at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks the LFS protocol
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this hub is local
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # no token stored by `hf auth login`
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    checked = []
    monkeypatch.setattr(publish, "check_up_to_date", lambda *a, **k: checked.append(a))
    standin.checked = checked
    yield standin
    standin.stop()


def lora_files(project) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(project.path("lora").iterdir())
            if f.is_file() and not f.name.startswith(".")}


def test_publish_uploads_the_lora_and_its_card_in_one_commit(lora_project, hub, tmp_path):
    publish.main([REPO])
    repo = hub.repos[REPO]
    assert repo.files == lora_files(lora_project) and len(repo.commits) == 1 and not repo.private
    assert hub.checked, "it asked dvc status first"
    # back down through the client's own download path
    card = hf_hub_download(REPO, CARD_FILE, cache_dir=tmp_path / "dl")
    assert ModelCard.load(card).data.library_name == "diffusers"
    weights = hf_hub_download(REPO, LORA_WEIGHTS, cache_dir=tmp_path / "dl")
    assert Path(weights).read_bytes() == (lora_project.path("lora") / LORA_WEIGHTS).read_bytes()


def test_private_repo_on_a_branch(lora_project, hub):
    publish.main([REPO, "--private", "--revision", "experiments"])
    repo = hub.repos[REPO]
    assert repo.private and repo.files == {} and repo.branches["experiments"] == lora_files(lora_project)


def test_dry_run_lists_and_uploads_nothing(lora_project, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    publish.main([REPO, "--dry-run"])
    out = capsys.readouterr().out
    assert f"would upload {len(lora_files(lora_project))} files to {constants.ENDPOINT}/{REPO}" in out
    assert all(f"  {name}  " in out for name in lora_files(lora_project))
    assert hub.requests == [] and hub.repos == {}


def test_an_interrupted_upload_commits_nothing_and_a_rerun_finishes(lora_project, hub, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # the client's retries, without their waits
    hub.cut_uploads = True
    with pytest.raises(StageError, match=rf"^fashion-publish: the upload to {REPO} broke off \(\w+\); nothing was "
                                         r"committed, so the repo is as it was: rerun to send the rest$"):
        publish.main([REPO])
    assert hub.repos[REPO].files == {} and hub.repos[REPO].commits == []
    hub.cut_uploads = False
    publish.main([REPO])
    assert hub.repos[REPO].files == lora_files(lora_project) and len(hub.repos[REPO].commits) == 1


@pytest.mark.parametrize("case, setup, message", [
    ("token-rejected", lambda p, mp: mp.setenv("HF_TOKEN", "hf_read_only"),
     rf"^fashion-publish: the hub refused the token for {REPO} \(401\); use one that may write there: "
     r"`hf auth login`, \$HF_TOKEN or --token$"),
    ("offline", lambda p, mp: mp.setattr(constants, "HF_HUB_OFFLINE", True),
     r"^fashion-publish: HF_HUB_OFFLINE is set, so no request may reach the hub; unset it to publish$"),
    ("no-token", lambda p, mp: mp.delenv("HF_TOKEN"),
     r"^fashion-publish: no hub token; run `hf auth login` with a write token, or set \$HF_TOKEN$"),
    ("no-lora", lambda p, mp: (p.path("lora") / LORA_WEIGHTS).unlink(),
     rf"^models/lora/{LORA_WEIGHTS}: not found, so there is nothing to publish yet; run `dvc repro train-lora`$"),
    ("no-card", lambda p, mp: (p.path("lora") / CARD_FILE).unlink(),
     r"^models/lora/README.md: not found, so there is nothing to publish yet; run `dvc repro model-card`$"),
])
def test_bad_input_is_one_line_and_uploads_nothing(lora_project, hub, monkeypatch, case, setup, message):
    setup(lora_project, monkeypatch)
    with pytest.raises(StageError, match=message):
        publish.main([REPO])
    assert hub.repos == {}, case


def test_a_card_the_hub_refuses_is_one_line_and_uploads_nothing(lora_project, hub):
    """The hub checks the card's metadata first: a base_model it does not know (as `local:<name>` would be)."""
    card = lora_project.path("lora") / CARD_FILE
    card.write_text(card.read_text().replace("library_name: diffusers", "base_model: local:my-sd15\nlibrary_name: diffusers"))
    with pytest.raises(StageError, match=r'^fashion-publish: the hub refused the model card\'s metadata \(Invalid metadata '
                                         r'in README.md. - "base_model" with value "local:my-sd15" is not valid'):
        publish.main([REPO])
    assert not any(method == "PUT" for method, _, _ in hub.requests) and hub.repos[REPO].commits == []


@pytest.mark.parametrize("repo_id", ["fashion-lora", "you/fashion lora", "you/a--b", "you/../x", "/x", "you/x/y"])
def test_an_invalid_repo_id_is_refused_before_anything_else(repo_id):
    with pytest.raises(StageError, match=rf"^fashion-publish: '.*' is not a hub repo id; use owner/name"):
        publish.main([repo_id])

"""fetch-models' hub and local modes, run for real against a stand-in hub on 127.0.0.1.

The stand-in serves the tiny models laid out file for file like the real repos, including the
files that must never be downloaded (single-file and non-EMA checkpoints, .bin twins,
safety_checker/, Flax and TF weights). fetch-models runs as a subprocess, as DVC runs it, with
HF_ENDPOINT pointing at the stand-in: the real huggingface_hub download code, no mocks.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save

from bench.full_size_models import SD15_MODEL_INDEX
from stages.common import dataset, model_sources
from stages.common.model_layouts import LAYOUTS, select
from tests.conftest import REPO, Project
from tests.hub_standin import Repo, StandIn
from tests.test_params import SECRET_URLS

SD15, CONTROLNET, CLIP = "stable-diffusion-v1-5/stable-diffusion-v1-5", "lllyasviel/control_v11p_sd15_canny", \
    "openai/clip-vit-base-patch32"
JUNK = b"never download this"


def _bin(tensors: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _weights(name: str, tensors: dict, stem: str, bin_stem: str) -> dict[str, bytes]:
    """A model folder's weights as the hub has them: fp32 and fp16, safetensors and .bin twins."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    return {f"{name}/{stem}.safetensors": save(tensors, {"format": "pt"}),
            f"{name}/{stem}.fp16.safetensors": save(half, {"format": "pt"}),
            f"{name}/{bin_stem}.bin": _bin(tensors), f"{name}/{bin_stem}.fp16.bin": _bin(half)}


def _configs(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}{f.name}": f.read_bytes() for f in folder.iterdir() if f.suffix in (".json", ".txt")}


def hub_repos(models_root: Path) -> dict[str, Repo]:
    """The three repos, built from the tiny models, laid out like the real ones on the hub."""
    p = Project(models_root)
    base, controlnet, clip = p.path("base_model"), p.path("controlnet"), p.path("eval_models") / dataset.CLIP_DIR
    sd = {"model_index.json": json.dumps(SD15_MODEL_INDEX).encode(), ".gitattributes": b"*.bin filter=lfs",
          "README.md": b"# SD 1.5", "v1-inference.yaml": b"model: {}", "v1-5-pruned-emaonly.safetensors": JUNK,
          "v1-5-pruned-emaonly.ckpt": JUNK, "v1-5-pruned.safetensors": JUNK, "v1-5-pruned.ckpt": JUNK,
          "unet/diffusion_pytorch_model.non_ema.safetensors": JUNK, "unet/diffusion_pytorch_model.non_ema.bin": JUNK,
          "unet/diffusion_flax_model.msgpack": JUNK, "safety_checker/config.json": b"{}",
          "safety_checker/model.safetensors": JUNK, "safety_checker/pytorch_model.bin": JUNK,
          "feature_extractor/preprocessor_config.json": b"{}"}
    for name in ("scheduler", "tokenizer", "unet", "vae", "text_encoder"):
        sd.update(_configs(base / name, f"{name}/"))
    for name in ("unet", "vae"):
        sd.update(_weights(name, load_file(base / name / "diffusion_pytorch_model.safetensors"),
                           "diffusion_pytorch_model", "diffusion_pytorch_model"))
    sd.update(_weights("text_encoder", load_file(base / "text_encoder" / "model.safetensors"), "model", "pytorch_model"))

    cn = {"README.md": b"# canny", ".gitattributes": b"", "images/control.png": JUNK, "config.json":
          (controlnet / "config.json").read_bytes()}
    cn.update({k.removeprefix("x/"): v for k, v in _weights(
        "x", load_file(controlnet / "diffusion_pytorch_model.safetensors"), "diffusion_pytorch_model",
        "diffusion_pytorch_model").items()})

    # openai's main branch has CLIP's weights only as pytorch_model.bin, beside TF and Flax files.
    cl = {"README.md": b"# CLIP", "tf_model.h5": JUNK, "flax_model.msgpack": JUNK,
          "pytorch_model.bin": _bin(load_file(clip / "model.safetensors")), **_configs(clip, "")}
    return {SD15: Repo(sd, tags=["diffusers", "text-to-image", "license:creativeml-openrail-m"]),
            CONTROLNET: Repo(cn, tags=["license:openrail"]), CLIP: Repo(cl)}


def backbone_files(models_root: Path) -> dict[str, bytes]:
    eval_models = Project(models_root).path("eval_models")
    return {"inception-2015-12-05.pt": (eval_models / dataset.INCEPTION_FILE).read_bytes(),
            "alexnet-owt-7be5be79.pth": (eval_models / dataset.ALEXNET_FILE).read_bytes()}


@pytest.fixture(scope="module")
def hub_content(tiny_models):
    return hub_repos(tiny_models), backbone_files(tiny_models)


@pytest.fixture
def hub(hub_content):
    repos, urls = hub_content
    standin = StandIn(repos={k: Repo(dict(r.files), tags=r.tags) for k, r in repos.items()}, urls=dict(urls))
    standin.url = standin.start()
    yield standin
    standin.stop()


def hub_params(url: str, urls: dict[str, bytes]) -> dict:
    digest = {k: hashlib.sha256(v).hexdigest() for k, v in urls.items()}
    return {"models.mode": "hub", "models.inception_url": f"{url}/files/inception-2015-12-05.pt",
            "models.inception_sha256": digest["inception-2015-12-05.pt"],
            "models.alexnet_url": f"{url}/files/alexnet-owt-7be5be79.pth",
            "models.alexnet_sha256": digest["alexnet-owt-7be5be79.pth"]}  # a mirror: the full digest


def fetch(project: Project, endpoint: str, token: str | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    """`python -m stages.fetch_models` as DVC runs it, with the hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "FASHION_URL_TOKEN"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(project.root / ".hf"), XDG_CACHE_HOME=str(project.root / ".cache"),
               PYTHONPATH=str(REPO), HF_HUB_DISABLE_PROGRESS_BARS="1", **env_vars)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "stages.fetch_models"], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The stage's error: exactly one `error:` line and no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub_project(tmp_path, monkeypatch, hub):
    project = Project(tmp_path).set(hub_params(hub.url, hub.urls))
    monkeypatch.chdir(tmp_path)
    return project


# ------------------------------------------------------------------------------- file selection


def test_select_takes_fp16_safetensors_and_nothing_else(hub_content):
    repos, _ = hub_content
    chosen, missing = select(LAYOUTS["base"], list(repos[SD15].files), "fp16")
    assert missing == []
    assert chosen["unet/diffusion_pytorch_model.safetensors"] == "unet/diffusion_pytorch_model.fp16.safetensors"
    assert chosen["text_encoder/model.safetensors"] == "text_encoder/model.fp16.safetensors"
    sources = set(chosen.values())
    assert not any(s.startswith(("safety_checker/", "feature_extractor/")) or "non_ema" in s or "v1-5" in s
                   or s.endswith((".bin", ".ckpt", ".msgpack", ".yaml", ".md")) for s in sources), sources


def test_select_fp32_and_bin_only_repos():
    files = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"]
    assert select(LAYOUTS["controlnet"], files, "fp32")[0]["diffusion_pytorch_model.safetensors"] == \
        "diffusion_pytorch_model.safetensors"
    clip = ["config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "tf_model.h5"]
    assert select(LAYOUTS["clip"], clip, "fp16")[0]["pytorch_model.bin"] == "pytorch_model.bin"
    _, missing = select(LAYOUTS["controlnet"], ["config.json", "diffusion_pytorch_model.fp16.safetensors"], "fp32")
    assert missing and "fp32 weights" in missing[0]
    _, missing = select(LAYOUTS["base"], [f for f in LAYOUTS["base"].required if f] + ["unet/config.json"], "fp16")
    assert missing[0] == "model_index.json"


# ------------------------------------------------------------------------------------ hub mode


def test_hub_fetches_exactly_what_the_stages_load(hub_project, hub, tiny_models):
    result = fetch(hub_project, hub.url)
    assert result.returncode == 0, result.stderr
    sd = hub.repos[SD15]
    assert hub.fetched(f"{SD15}/resolve/{sd.sha}/") == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
        *[f"tokenizer/{n}" for n in sorted(os.listdir(Project(tiny_models).path("base_model") / "tokenizer"))]])
    assert hub.fetched(f"{CONTROLNET}/resolve/{hub.repos[CONTROLNET].sha}/") == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    clip_fetched = hub.fetched(f"{CLIP}/resolve/{hub.repos[CLIP].sha}/")
    assert "pytorch_model.bin" in clip_fetched and not {"tf_model.h5", "flax_model.msgpack", "README.md"} & set(
        clip_fetched)

    # Installed under plain names, the fp16 weights as fetched; the same layout as tiny mode.
    base = hub_project.path("base_model")
    assert files_under(base) == files_under(Project(tiny_models).path("base_model"))
    unet = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in unet.values())
    assert all(torch.equal(unet[k], v) for k, v in load(sd.files["unet/diffusion_pytorch_model.fp16.safetensors"]).items())
    record = json.loads(hub_project.path("model_sources").read_text())
    assert record["base"]["commit"] == sd.sha and record["mode"] == "hub"
    # the license the LoRA's model card inherits, from the repo's tags
    assert (record["base"]["license"], record["controlnet"]["license"]) == ("creativeml-openrail-m", "openrail")
    lfs = record["base"]["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert lfs["from"] == "unet/diffusion_pytorch_model.fp16.safetensors"
    assert lfs["sha256"] == hashlib.sha256(sd.files[lfs["from"]]).hexdigest()
    backbones = json.loads((hub_project.path("eval_models") / dataset.BACKBONES_FILE).read_text())
    assert backbones["clip"].startswith(f"{CLIP}@{hub.repos[CLIP].sha[:12]}")
    total = sum(len(sd.files[f["from"]]) for f in record["base"]["files"].values())
    assert f"{SD15}@main ({sd.sha[:12]}): {len(record['base']['files'])} files, {total / 1e6:.1f} MB, " \
           f"{total / 1e6:.1f} MB to download" in result.stderr

    # A rerun takes everything from the caches: no file is downloaded again.
    hub.requests.clear()
    rerun = fetch(hub_project, hub.url)
    assert rerun.returncode == 0 and "downloaded 0.0 MB" in rerun.stderr
    assert not [p for m, p, _ in hub.requests if m == "GET" and ("/resolve/" in p or p.startswith("files/"))]


def test_every_stage_runs_on_what_the_hub_gave(hub_project, hub):
    assert fetch(hub_project, hub.url).returncode == 0
    for stage in ("demo_data", "extract", "canny_edges", "train_lora", "generate_baseline", "generate_lora",
                  "metrics"):
        hub_project.run(stage)
    detail = json.loads(hub_project.path("metrics_detail").read_text())
    assert detail["backbones"]["clip"].startswith(CLIP) and detail["n"] == 4


def test_fp32_variant_takes_the_plain_files(hub_project, hub):
    hub_project.set({"models.variant": "fp32"})
    assert fetch(hub_project, hub.url).returncode == 0
    assert "unet/diffusion_pytorch_model.safetensors" in hub.fetched(f"{SD15}/resolve/{hub.repos[SD15].sha}/")
    unet = load_file(hub_project.path("base_model") / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in unet.values())


def test_offline_says_what_to_do(hub_project):
    line = error_line(fetch(hub_project, "http://127.0.0.1:9"))  # nothing listens on port 9
    assert "cannot reach http://127.0.0.1:9" in line and "`dvc pull fetch-models`" in line
    assert "models.mode: local" in line
    assert not hub_project.path("base_model").exists(), "nothing half-written"


@pytest.mark.parametrize("case, expected", [
    ("gated", "is gated: accept its terms on the hub with your account, then set HF_TOKEN"),
    ("private", "not found, or private: check the id, or set HF_TOKEN"),
    ("missing", "models.controlnet_id: nobody/nothing@main on http"),
    ("revision", "models.base_revision: 'v9' is not a branch, tag or commit of"),
])
def test_hub_refusals_read_as_one_line(hub_project, hub, case, expected):
    if case == "gated":
        hub.repos[SD15].token, hub.repos[SD15].gated = "secret", True
    elif case == "private":
        hub.repos[CLIP].token = "secret"
    elif case == "missing":
        hub_project.set({"models.controlnet_id": "nobody/nothing"})
    else:
        hub_project.set({"models.base_revision": "v9"})
    assert expected in error_line(fetch(hub_project, hub.url))
    assert not hub_project.path("base_model").exists()


def test_a_token_opens_a_gated_repo(hub_project, hub):
    hub.repos[SD15].token, hub.repos[SD15].gated = "secret", True
    assert fetch(hub_project, hub.url, token="secret").returncode == 0


def test_interrupted_download_completes_on_rerun(hub_project, hub):
    """huggingface_hub 2.4 drops a half-downloaded file (its temp name is per process), so the
    rerun keeps every file that finished and downloads only what did not."""
    name = "unet/diffusion_pytorch_model.fp16.safetensors"
    hub.cut_at[name] = len(hub.repos[SD15].files[name]) // 2
    line = error_line(fetch(hub_project, hub.url))
    assert "interrupted" in line and "rerun `dvc repro fetch-models`" in line, line
    assert not hub_project.path("base_model").exists()
    prefix = f"{SD15}/resolve/{hub.repos[SD15].sha}/"
    snapshot = hub_project.root / ".hf" / "hub" / f"models--{SD15.replace('/', '--')}" / "snapshots" / \
        hub.repos[SD15].sha
    finished = set(files_under(snapshot)) if snapshot.exists() else set()
    assert name not in finished
    hub.cut_at.clear()
    hub.requests.clear()
    assert fetch(hub_project, hub.url).returncode == 0
    again = set(hub.fetched(prefix))
    assert name in again and not again & finished
    assert files_under(hub_project.path("base_model"))


def test_a_corrupt_hub_file_is_refused(hub_project, hub):
    hub.corrupt.add("text_encoder/model.fp16.safetensors")
    line = error_line(fetch(hub_project, hub.url))
    assert "text_encoder/model.fp16.safetensors does not match the sha256 the hub lists" in line
    hub.corrupt.clear()
    assert fetch(hub_project, hub.url).returncode == 0, "the bad copy was dropped; the rerun fetches a good one"


def test_backbone_checksum_mismatch_is_refused(hub_project, hub):
    hub_project.set({"models.alexnet_sha256": "0" * 64})
    line = error_line(fetch(hub_project, hub.url))
    assert line.startswith("error: models.alexnet_sha256:") and "expected 00000000" in line
    assert not hub_project.path("eval_models").exists()
    assert not list(model_sources_cache(hub_project).glob("*alexnet*")), "the bad file is not kept"


def test_interrupted_url_download_resumes(hub_project, hub):
    size = len(hub.urls["inception-2015-12-05.pt"])
    hub.cut_at["files/inception-2015-12-05.pt"] = size // 3
    line = error_line(fetch(hub_project, hub.url))
    assert line.startswith("error: models.inception_url: download of") and "rerun" in line
    hub.cut_at.clear()
    hub.requests.clear()
    assert fetch(hub_project, hub.url).returncode == 0
    ranges = [r for m, p, r in hub.requests if p == "files/inception-2015-12-05.pt"]
    assert ranges == [f"bytes={size // 3}-"]


@pytest.mark.parametrize("pin", ["", "f58cb9b6"])
def test_an_unpinned_inception_is_refused_before_any_download(hub_project, hub, pin):
    """TorchScript is code that runs when loaded: no download, no load, without its full sha256."""
    hub_project.set({"models.inception_sha256": pin})
    line = error_line(fetch(hub_project, hub.url))
    assert line.startswith("error: params.yaml: models.inception_sha256: expected the file's full sha256")
    assert hub.requests == [] and not hub_project.path("eval_models").exists()


def model_sources_cache(project: Project) -> Path:
    return project.root / ".cache" / "fashion-controlnet-lora" / "downloads"


# ---------------------------------------------------------------------------------- local mode


@pytest.fixture
def local_sources(tmp_path_factory, hub_content) -> dict[str, Path]:
    """The hub repos as plain folders (a Kaggle dataset, say), plus the two backbone files."""
    repos, urls = hub_content
    root = tmp_path_factory.mktemp("local_models")
    sources = {}
    for key, repo_id in (("base", SD15), ("controlnet", CONTROLNET), ("clip", CLIP)):
        for name, data in repos[repo_id].files.items():
            (root / key / name).parent.mkdir(parents=True, exist_ok=True)
            (root / key / name).write_bytes(data)
        sources[key] = root / key
    for key, name in (("inception", "inception-2015-12-05.pt"), ("alexnet", "alexnet-owt-7be5be79.pth")):
        (root / name).write_bytes(urls[name])
        sources[key] = root / name
    return sources


def local_params(sources: dict[str, Path], urls: dict[str, bytes]) -> dict:
    return {"models.mode": "local", **{f"models.local.{k}": str(v) for k, v in sources.items()},
            "models.inception_sha256": hashlib.sha256(urls["inception-2015-12-05.pt"]).hexdigest(),
            "models.alexnet_sha256": hashlib.sha256(urls["alexnet-owt-7be5be79.pth"]).hexdigest()}


def test_local_mode_installs_the_same_models_as_hub_mode(hub_project, hub, local_sources, tmp_path_factory):
    assert fetch(hub_project, hub.url).returncode == 0
    other = Project(tmp_path_factory.mktemp("local_project")).set(local_params(local_sources, hub.urls))
    result = fetch(other, "http://127.0.0.1:9")  # no network needed
    assert result.returncode == 0, result.stderr
    for key in ("base_model", "controlnet"):  # byte for byte: downstream stages need not rerun
        ours, theirs = other.path(key), hub_project.path(key)
        assert files_under(ours) == files_under(theirs)
        assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files_under(ours)), key
    assert "hard-linked" in result.stderr
    unet = other.path("base_model") / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.stat().st_ino == (local_sources["base"] / "unet" / "diffusion_pytorch_model.fp16.safetensors"
                                  ).stat().st_ino, "same file system: linked, not copied"


@pytest.mark.parametrize("remove, expected", [
    ("base/unet/config.json", "models.local.base: {root}/base/unet/config.json is missing; {root}/base must be an SD 1.5"),
    ("base/vae/diffusion_pytorch_model.fp16.safetensors;base/vae/diffusion_pytorch_model.safetensors;"
     "base/vae/diffusion_pytorch_model.bin;base/vae/diffusion_pytorch_model.fp16.bin",
     "models.local.base: {root}/base/vae/diffusion_pytorch_model.fp16.safetensors (or another fp16 weights file) "
     "is missing"),
    ("clip/config.json", "models.local.clip: {root}/clip/config.json is missing"),
    ("alexnet-owt-7be5be79.pth", "models.local.alexnet: {root}/alexnet-owt-7be5be79.pth not found"),
])
def test_local_folder_with_a_file_missing_names_it(local_sources, hub_content, tmp_path, remove, expected):
    _, urls = hub_content
    root = local_sources["base"].parent
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for rel in remove.split(";"):
        (copy / rel).unlink()
    sources = {k: copy / v.relative_to(root) for k, v in local_sources.items()}
    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project").set(local_params(sources, urls))
    assert error_line(fetch(project, "http://127.0.0.1:9")).startswith("error: " + expected.format(root=copy))
    assert not project.path("base_model").exists()


def test_local_mode_needs_every_path(tmp_path):
    project = Project(tmp_path).set({"models.mode": "local"})
    assert error_line(fetch(project, "http://127.0.0.1:9")).startswith(
        "error: params.yaml: models.local.base: empty, but models.mode is local; set it to the SD 1.5")


def test_local_alexnet_checksum_is_verified(local_sources, hub_content, tmp_path):
    _, urls = hub_content
    project = Project(tmp_path).set({**local_params(local_sources, urls), "models.alexnet_sha256": "deadbeef"})
    line = error_line(fetch(project, "http://127.0.0.1:9"))
    assert line.startswith(f"error: models.alexnet_sha256: {local_sources['alexnet']} has sha256")


def test_download_cache_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_sources.download_cache() == tmp_path / "fashion-controlnet-lora" / "downloads"


def test_a_backbone_that_does_not_load_is_refused(hub_project, hub):
    """A pin copied from the wrong file (here an HTML error page's): it must not pass as Inception."""
    hub.urls["inception-2015-12-05.pt"] = b"<html>502 Bad Gateway</html>"
    hub_project.set({"models.inception_sha256": hashlib.sha256(hub.urls["inception-2015-12-05.pt"]).hexdigest()})
    line = error_line(fetch(hub_project, hub.url))
    assert line.startswith("error: models.inception_url: http") and "does not load" in line
    assert not list(model_sources_cache(hub_project).glob("*inception*")), "the bad file is not kept"


def test_storage_client_failures_read_as_one_line(hub_project, hub, monkeypatch):
    """The real hub serves large files through hf_xet, whose failures are RuntimeErrors."""
    import huggingface_hub
    from huggingface_hub import constants

    def xet_fails(*args, **kwargs):
        raise RuntimeError("Data processing error: CAS service error : Reqwest Error")

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", xet_fails)
    with pytest.raises(model_sources.StageError, match=r"download of .* failed \(Data processing error: CAS "
                                                        r"service error.*\); rerun .*HF_HUB_DISABLE_XET=1"):
        model_sources.from_hub(SD15, "main", LAYOUTS["base"], "fp16", "base", hub_project.root / "x")


def test_disk_errors_say_which_disk():
    import errno

    from stages.common.cli import disk_error

    full = OSError(errno.ENOSPC, "No space left on device", "/data/models/base/unet")
    assert disk_error(full, "fetch-models").startswith("/data/models/base/unet: no space left on the device; free")
    denied = OSError(errno.EACCES, "Permission denied", "/kaggle/input/sd15/unet")
    assert disk_error(denied, "fetch-models") == ("/kaggle/input/sd15/unet: Permission denied; check the path and "
                                                  "its permissions, then rerun `dvc repro fetch-models`")


# --------------------------------------------------------------------------------- credentials


def guard_files(standin: StandIn, token: str | None = None, moved: dict[str, str] | None = None) -> list:
    """Wrap the stand-in's /files/ answers: record each request's Authorization header, refuse
    (401) one without `Bearer <token>` when a token is given, and redirect `moved` names to URLs."""
    seen, handle = [], standin.handle

    def guarded(h, head):
        path = h.path.lstrip("/")
        if path.startswith("files/"):
            seen.append(h.headers.get("Authorization"))
            if token and h.headers.get("Authorization") != f"Bearer {token}":
                return standin.error(h, 401)
            if path.removeprefix("files/") in (moved or {}):
                h.send_response(302)
                h.send_header("Location", moved[path.removeprefix("files/")])
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
        return handle(h, head)

    standin.handle = guarded
    return seen


def test_a_mirror_token_goes_as_a_header_and_is_never_written(hub_project, hub):
    token = "mirror-t0ken-5d1e9c"
    seen = guard_files(hub, token)
    line = error_line(fetch(hub_project, hub.url))
    assert line.startswith("error: models.inception_url: http") and "HTTP 401" in line
    assert "a mirror that wants a token: set $FASHION_URL_TOKEN" in line
    seen.clear()
    result = fetch(hub_project, hub.url, FASHION_URL_TOKEN=token)
    assert result.returncode == 0, result.stderr
    assert seen == [f"Bearer {token}"] * 2, "one request each for the Inception and AlexNet, with the token"
    assert "models.inception_url: sending $FASHION_URL_TOKEN as an Authorization header" in result.stderr
    assert token not in result.stdout + result.stderr
    written = [p for p in hub_project.root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert written == [], "no log, record, model or cache file holds the token"
    assert json.loads(hub_project.path("model_sources").read_text())["inception"]["url"].startswith(hub.url)


def test_the_token_does_not_follow_a_redirect(hub, monkeypatch, tmp_path):
    """A mirror that redirects (to a CDN, a bucket) gets the token; whoever it names does not."""
    alexnet = hub.urls["alexnet-owt-7be5be79.pth"]
    other = StandIn(urls={"alexnet.pth": alexnet})
    other_url = other.start()
    try:
        theirs = guard_files(other)
        ours = guard_files(hub, moved={"moved.pth": f"{other_url}/files/alexnet.pth"})
        monkeypatch.setenv("FASHION_URL_TOKEN", "redirect-t0ken")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        record = model_sources.from_url(f"{hub.url}/files/moved.pth", hashlib.sha256(alexnet).hexdigest(),
                                        "models.alexnet_url", "models.alexnet_sha256", tmp_path / "alexnet.pth",
                                        torchscript=False)
    finally:
        other.stop()
    assert ours == ["Bearer redirect-t0ken"] and theirs == [None]
    assert record["size"] == len(alexnet) and (tmp_path / "alexnet.pth").read_bytes() == alexnet


@pytest.mark.parametrize("url, token, expected", [
    (model_sources.INCEPTION_URL, "abc", None),  # the public files need none: never sent there
    (model_sources.ALEXNET_URL, "abc", None),
    ("https://mirror.example/x.pt", " abc.def_1/+= \n", "abc.def_1/+="),
    ("http://127.0.0.1:8000/x.pt", "abc", "abc"),  # this machine: nothing crosses a network
    ("https://mirror.example/x.pt", "", None),
    ("http://mirror.example/x.pt", "abc", ("error: models.inception_url: $FASHION_URL_TOKEN is set, but "
                                           "http://mirror.example/x.pt is plain http, so the token would cross the "
                                           "network unencrypted; use the mirror's https URL")),
    ("https://mirror.example/x.pt", "abc\r\nX-Evil: 1", ("error: $FASHION_URL_TOKEN: not a valid token (spaces, "
                                                         "line breaks or non-ASCII characters); set it to the bare "
                                                         "token")),
])
def test_which_urls_get_the_token(monkeypatch, url, token, expected):
    monkeypatch.setenv("FASHION_URL_TOKEN", token)
    if expected is None or not expected.startswith("error: "):
        assert model_sources.url_token(url, "models.inception_url") == expected
        return
    with pytest.raises(model_sources.StageError) as err:
        model_sources.url_token(url, "models.inception_url")
    assert f"error: {err.value}" == expected and "abc" not in str(err.value)


def run_stage(main, monkeypatch, capsys, caplog) -> tuple[str, str]:
    """A stage's main under the CLI wrapper, as `python -m` runs it: (its error line, all it printed or logged)."""
    from stages.common.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["stages/fetch_models.py"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line, out + err + caplog.text


@pytest.mark.parametrize("url, what, secrets, shown", SECRET_URLS)
def test_a_secret_in_a_url_reaches_no_output_and_no_file(tmp_path, monkeypatch, capsys, caplog, url, what, secrets,
                                                         shown):
    from stages import fetch_models

    Project(tmp_path).set({"models.mode": "hub", "models.inception_url": url})
    monkeypatch.chdir(tmp_path)
    line, printed = run_stage(fetch_models.main, monkeypatch, capsys, caplog)
    assert line.startswith(f"error: params.yaml: models.inception_url: {shown} carries {what}, which would be "
                           "copied into dvc.lock"), line
    assert [s for s in secrets if s in printed] == []
    assert [p.name for p in tmp_path.rglob("*")] == ["params.yaml"], "no model, no sources.json, no cache"


def test_a_hub_endpoint_with_credentials_is_refused(tmp_path, monkeypatch, capsys, caplog):
    """Hub errors print HF_ENDPOINT; the hub client sends HF_TOKEN as a header itself."""
    from stages import fetch_models

    Project(tmp_path).set({"models.mode": "hub"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "https://alice:hunter2@hub-mirror.example/api?sig=5ec7e7")
    line, printed = run_stage(fetch_models.main, monkeypatch, capsys, caplog)
    assert line == ("error: HF_ENDPOINT: https://...@hub-mirror.example/api?... carries a user name or password "
                    "and a query string; set it to the mirror's plain URL and its token in HF_TOKEN (sent as a "
                    "header, never logged or recorded)")
    assert [s for s in ("alice", "hunter2", "5ec7e7") if s in printed] == []
    assert [p.name for p in tmp_path.rglob("*")] == ["params.yaml"]


@pytest.mark.parametrize("endpoint", ["https://[::1", "hub-mirror.example", "ftp://alice:pw@x/"])
def test_a_hub_endpoint_that_is_no_url_is_one_line(tmp_path, monkeypatch, capsys, caplog, endpoint):
    from stages import fetch_models

    Project(tmp_path).set({"models.mode": "hub"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    line, printed = run_stage(fetch_models.main, monkeypatch, capsys, caplog)
    assert line == ("error: HF_ENDPOINT: not an http or https URL with a host (not shown: it may hold a secret); set "
                    "it to the mirror's plain URL, or unset it for huggingface.co")
    assert "pw" not in printed and [p.name for p in tmp_path.rglob("*")] == ["params.yaml"]

"""Where the real models come from: the Hugging Face hub, plain URLs, or folders the user has.

Hub and local mode share one path. From a repo's file list, `select()` (model_layouts.py) picks what the stages
load: config and tokenizer files, and one weights file per model folder, the fp16 variant first
when asked for, a safetensors file before its .bin twin. It never picks safety_checker/, the
single-file or non-EMA checkpoints, or Flax/TF weights. `install()` then links or copies the
picked files into a folder under their plain names (`diffusion_pytorch_model.fp16.safetensors`
becomes `diffusion_pytorch_model.safetensors`). So loaders never need a variant, and a models/
folder hashes the same whichever way its weights arrived.

Only fetch-models imports this module: it is the one stage allowed to touch the network.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from stages.common.cli import DISK_ERRNOS, disk_error, log
from stages.common.errors import StageError
from stages.common.io import sha256_of
from stages.common.model_layouts import Layout, list_folder, select
from stages.common.params import (ALEXNET_URL, INCEPTION_URL, URL_TOKEN_ENV, is_loopback, public_url, url_secrets,
                                  valid_url)


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` (symlinks resolved, as in the hub cache) to `target`, or copy it when
    they are on different file systems or links are not allowed. Returns True if linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(source), target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def install(root: Path, chosen: dict[str, str], target: Path, key: str) -> dict[str, dict]:
    """Put `chosen` ({installed name: source name under root}) into `target`; returns a record of
    each file (source name and size) for models/sources.json."""
    linked = 0
    record = {}
    for name, source in sorted(chosen.items()):
        linked += link_or_copy(root / source, target / name)
        record[name] = {"from": source, "size": (target / name).stat().st_size}
    log.info("fetch-models: %s: %d files (%.1f MB), %d hard-linked, %d copied", key, len(chosen),
             sum(r["size"] for r in record.values()) / 1e6, linked, len(chosen) - linked)
    return record


def check_sha256(path: Path, expected: str, key: str, source: str) -> str:
    """`path`'s sha256, which must start with `expected` (params.py makes it a full digest, or for
    torchvision's own AlexNet a prefix of at least 8 hex digits)."""
    if len(expected) < 8:
        raise StageError(f"{key}: empty or shorter than 8 hex digits, so {source} is not pinned; set it to the "
                         "file's sha256")
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise StageError(f"{key}: {source} has sha256 {actual[:16]}..., expected {expected[:16]}...; "
                         "the file is corrupt or another file: check the URL or path, then rerun")
    return actual


# ---------------------------------------------------------------------------------------- local


def from_local(folder: str, layout: Layout, variant: str, key: str, target: Path) -> dict:
    """Validate a user's model folder and install it into `target`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise StageError(f"{key}: {root} is not a folder; set it to {layout.what}")
    chosen, missing = select(layout, list_folder(root), variant)
    if missing:
        raise StageError(f"{key}: {root / missing[0]} is missing; {root} must be {layout.what}")
    return {"path": str(root), "files": install(root, chosen, target, key)}


def check_loads(path: Path, key: str, source: str, torchscript_sha256: str | None = None) -> None:
    """A metric backbone must load as what it claims to be: clean-fid's Inception is TorchScript,
    AlexNet a state dict. TorchScript is code that runs when loaded, so only a file whose full
    sha256 was just checked (`torchscript_sha256`) is loaded as one; a state dict loads with
    weights_only, which runs none."""
    import warnings

    import torch

    if torchscript_sha256 is not None and len(torchscript_sha256) != 64:  # params.py refuses it first
        raise StageError(f"{key}: {source} is TorchScript, which loads only when pinned by a full sha256")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch calls jit deprecated
            if torchscript_sha256 is not None:
                torch.jit.load(str(path), map_location="cpu")
            else:
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle and zip errors alike
        raise StageError(f"{key}: {source} does not load ({type(err).__name__}); it is not the expected "
                         "model file: check the URL or path and its sha256") from None


def local_file(path: str, expected_sha256: str, key: str, sha_key: str, target: Path, torchscript: bool) -> dict:
    source = Path(path).expanduser()
    if not source.is_file():
        raise StageError(f"{key}: {source} not found; set it to the file's path")
    digest = check_sha256(source, expected_sha256, sha_key, str(source))
    check_loads(source, key, str(source), expected_sha256 if torchscript else None)
    link_or_copy(source, target)
    return {"path": str(source), "sha256": digest, "size": target.stat().st_size}


# ------------------------------------------------------------------------------------------ hub


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, key: str):
    """Turn huggingface_hub's exceptions into one line that says what to do next."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}@{revision} on {constants.ENDPOINT}"
    # huggingface_hub keeps finished files in its cache but drops a half-downloaded one.
    rerun = "rerun `dvc repro fetch-models`: files already downloaded are kept"
    offline = ("hub mode needs the network: `dvc pull fetch-models` takes the models from a DVC remote, "
               "or set models.mode: local and models.local.* to folders you have")
    try:
        yield
    except GatedRepoError:
        raise StageError(f"models.{key}_id: {where} is gated: accept its terms on the hub with your account, "
                         "then set HF_TOKEN to a read token and rerun") from None
    except RevisionNotFoundError:
        raise StageError(f"models.{key}_revision: {revision!r} is not a branch, tag or commit of {repo_id}") from None
    except RepositoryNotFoundError:
        raise StageError(f"models.{key}_id: {where} not found, or private: check the id, or set HF_TOKEN "
                         "to a token that can read it") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        reason = "HF_HUB_OFFLINE is set" if isinstance(err, OfflineModeIsEnabled) or os.environ.get(
            "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else "no connection"
        raise StageError(f"cannot reach {constants.ENDPOINT} ({reason}) for {repo_id}; {offline}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        if status == 401:
            raise StageError(f"models.{key}_id: {where} refused the token (HTTP 401): set HF_TOKEN to a valid "
                             "read token") from None
        raise StageError(f"{where}: HTTP {status}; {rerun}") from None
    except OSError as err:
        if err.errno in DISK_ERRNOS:  # the disk, not the network
            raise StageError(disk_error(err, "fetch-models")) from None
        raise StageError(f"download of {where} interrupted ({type(err).__name__}); {rerun}") from None
    except Exception as err:
        if type(err).__module__.startswith(("httpx", "httpcore")):  # the HTTP client's transport errors
            if "Connect" in type(err).__name__:
                raise StageError(f"cannot reach {constants.ENDPOINT} ({type(err).__name__}) for {repo_id}; "
                                 f"{offline}") from None
            raise StageError(f"download of {where} interrupted ({type(err).__name__}); {rerun}") from None
        if isinstance(err, RuntimeError):  # hf_xet, the hub's chunked storage client, fails this way
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise StageError(f"download of {where} failed ({first}); {rerun}; if it keeps failing, "
                             "set HF_HUB_DISABLE_XET=1 to download over plain HTTPS") from None
        raise


def check_endpoint() -> None:
    """HF_ENDPOINT (a hub mirror) carries no credentials: errors print it. The token goes in HF_TOKEN."""
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint and not valid_url(endpoint):
        raise StageError("HF_ENDPOINT: not an http or https URL with a host (not shown: it may hold a secret); set "
                         "it to the mirror's plain URL, or unset it for huggingface.co")
    if endpoint and (secrets := url_secrets(endpoint)):
        raise StageError(f"HF_ENDPOINT: {public_url(endpoint)} carries {' and '.join(secrets)}; set it to the "
                         "mirror's plain URL and its token in HF_TOKEN (sent as a header, never logged or recorded)")


def from_hub(repo_id: str, revision: str, layout: Layout, variant: str, key: str, target: Path) -> dict:
    """Download what `layout` needs from a hub repo (resumable, into the HF cache), verify every
    LFS file's sha256 against the hub's listing, and install it into `target`."""
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    with hub_errors(repo_id, revision, key):
        info = api.model_info(repo_id, revision=revision)
        commit = info.sha
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)}
        chosen, missing = select(layout, list(tree), variant)
        if missing:
            raise StageError(f"models.{key}_id: {repo_id}@{revision} has no {missing[0]}; "
                             f"it must be {layout.what}")
        sources = sorted(set(chosen.values()))
        cached = sum(tree[s].size for s in sources
                     if isinstance(try_to_load_from_cache(repo_id, s, revision=commit), str))
        total = sum(tree[s].size for s in sources)
        log.info("fetch-models: %s@%s (%s): %d files, %.1f MB, %.1f MB to download", repo_id, revision,
                 commit[:12], len(sources), total / 1e6, (total - cached) / 1e6)
        snapshot = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(s) for s in sources]))
    for source in sources:
        lfs = tree[source].lfs
        if lfs is not None and sha256_of(snapshot / source) != lfs.sha256:
            Path(os.path.realpath(snapshot / source)).unlink()  # the blob, or the next run would reuse it
            (snapshot / source).unlink(missing_ok=True)
            raise StageError(f"models.{key}_id: {repo_id}/{source} does not match the sha256 the hub lists "
                             f"({lfs.sha256[:16]}...); removed it from the cache: rerun `dvc repro fetch-models`")
    files = install(snapshot, chosen, target, f"models.{key}_id")
    for name, entry in files.items():
        if tree[entry["from"]].lfs is not None:
            entry["sha256"] = tree[entry["from"]].lfs.sha256
    # The repo's license tag, which the LoRA's model card inherits (SD 1.5: creativeml-openrail-m)
    licence = next((tag.split(":", 1)[1] for tag in info.tags or [] if tag.startswith("license:")), None)
    return {"id": repo_id, "revision": revision, "commit": commit, "license": licence, "files": files,
            "downloaded_bytes": total - cached}


# ----------------------------------------------------------------------------------------- URLs


def download_cache() -> Path:
    """Where URL downloads (the metric backbones) are kept between runs, so a rerun resumes."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-controlnet-lora" / "downloads"


def url_token(url: str, key: str) -> str | None:
    """$FASHION_URL_TOKEN for a mirror (any URL but the public defaults, which need none), checked
    to be a header value and never sent in the clear off this machine. Never logged or recorded."""
    token = os.environ.get(URL_TOKEN_ENV, "").strip()
    if not token or url in (INCEPTION_URL, ALEXNET_URL):
        return None
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # http.client would echo a bad value in its error
        raise StageError(f"${URL_TOKEN_ENV}: not a valid token (spaces, line breaks or non-ASCII characters); "
                         "set it to the bare token")
    host = urllib.parse.urlsplit(url).hostname
    if not url.startswith("https://") and not is_loopback(host):
        raise StageError(f"{key}: ${URL_TOKEN_ENV} is set, but {url} is plain http, so the token would cross "
                         "the network unencrypted; use the mirror's https URL")
    return token


def _download(url: str, part: Path, token: str | None) -> None:
    """Fetch `url` into `part`, resuming from its current size when the server allows it."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    if token:  # not forwarded on a redirect: urllib would hand it to whatever host the mirror names
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if done and err.code == 416:  # the part file is already whole
            return
        raise
    with response:
        if done and response.status != 206:  # no range support: start again
            done = 0
        total = done + int(response.headers.get("Content-Length", 0))
        with part.open("ab" if done else "wb") as f, tqdm(total=total, initial=done, unit="B", unit_scale=True,
                                                          desc=url.rsplit("/", 1)[-1]) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))
        if total and part.stat().st_size != total:
            raise ConnectionError(f"got {part.stat().st_size} of {total} bytes")


def from_url(url: str, expected_sha256: str, key: str, sha_key: str, target: Path, torchscript: bool) -> dict:
    """Download `url` (resumable, cached), verify its sha256 and link it to `target`."""
    cache = download_cache()
    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + url.rsplit("/", 1)[-1]
    done, part = cache / name, cache / (name + ".part")
    downloaded = 0
    if not done.exists():
        before = part.stat().st_size if part.exists() else 0
        token = url_token(url, key)
        if token:
            log.info("fetch-models: %s: sending $%s as an Authorization header", key, URL_TOKEN_ENV)
        try:
            _download(url, part, token)
        except urllib.error.HTTPError as err:
            fix = f"set {key} to a working URL or mirror"
            if err.code in (401, 403):
                fix = (f"set ${URL_TOKEN_ENV} to a token the server accepts" if token
                       else f"a mirror that wants a token: set ${URL_TOKEN_ENV}")
            raise StageError(f"{key}: {url}: HTTP {err.code} {err.reason}; {fix}, or use models.mode: local") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StageError(f"{key}: download of {url} stopped ({reason}); rerun `dvc repro fetch-models` to "
                             "resume, or `dvc pull fetch-models` to take the models from a DVC remote") from None
        downloaded = part.stat().st_size - before
        os.replace(part, done)
    try:
        digest = check_sha256(done, expected_sha256, sha_key, url)
        check_loads(done, key, url, expected_sha256 if torchscript else None)
    except StageError:
        done.unlink()  # never keep a file that failed its check
        raise
    link_or_copy(done, target)
    return {"url": url, "sha256": digest, "size": target.stat().st_size, "downloaded_bytes": downloaded}

"""fashion-publish: the trained LoRA and its model card onto the Hugging Face hub, as one commit.

    fashion-publish you/fashion-lora                 # create the repo if needed, upload, commit
    fashion-publish you/fashion-lora --dry-run       # list what would go, upload nothing
    fashion-publish you/fashion-lora --private --revision experiments

Uploads every file of `paths.lora`: both weight files, training_config.json, the model card
(README.md, written by the model-card stage) and the samples image it shows. It refuses while
`dvc status` says a stage is out of date: the card would then describe other weights than the
ones uploaded. The token comes from `--token`, $HF_TOKEN or `hf auth login`, and must be allowed
to write. All files go in one commit, made only once every upload has arrived: an upload cut off
halfway changes nothing on the hub, and a rerun sends only what is not there yet.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

from fashion.bundle import check_up_to_date
from stages.common.cli import log, run_cli, setup_logging
from stages.common.errors import StageError
from stages.common.io import read_json
from stages.common.dataset import CARD_FILE, LORA_CONFIG, LORA_WEIGHTS
from stages.common.params import HUB_ID, load_params


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 1, as every command of the project
        raise StageError(f"fashion-publish: {message}; see fashion-publish --help")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="fashion-publish", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="the hub repo to publish to, owner/name (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default="main", help="the branch to commit to (created from main if new)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and where they would go; upload nothing")
    parser.add_argument("--token", help="a hub token with write access (default: $HF_TOKEN or `hf auth login`'s)")
    args = parser.parse_args(argv)
    # The hub's rule: owner/name of letters, digits, '-', '_' and '.', at most 96 characters, no '--' or '..'
    if not re.fullmatch(HUB_ID, args.repo_id) or len(args.repo_id) > 96 or "--" in args.repo_id \
            or ".." in args.repo_id:
        raise StageError(f"fashion-publish: {args.repo_id!r} is not a hub repo id; use owner/name (letters, digits, "
                         "'-', '_' and '.'), e.g. you/fashion-lora")
    return args


def files_to_publish(folder: Path) -> dict[str, Path]:
    """The LoRA folder's files by their names in the repo, once the weights and the card are there."""
    for name, stage in ((LORA_WEIGHTS, "train-lora"), (CARD_FILE, "model-card")):
        if not (folder / name).is_file():
            raise StageError(f"{folder / name}: not found, so there is nothing to publish yet; run `dvc repro "
                             f"{stage}`")
    return {f.name: f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def network_error(err: BaseException | None) -> BaseException | None:
    """The connection failure under `err`, if any: an OSError, or a transport error of the HTTP
    client (httpx, or httpx2 in huggingface_hub 2), not an HTTP status the hub answered."""
    transport = tuple(importlib.import_module(name).TransportError for name in ("httpx", "httpx2")
                      if importlib.util.find_spec(name))
    while err is not None:
        if isinstance(err, (OSError, *transport)):
            return err
        err = err.__cause__ or err.__context__
    return None


def hub_message(err: Exception) -> str:
    """What the hub said, on one line (its message, else the error's first non-empty line)."""
    said = getattr(err, "server_message", None) or str(err)
    return " ".join(line.strip() for line in said.splitlines() if line.strip())[:300]


def upload(args, files: dict[str, Path], token: str) -> str:
    """Create the repo (and branch), then one commit of every file; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    config = read_json(files[LORA_CONFIG]) if LORA_CONFIG in files else {}
    message = (f"fashion-publish: LoRA of {config.get('base_model_name', 'an SD 1.5 base')}, "
               f"{config.get('train', {}).get('max_steps', '?')} steps")
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        if args.revision != "main":
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        commit = api.create_commit(args.repo_id, revision=args.revision, commit_message=message, operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()])
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise StageError(f"fashion-publish: the hub refused the token for {args.repo_id} ({status}); use one "
                             "that may write there: `hf auth login`, $HF_TOKEN or --token") from None
        raise StageError(f"fashion-publish: the hub answered {status} for {args.repo_id} ({hub_message(err)}); "
                         "nothing was committed") from None
    except ValueError as err:  # the hub's check of README.md's metadata, before any upload
        if "README.md" not in str(err):
            raise
        raise StageError(f"fashion-publish: the hub refused the model card's metadata ({hub_message(err)}); "
                         "nothing was uploaded: fix models/lora/README.md's front matter (`dvc repro model-card`)"
                         ) from None
    except Exception as err:  # huggingface_hub wraps a failed upload in a RuntimeError
        cause = network_error(err)
        if cause is None:
            raise
        raise StageError(f"fashion-publish: the upload to {args.repo_id} broke off ({type(cause).__name__}); nothing "
                         "was committed, so the repo is as it was: rerun to send the rest") from None
    return commit.commit_url


def size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> None:
    setup_logging(network=True)
    args = parse(argv)
    files = files_to_publish(Path(load_params().paths.lora))
    check_up_to_date("so the model card would describe other weights than these", override=None)
    from huggingface_hub import constants, get_token

    where = f"{constants.ENDPOINT}/{args.repo_id}"
    listing = "\n".join(f"  {name}  {size(path.stat().st_size)}" for name, path in files.items())
    if args.dry_run:
        print(f"would upload {len(files)} files to {where} (branch {args.revision}"
              f"{', private' if args.private else ''}), in one commit:\n{listing}")
        return
    if constants.HF_HUB_OFFLINE:
        raise StageError("fashion-publish: HF_HUB_OFFLINE is set, so no request may reach the hub; unset it to publish")
    token = args.token or get_token()
    if not token:
        raise StageError("fashion-publish: no hub token; run `hf auth login` with a write token, or set $HF_TOKEN")
    url = upload(args, files, token)
    log.info("publish: %d files to %s (branch %s) in one commit: %s", len(files), where, args.revision, url)


def cli() -> None:
    run_cli(main)

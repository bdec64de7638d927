"""A local stand-in for the Hugging Face hub and for plain download URLs, on 127.0.0.1.

It answers exactly what huggingface_hub's `model_info`, `list_repo_tree` and `snapshot_download`
ask (repo info, the recursive tree with LFS sha256s, HEAD and ranged GET of `resolve/`), with the
hub's error headers (`X-Error-Code: RepoNotFound | GatedRepo | RevisionNotFound`), so tests run
the real download code against repos laid out file for file like the real ones. It logs every
request, and can cut a download off at a byte offset or serve a corrupted file.

Uploads take the hub's HTTP protocol, as `create_repo`, `create_branch` and `create_commit` speak
it with hf_xet turned off (HF_HUB_DISABLE_XET; the real hub takes both): repo creation, README
validation, preupload (LFS or regular per file), the LFS batch API with a basic PUT per object,
and the NDJSON commit, which is the one step that changes a repo. Every upload needs
`write_token`; `cut_uploads` drops each LFS PUT's connection halfway.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".h5", ".pt", ".pth", ".png")


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""
    token: str | None = None  # requests must carry it (a private or gated repo)
    gated: bool = False
    tags: list[str] = field(default_factory=list)  # e.g. license:creativeml-openrail-m, as the hub tags a repo
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # other than main, which is `files`
    commits: list[str] = field(default_factory=list)  # commit messages, oldest first

    def __post_init__(self):
        if not self.sha:
            self.sha = hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    urls: dict[str, bytes] = field(default_factory=dict)  # /files/<name> -> content
    cut_at: dict[str, int] = field(default_factory=dict)  # file path -> byte offset where every GET stops
    corrupt: set[str] = field(default_factory=set)  # file paths served with one byte flipped
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    write_token: str | None = None  # what uploads must carry
    cut_uploads: bool = False  # every LFS upload's connection drops halfway through
    lfs: dict[str, bytes] = field(default_factory=dict)  # uploaded LFS objects by sha256

    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                standin.handle(self, head=True)

            def do_GET(self):
                standin.handle(self, head=False)

            def do_POST(self):
                standin.upload(self)

            def do_PUT(self):
                standin.upload(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, prefix: str) -> list[str]:
        """Paths GET-requested under `prefix` (e.g. 'owner/name/resolve/<sha>/'), sorted, unique."""
        return sorted({p.removeprefix(prefix) for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)})

    # ------------------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path).lstrip("/")
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range", "")))
        if path.startswith("files/"):
            name = path.removeprefix("files/")
            if name not in self.urls:
                return self.error(h, 404)
            return self.send_file(h, head, f"files/{name}", self.urls[name], {})
        parts = path.split("/")
        api = parts[0] == "api" and len(parts) >= 6 and parts[1] == "models"
        repo_id = "/".join(parts[2:4]) if api else "/".join(parts[0:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.error(h, 401, "RepoNotFound")  # what the real hub answers an anonymous caller
        if repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}":
            return self.error(h, 401, "GatedRepo" if repo.gated else "RepoNotFound")
        if api:
            verb, rest = parts[4], parts[5:]
            revision = rest[0]  # a branch name with a slash arrives encoded as %2F
            if revision not in ("main", repo.sha):
                return self.error(h, 404, "RevisionNotFound")
            if verb == "revision":
                body = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": bool(repo.token),
                        "gated": repo.gated, "disabled": False, "tags": repo.tags,
                        "siblings": [{"rfilename": f} for f in repo.files]}
                return self.send_json(h, head, body)
            if verb == "tree":
                return self.send_json(h, head, self.tree(repo))
            return self.error(h, 404)
        if len(parts) < 5 or parts[2] != "resolve":
            return self.error(h, 404)
        revision, name = parts[3], "/".join(parts[4:])
        if revision not in ("main", repo.sha):
            return self.error(h, 404, "RevisionNotFound")
        if name not in repo.files:
            return self.error(h, 404, "EntryNotFound")
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(data)}"'}
        if name.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha256}"'})
        return self.send_file(h, head, f"{repo_id}/{name}", data, headers)

    def tree(self, repo: Repo) -> list[dict]:
        entries, folders = [], set()
        for name, data in sorted(repo.files.items()):
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode()), "size": 0}
                for f in sorted(folders)] + entries

    def send_json(self, h, head: bool, body, status: int = 200) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def send_file(self, h, head: bool, key: str, data: bytes, headers: dict) -> None:
        if key.split("/", 2)[-1] in self.corrupt or key in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        ranged = h.headers.get("Range", "")
        if ranged.startswith("bytes=") and not head:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self.error(h, 416)
        h.send_response(206 if start else 200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        cut = next((v for k, v in self.cut_at.items() if key.endswith(k)), None)
        if cut is not None and cut < len(data):
            h.wfile.write(data[start:max(start, cut)])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the connection drops mid-file
            return
        h.wfile.write(data[start:])

    def error(self, h, status: int, code: str | None = None) -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    # ---------------------------------------------------------------------------------- uploads

    def upload(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path).lstrip("/")
        self.requests.append((h.command, path, ""))
        if h.command == "PUT" and path.startswith("lfs-upload/"):  # an LFS PUT carries no token
            return self.put_object(h, path.removeprefix("lfs-upload/"))
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        if h.headers.get("Authorization") != f"Bearer {self.write_token}":
            h.send_response(401)  # the hub's answer to a missing, wrong or read-only token
            h.send_header("X-Error-Message", "Invalid credentials in Authorization header")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        parts = path.split("/")
        if path == "api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            if repo_id in self.repos:  # the hub's 409 still names the repo's URL
                return self.send_json(h, False, {"error": "You already created this model repo",
                                                 "url": f"http://{h.headers['Host']}/{repo_id}"}, status=409)
            self.repos[repo_id] = Repo({}, private=request.get("visibility") == "private")
            return self.send_json(h, False, {"url": f"http://{h.headers['Host']}/{repo_id}"})
        if path == "api/validate-yaml":  # as the hub: a card's base_model must be a model on the hub
            text = json.loads(body)["content"]
            front = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
            base = (front or {}).get("base_model")
            if base is not None and base not in self.repos:
                return self.send_json(h, False, {"errors": [
                    {"message": f'"base_model" with value "{base}" is not valid. Use a model id from the Hub'}]},
                    status=400)
            return self.send_json(h, False, {"errors": [], "warnings": []})
        if len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            repo = self.repos.get(repo_id)
            if repo is None:
                return self.error(h, 404, "RepoNotFound")
            verb, revision = parts[4], parts[5]
            if verb == "branch":
                if revision in repo.branches:
                    return self.error(h, 409)
                repo.branches[revision] = dict(repo.files)
                return self.send_json(h, False, {})
            if revision != "main" and revision not in repo.branches:
                return self.error(h, 404, "RevisionNotFound")
            if verb == "preupload":
                files = json.loads(body)["files"]
                return self.send_json(h, False, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                     "shouldIgnore": False} for f in files]})
            if verb == "commit":
                return self.commit(h, repo_id, revision, body)
        if len(parts) == 6 and parts[2:] == ["info", "lfs", "objects", "batch"] and parts[1].endswith(".git"):
            objects = json.loads(body)["objects"]
            host = h.headers["Host"]
            return self.send_json(h, False, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 **({} if o["oid"] in self.lfs else
                    {"actions": {"upload": {"href": f"http://{host}/lfs-upload/{o['oid']}"}}})} for o in objects]})
        return self.error(h, 404)

    def put_object(self, h: BaseHTTPRequestHandler, oid: str) -> None:
        size = int(h.headers.get("Content-Length", 0))
        if self.cut_uploads:
            h.rfile.read(size // 2)
            h.close_connection = True
            h.connection.shutdown(2)  # the connection drops mid-upload
            return
        data = h.rfile.read(size)
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(h, 400)
        self.lfs[oid] = data
        self.send_json(h, False, {})

    def commit(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, body: bytes) -> None:
        """One NDJSON commit: every file it names must be there (LFS objects uploaded), or nothing changes."""
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = dict(repo.files if revision == "main" else repo.branches[revision])
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self.error(h, 422)
                files[value["path"]] = self.lfs[value["oid"]]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if revision == "main":
            repo.files = files
            repo.sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest())
                                                      for k, v in files.items())).encode()).hexdigest()
        else:
            repo.branches[revision] = files
        repo.commits.append(header["summary"])
        oid = hashlib.sha1(body).hexdigest()
        self.send_json(h, False, {"commitUrl": f"http://{h.headers['Host']}/{repo_id}/commit/{oid}",
                                  "commitOid": oid, "pullRequestUrl": None})

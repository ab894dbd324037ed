"""A small Hub-compatible HTTP server for tests.

It implements the part of the Hub HTTP API that the real `huggingface_hub` client (and, through it,
`transformers`' `push_to_hub` / `from_pretrained`) uses for *model* repositories, so that uploads and downloads
can be tested end to end on one machine:

    GET  /api/whoami-v2                                 checks the Bearer token (401 for any other token)
    POST /api/repos/create                              creates a public or private repo (409 if it exists)
    POST /api/validate-yaml                             README metadata check (accepts everything)
    GET  /api/models/{repo_id}[/revision/{rev}]         repo info: sha, private, siblings (+ sizes with blobs=true)
    GET  /api/models/{repo_id}/tree/{rev}[/{path}]      tree listing (`recursive`, `expand`)
    POST /api/models/{repo_id}/paths-info/{rev}         info about the given paths
    GET  /api/models/{repo_id}/commits/{rev}            commit history, newest first
    GET  /api/models/{repo_id}/refs                     the `main` branch
    POST /api/models/{repo_id}/preupload/{rev}          "regular" or "lfs" upload mode for each file
    POST /api/models/{repo_id}/commit/{rev}             NDJSON commit: file, lfsFile, deletedFile, deletedFolder
    POST /{repo_id}.git/info/lfs/objects/batch          LFS batch API: "basic" transfer, upload and verify actions
    PUT  /lfs-upload/{oid}?size=..&signature=..         the upload target handed out by the batch API
    POST /{repo_id}.git/info/lfs/objects/verify         the verify target handed out by the batch API
    GET|HEAD /{repo_id}/resolve/{rev}/{path}            download with ETag, X-Repo-Commit, X-Linked-Etag/-Size, Range

Errors carry the `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound) that `huggingface_hub` turns
into its typed exceptions. Private repos answer reads without a token like the Hub does: 401 + RepoNotFound.

Deliberately not implemented: Xet storage (clients must run with HF_HUB_DISABLE_XET=1, see `hub_environment`),
branches other than `main`, tags, pull requests (`create_pr`), the git protocol, multipart LFS uploads and LFS
downloads through the batch API, datasets and Spaces, gated repos, organisations and permissions (the one
configured token reads and writes every repo), deleting repos and pagination (listings come in one page). The
upload mode rule is fixed (size >= 10 MiB, a binary extension, or a NUL byte in the sample) rather than read from
the repo's .gitattributes, and blob ids of LFS files hash a simplified pointer text, not the git-lfs pointer file.

The server binds 127.0.0.1 on a free port, keeps everything under the storage directory given by the caller,
closes each connection after one response, limits request bodies to `max_body_bytes`, shuts itself down after
`max_lifetime_s` and is stopped when the `running_hub_server` context exits. `huggingface_hub` reads HF_ENDPOINT
and friends at import time, so clients run in a fresh process: `hub_environment` builds that process' environment
and `run_hub_client` runs a Python snippet with it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit


DEFAULT_TOKEN = "hf_local_test_token"
DEFAULT_USER = "test-user"
MAIN = "main"

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
DEFAULT_MAX_BODY_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_LIFETIME_S = 600.0
CONNECTION_TIMEOUT_S = 30.0
NAME_PATTERN = re.compile(r"[\w][\w.\-]{0,95}")


# ---------------------------------------------------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error answered to the client as `{"error": message}` with the Hub's `X-Error-*` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}  # `extra`: more fields for the JSON body


def repo_not_found(repo_id: str, status: int = 404) -> HubError:
    return HubError(status, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, commit_id: str | None = None, message: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit_id} if commit_id else {}
    return HubError(404, message or f"Entry not found: {path}", "EntryNotFound", headers)


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer text whose git blob id stands for an LFS file (simplified, see the module docstring)."""
    return f"version lfs-spec-v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The upload mode rule: big files, binary extensions and binary content go through LFS; empty files never do."""
    if size == 0:
        return False
    return size >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def default_gitattributes() -> bytes:
    lines = [f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES]
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------------


class RepoStore:
    """Repos and file contents on disk, safe to use from several threads.

    `root/blobs/<sha256>` holds each distinct content once (regular and LFS files alike). `root/repos/<ns>/<name>.json`
    holds a repo: `private`, `createdAt`, `head` and `commits` ({id: commit}); each commit stores `parent`, `title`,
    `message`, `author`, `date` and its whole tree as `files` ({path: {sha256, size, blobId, lfs, lastCommit}}).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.repos_dir = self.root / "repos"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # Blobs -------------------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"Invalid sha256 oid: {sha256!r}")
        return self.blobs_dir / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes, expected_sha256: str | None = None) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise HubError(400, f"Content does not match its oid: expected {expected_sha256}, got {sha256}")
        path = self.blob_path(sha256)
        if not path.exists():
            partial = path.with_name(f"{sha256}.{secrets.token_hex(4)}.partial")
            partial.write_bytes(data)
            os.replace(partial, path)
        return sha256

    # Repos -------------------------------------------------------------------------------------------------------

    def _repo_file(self, repo_id: str) -> Path:
        namespace, _, name = repo_id.partition("/")
        if ".." in repo_id or not (NAME_PATTERN.fullmatch(namespace) and NAME_PATTERN.fullmatch(name)):
            raise repo_not_found(repo_id)
        return self.repos_dir / namespace / f"{name}.json"

    def load(self, repo_id: str) -> dict | None:
        with self._lock:
            path = self._repo_file(repo_id)
            return json.loads(path.read_text()) if path.is_file() else None

    def _save(self, repo_id: str, repo: dict) -> None:
        path = self._repo_file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(repo, indent=1))
        os.replace(partial, path)

    def create(self, repo_id: str, *, private: bool, author: str) -> dict | None:
        """Creates a repo whose first commit holds a `.gitattributes` file, like the Hub does; None if it exists."""
        with self._lock:
            if self.load(repo_id) is not None:
                return None
            repo = {"id": repo_id, "private": private, "createdAt": now_iso(), "head": None, "commits": {}}
            self._save(repo_id, repo)
            initial = [{"key": "file", "value": {"path": ".gitattributes", "content": default_gitattributes()}}]
            self.commit(repo_id, author=author, title="initial commit", description="", operations=initial)
            return self.load(repo_id)

    def commit(
        self,
        repo_id: str,
        *,
        author: str,
        title: str,
        description: str,
        operations: list[dict],
        parent: str | None = None,
    ) -> str:
        """Applies NDJSON commit operations on top of `main` and returns the new commit id."""
        with self._lock:
            repo = self.load(repo_id)
            if repo is None:
                raise repo_not_found(repo_id)
            head = repo["head"]
            if parent is not None and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][head]["files"]) if head else {}
            changed = {}
            for operation in operations:
                self._apply(operation, files, changed, head)
            commit_id = self._commit_id(head, files, title, description)
            for path in changed:
                files[path] = dict(files[path], lastCommit=commit_id)
            repo["commits"][commit_id] = {
                "id": commit_id, "parent": head, "title": title, "message": description,
                "author": author, "date": now_iso(), "files": files,
            }  # fmt: skip
            repo["head"] = commit_id
            self._save(repo_id, repo)
            return commit_id

    def _apply(self, operation: dict, files: dict, changed: dict, head: str | None) -> None:
        key, value = operation.get("key"), operation.get("value") or {}
        path = str(value.get("path", "")).strip("/")
        if not path:
            raise HubError(400, f"Missing path in {key!r} operation")
        if key == "file":
            changed[path] = files[path] = self._regular_entry(value)
        elif key == "lfsFile":
            changed[path] = files[path] = self._lfs_entry(value)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise entry_not_found(path, head, f"A file with this name doesn't exist: {path}")
            changed.pop(path, None)
        elif key == "deletedFolder":
            inside = [name for name in files if name.startswith(path + "/")]
            if not inside:
                raise entry_not_found(path, head, f"A file with this name doesn't exist: {path}")
            for name in inside:
                del files[name]
                changed.pop(name, None)
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")

    def _regular_entry(self, value: dict) -> dict:
        content = value.get("content", b"")
        if isinstance(content, bytes):
            data = content
        elif value.get("encoding") == "base64":
            data = base64.b64decode(content)
        else:
            data = content.encode()
        sha256 = self.put_blob(data)
        return {"sha256": sha256, "size": len(data), "blobId": git_blob_id(data), "lfs": False}

    def _lfs_entry(self, value: dict) -> dict:
        sha256 = str(value.get("oid", ""))
        if value.get("algo", "sha256") != "sha256" or not self.has_blob(sha256):
            raise HubError(400, f"LFS object {sha256} for {value.get('path')} has not been uploaded")
        size = self.blob_path(sha256).stat().st_size
        if value.get("size") is not None and int(value["size"]) != size:
            raise HubError(400, f"LFS object {sha256} has size {size}, not {value['size']}")
        return {"sha256": sha256, "size": size, "blobId": git_blob_id(lfs_pointer(sha256, size)), "lfs": True}

    @staticmethod
    def _commit_id(parent: str | None, files: dict, title: str, description: str) -> str:
        tree = sorted((path, entry["blobId"]) for path, entry in files.items())
        record = {"parent": parent, "tree": tree, "title": title, "message": description, "date": now_iso()}
        return hashlib.sha1((json.dumps(record) + secrets.token_hex(8)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Tree views (pure functions over a commit's {path: entry} map)
# ---------------------------------------------------------------------------------------------------------------------


def file_info(path: str, entry: dict, commits: dict | None = None) -> dict:
    info = {"type": "file", "oid": entry["blobId"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    if commits is not None:
        commit = commits[entry["lastCommit"]]
        info["lastCommit"] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
    return info


def folder_info(path: str, files: dict) -> dict:
    inside = sorted((name, entry["blobId"]) for name, entry in files.items() if name.startswith(path + "/"))
    oid = hashlib.sha1(json.dumps(inside).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def list_tree(files: dict, prefix: str, recursive: bool, commits: dict | None = None) -> list[dict] | None:
    """Entries below `prefix` (folders first, then files), or None if `prefix` is not a folder."""
    base = f"{prefix}/" if prefix else ""
    below = {path: entry for path, entry in files.items() if path.startswith(base)}
    if prefix and not below:
        return None
    folders, listed = set(), {}
    for path, entry in below.items():
        parts = path[len(base) :].split("/")
        if len(parts) == 1:
            listed[path] = entry
        elif recursive:
            folders.update(base + "/".join(parts[:depth]) for depth in range(1, len(parts)))
            listed[path] = entry
        else:
            folders.add(base + parts[0])
    return [folder_info(path, files) for path in sorted(folders)] + [
        file_info(path, entry, commits) for path, entry in sorted(listed.items())
    ]


def path_info(files: dict, path: str, commits: dict | None = None) -> dict | None:
    if path in files:
        return file_info(path, files[path], commits)
    if any(name.startswith(path + "/") for name in files):
        return folder_info(path, files)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    params: dict[str, str]  # path parameters, URL-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    user: str | None  # None for anonymous requests
    read_body: Callable[[], bytes]
    _body: bytes | None = None

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = self.read_body()
        return self._body

    def json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed instead of `body`: `length` bytes from `offset`
    offset: int = 0
    length: int = 0


def json_response(payload, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": content_type})


def error_response(error: HubError) -> Response:
    response = json_response({**error.extra, "error": error.message}, error.status)
    response.headers.update(error.headers)
    response.headers["X-Error-Message"] = error.message.encode("ascii", "replace").decode()
    if error.code:
        response.headers["X-Error-Code"] = error.code
    return response


REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+?)"
REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "repo_info"),
    ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info"),
    ("GET", rf"/api/models/{REPO}/commits/{REV}", "commits"),
    ("GET", rf"/api/models/{REPO}/refs", "refs"),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]
COMPILED_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class HubApi:
    """Maps requests to responses. Transport-free: `HubServer` feeds it what came over HTTP."""

    def __init__(self, store: RepoStore, base_url: str, token: str, user: str, max_body_bytes: int):
        self.store, self.base_url, self.token, self.user = store, base_url, token, user
        self.max_body_bytes = max_body_bytes
        self._upload_secret = secrets.token_bytes(32)
        self.request_log: deque[tuple[str, str, int]] = deque(maxlen=2000)  # (method, path, status)

    # Dispatch and access control -------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], read_body: Callable[[], bytes]) -> Response:
        url = urlsplit(target)
        for route_method, pattern, name in COMPILED_ROUTES:
            match = pattern.fullmatch(url.path)
            if match and route_method == method:
                params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                user = self._authenticate(headers.get("authorization"))
                request = Request(method, params, parse_qs(url.query), headers, user, read_body)
                return getattr(self, name)(request)
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def _authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.token):
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _readable_repo(self, request: Request) -> dict:
        repo_id = request.params["repo"]
        repo = self.store.load(repo_id)
        if repo is None:
            raise repo_not_found(repo_id)
        if repo["private"] and request.user is None:
            raise repo_not_found(repo_id, status=401)
        return repo

    def _writable_repo(self, request: Request) -> dict:
        if request.user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        return self._readable_repo(request)

    @staticmethod
    def _resolve(repo: dict, revision: str | None) -> dict:
        """The commit a revision names: `main` (or `refs/heads/main`) or a full commit id of the repo."""
        revision = revision or MAIN
        if revision in (MAIN, f"refs/heads/{MAIN}"):
            return repo["commits"][repo["head"]]
        if revision in repo["commits"]:
            return repo["commits"][revision]
        raise revision_not_found(revision)

    @staticmethod
    def _reject_pull_requests(request: Request) -> None:
        if is_true(request.arg("create_pr")):
            raise HubError(400, "Pull requests are not supported by this test server")

    # Account and repos -----------------------------------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        if request.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return json_response(
            {
                "type": "user", "id": hashlib.sha1(request.user.encode()).hexdigest()[:24], "name": request.user,
                "fullname": request.user, "email": None, "emailVerified": False, "isPro": False, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            }  # fmt: skip
        )

    def create_repo(self, request: Request) -> Response:
        if request.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        namespace, name = payload.get("organization") or request.user, str(payload.get("name", ""))
        if not (NAME_PATTERN.fullmatch(namespace) and NAME_PATTERN.fullmatch(name)):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo_id, url = f"{namespace}/{name}", f"{self.base_url}/{namespace}/{name}"
        if self.store.create(repo_id, private=private, author=request.user) is None:
            # The client reads `url` from this answer too when it is called with exist_ok=True.
            raise HubError(409, f"You already created this model repo: {repo_id}", extra={"url": url})
        return json_response({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, request: Request) -> Response:
        request.json()
        return json_response({"errors": [], "warnings": []})

    # Reading ---------------------------------------------------------------------------------------------------

    def repo_info(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._resolve(repo, request.params.get("rev"))
        with_blobs = is_true(request.arg("blobs"))
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                info = file_info(path, entry)
                sibling.update(size=entry["size"], blobId=entry["blobId"])
                if "lfs" in info:
                    lfs = info["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        repo_id = repo["id"]
        return json_response(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": commit["id"], "lastModified": commit["date"],
                "createdAt": repo["createdAt"], "private": repo["private"], "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }  # fmt: skip
        )

    def tree(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._resolve(repo, request.params["rev"])
        prefix = request.params.get("path", "").strip("/")
        commits = repo["commits"] if is_true(request.arg("expand")) else None
        entries = list_tree(commit["files"], prefix, is_true(request.arg("recursive")), commits)
        if entries is None:
            raise entry_not_found(prefix, commit["id"])
        return json_response(entries)

    def paths_info(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._resolve(repo, request.params["rev"])
        if request.headers.get("content-type", "").startswith("application/json"):
            payload = request.json()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(request.body.decode())
            paths, expand = form.get("paths", []), is_true((form.get("expand") or ["false"])[-1])
        commits = repo["commits"] if expand else None
        infos = (path_info(commit["files"], str(path).strip("/"), commits) for path in paths)
        return json_response([info for info in infos if info is not None])

    def commits(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit, history = self._resolve(repo, request.params["rev"]), []
        while commit is not None:
            history.append(
                {
                    "id": commit["id"], "title": commit["title"], "message": commit["message"],
                    "authors": [{"user": commit["author"], "avatar": None}], "date": commit["date"],
                }  # fmt: skip
            )
            commit = repo["commits"].get(commit["parent"]) if commit["parent"] else None
        return json_response(history)

    def refs(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        main = {"name": MAIN, "ref": f"refs/heads/{MAIN}", "targetCommit": repo["head"]}
        return json_response({"branches": [main], "converts": [], "tags": [], "pullRequests": []})

    def resolve(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._resolve(repo, request.params["rev"])
        path = request.params["path"]
        entry = commit["files"].get(path)
        if entry is None:
            raise entry_not_found(path, commit["id"])
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["blobId"]}"'
        headers = {
            "ETag": etag, "X-Repo-Commit": commit["id"], "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{Path(path).name}"',
        }  # fmt: skip
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry["size"])})
        status, offset, length = 200, 0, entry["size"]
        byte_range = parse_range(request.headers.get("range"), entry["size"])
        if byte_range is not None:
            status, (offset, length) = 206, byte_range
            headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{entry['size']}"
        blob = self.store.blob_path(entry["sha256"])
        return Response(status, headers=headers, file=blob, offset=offset, length=length)

    # Writing ---------------------------------------------------------------------------------------------------

    def preupload(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        self._reject_pull_requests(request)
        commit = self._resolve(repo, request.params["rev"])
        answers = []
        for item in request.json().get("files", []):
            path, size = str(item["path"]).strip("/"), int(item["size"])
            mode = "lfs" if is_lfs(path, size, base64.b64decode(item.get("sample", ""))) else "regular"
            existing = commit["files"].get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing["sha256"] if existing["lfs"] else existing["blobId"]
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        return json_response({"files": answers, "commitOid": commit["id"]})

    def lfs_batch(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "Only the 'basic' LFS transfer is supported")
        objects = [self._lfs_batch_object(repo["id"], obj) for obj in payload.get("objects", [])]
        return json_response(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_batch_object(self, repo_id: str, obj: dict) -> dict:
        oid, size = str(obj.get("oid", "")), int(obj.get("size", -1))
        answer = {"oid": oid, "size": size}
        if not re.fullmatch(r"[0-9a-f]{64}", oid) or size < 0:
            return dict(answer, error={"code": 422, "message": "Invalid oid or size"})
        if size > self.max_body_bytes:
            return dict(answer, error={"code": 422, "message": f"Over {self.max_body_bytes} bytes"})
        if self.store.has_blob(oid, size):
            return answer  # already stored: no actions, the client skips the upload
        upload = f"{self.base_url}/lfs-upload/{oid}?size={size}&signature={self._upload_signature(oid, size)}"
        verify = f"{self.base_url}/{repo_id}.git/info/lfs/objects/verify"
        actions = {"upload": {"href": upload, "header": {}}, "verify": {"href": verify, "header": {}}}
        return dict(answer, authenticated=True, actions=actions)

    def _upload_signature(self, oid: str, size: int) -> str:
        return hmac.new(self._upload_secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def lfs_upload(self, request: Request) -> Response:
        oid, size = request.params["oid"], request.arg("size") or ""
        signature = request.arg("signature") or ""
        if not size.isdigit() or not hmac.compare_digest(signature, self._upload_signature(oid, int(size))):
            raise HubError(403, "Invalid or missing upload signature")
        data = request.body
        if len(data) != int(size):
            raise HubError(400, f"Expected {size} bytes, received {len(data)}")
        self.store.put_blob(data, expected_sha256=oid)
        return Response(200)

    def lfs_verify(self, request: Request) -> Response:
        self._writable_repo(request)
        payload = request.json()
        if not self.store.has_blob(str(payload.get("oid", "")), payload.get("size")):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return json_response({"success": True})

    def commit(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        self._reject_pull_requests(request)
        if request.params["rev"] not in (MAIN, f"refs/heads/{MAIN}"):
            raise revision_not_found(request.params["rev"])
        header, operations = parse_commit_payload(request.body)
        commit_id = self.store.commit(
            repo["id"],
            author=request.user,
            title=header.get("summary") or "Commit",
            description=header.get("description") or "",
            operations=operations,
            parent=header.get("parentCommit"),
        )
        return json_response(
            {
                "success": True, "commitOid": commit_id, "hookOutput": "", "pullRequestUrl": None,
                "commitUrl": f"{self.base_url}/{repo['id']}/commit/{commit_id}",
            }  # fmt: skip
        )


def parse_commit_payload(body: bytes) -> tuple[dict, list[dict]]:
    """Splits an NDJSON commit body into its header value and its operations."""
    try:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except ValueError as error:
        raise HubError(400, f"Invalid NDJSON commit payload: {error}") from None
    headers = [line["value"] for line in lines if line.get("key") == "header"]
    if len(headers) != 1:
        raise HubError(400, "A commit payload needs exactly one header line")
    return headers[0], [line for line in lines if line.get("key") != "header"]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(offset, length) for a single `bytes=` range, None to send the whole file; 416 if it cannot be satisfied."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        offset = max(size - int(last), 0)
        end = size - 1
    else:
        offset, end = int(first), min(int(last), size - 1) if last else size - 1
    if offset >= size or end < offset:
        raise HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
    return offset, end - offset + 1


# ---------------------------------------------------------------------------------------------------------------------
# HTTP transport
# ---------------------------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    api: HubApi


class _Handler(BaseHTTPRequestHandler):
    """One request per connection: reads it, asks `HubApi` for the response and writes it back."""

    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT_S
    server: _HTTPServer

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _handle(self) -> None:
        self.close_connection = True
        api = self.server.api
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            response = api.handle(self.command, self.path, headers, self._read_body)
        except HubError as error:
            response = error_response(error)
        except Exception as error:  # answer 500 with the reason rather than dropping the connection
            response = error_response(HubError(500, f"{type(error).__name__}: {error}"))
        api.request_log.append((self.command, self.path, response.status))
        self._send(response)

    def _read_body(self) -> bytes:
        limit = self.server.api.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise HubError(413, f"Request body over {limit} bytes")
        return self.rfile.read(length)

    def _read_chunked(self, limit: int) -> bytes:
        chunks, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise HubError(413, f"Request body over {limit} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF closing the chunk

    def _send(self, response: Response) -> None:
        length = response.length if response.file is not None else len(response.body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as source:
            source.seek(response.offset)
            remaining = response.length
            while remaining > 0:
                chunk = source.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def log_message(self, format: str, *args) -> None:  # requests are kept in `HubApi.request_log` instead
        pass


class HubServer:
    """A Hub-compatible server on 127.0.0.1 (free port). Use as a context manager, or `start()` / `stop()`.

    `url` is the base URL to use as HF_ENDPOINT; `api.request_log` lists the (method, path, status) answered.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        token: str = DEFAULT_TOKEN,
        *,
        user: str = DEFAULT_USER,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
    ):
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = HubApi(RepoStore(storage_dir), self.url, token, user, max_body_bytes)
        self._httpd.api = self.api
        self._max_lifetime_s = max_lifetime_s
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"hub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._watchdog = threading.Timer(self._max_lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the listening socket; safe to call more than once, from any thread."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=10)
            self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def running_hub_server(
    storage_dir: str | os.PathLike, token: str = DEFAULT_TOKEN, *, user: str = DEFAULT_USER, **options
) -> Iterator[str]:
    """Runs a `HubServer` storing its repos under `storage_dir` and yields its base URL; stops it on exit.

    Only `token` is accepted (as user `user`); `options` go to `HubServer` (`max_body_bytes`, `max_lifetime_s`).
    """
    with HubServer(storage_dir, token, user=user, **options) as server:
        yield server.url


# ---------------------------------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------------------------------

_CLEARED_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_", "XET_")
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy"}


def hub_environment(url: str, token: str | None, home: str | os.PathLike) -> dict[str, str]:
    """The environment for a client process that talks only to the server at `url`.

    Starts from `os.environ` without any HF_* / TRANSFORMERS_* / proxy variable, then points HF_ENDPOINT at `url`,
    disables Xet, telemetry, update checks and progress bars, uses a fresh HF_HOME / HF_HUB_CACHE under `home` and
    sets HF_TOKEN to `token` (no token at all, i.e. anonymous, when `token` is None).
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(_CLEARED_PREFIXES) and name.lower() not in _PROXY_VARIABLES
    }
    home = Path(home)
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        DO_NOT_TRACK="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_hub_client(
    code: str, env: dict[str, str], timeout: float = 180.0, cwd: str | os.PathLike | None = None
) -> str:
    """Runs Python `code` in a fresh interpreter with `env`; returns its stdout, raises with its stderr on failure."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"hub client exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result.stdout

"""Tests of the local Hub-compatible server (tests/hub_server.py) through the real `huggingface_hub` client.

`huggingface_hub` reads HF_ENDPOINT and its other settings at import time, and this process has already imported it
(through transformers), so every client runs in a fresh interpreter (`run_hub_client`) whose environment points at
the server (`hub_environment`). Each client gets its own empty HF_HOME, so downloads really come from the server.
"""

import hashlib
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from hub_server import DEFAULT_TOKEN, DEFAULT_USER, HubServer, hub_environment, run_hub_client, running_hub_server


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-storage")) as server:
        yield server
    assert [entry for entry in server.api.request_log if entry[2] >= 500] == []


def client(hub, tmp_path, code, token=DEFAULT_TOKEN, **values):
    """Runs `code` in a fresh client process; `code` sees `values` as ARGS and prints its result as one JSON line."""
    home = tmp_path / f"hf-home-{len(list(tmp_path.glob('hf-home-*')))}"
    script = f"import json\nARGS = json.loads({json.dumps(json.dumps(values))})\n" + code
    output = run_hub_client(script, hub_environment(hub.url, token, home))
    return json.loads(output.strip().splitlines()[-1])


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_uploads(hub):
    """The sha256 of every object the server received through the LFS upload URL."""
    puts = [path for method, path, status in hub.api.request_log if method == "PUT" and status == 200]
    return {path.split("?")[0].rsplit("/", 1)[1] for path in puts}


def http(hub, method, path, token=None, data=None, headers=None):
    """A plain HTTP request to the server, without any proxy; returns (status, headers, body)."""
    request = urllib.request.Request(hub.url + path, data=data, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


UPLOAD = """
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
api = HfApi()
user = api.whoami()["name"]
repo_id = api.create_repo(ARGS["name"], private=True).repo_id
again = api.create_repo(repo_id, private=True, exist_ok=True).repo_id
try:
    api.create_repo(repo_id, private=True)
    conflict = None
except HfHubHTTPError as error:
    conflict = error.response.status_code
info = api.upload_folder(folder_path=ARGS["folder"], repo_id=repo_id, commit_message=ARGS["message"])
print(json.dumps({"user": user, "repo_id": repo_id, "again": again, "conflict": conflict, "commit": info.oid}))
"""

DOWNLOAD = """
import hashlib, os
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
api, repo_id = HfApi(), ARGS["repo_id"]
def digest(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()
downloaded = {name: digest(hf_hub_download(repo_id, name)) for name in ARGS["files"]}
snapshot = snapshot_download(repo_id)
snapshotted = {
    os.path.relpath(os.path.join(root, name), snapshot).replace(os.sep, "/"): digest(os.path.join(root, name))
    for root, _, names in os.walk(snapshot) for name in names
}
info = api.model_info(repo_id, files_metadata=True)
paths = {item.path: item.lfs is not None for item in api.get_paths_info(repo_id, ARGS["files"])}
errors = {}
for label, call, expected in [
    ("missing_file", lambda: hf_hub_download(repo_id, "missing.txt"), EntryNotFoundError),
    ("missing_revision", lambda: hf_hub_download(repo_id, "notes.txt", revision="v9"), RevisionNotFoundError),
]:
    try:
        call()
        errors[label] = None
    except expected as error:
        errors[label] = type(error).__name__
print(json.dumps({
    "downloaded": downloaded, "snapshotted": snapshotted, "files": api.list_repo_files(repo_id),
    "private": info.private, "sha": info.sha, "siblings": sorted(s.rfilename for s in info.siblings),
    "lfs": paths, "title": api.list_repo_commits(repo_id)[0].title, "errors": errors,
}))
"""

ANONYMOUS = """
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
api, repo_id, outcome = HfApi(), ARGS["repo_id"], {}
for label, call in [
    ("model_info", lambda: api.model_info(repo_id)),
    ("download", lambda: hf_hub_download(repo_id, "notes.txt")),
    ("missing_repo", lambda: api.model_info("nobody/nothing")),
]:
    try:
        call()
        outcome[label] = None
    except RepositoryNotFoundError as error:
        outcome[label] = type(error).__name__
try:
    api.whoami(token="hf_wrong_token")
    outcome["whoami"] = None
except HfHubHTTPError as error:
    outcome["whoami"] = error.response.status_code
print(json.dumps(outcome))
"""


def test_upload_folder_then_download(hub, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    contents = {
        "notes.txt": b"some notes\n",
        "README.md": b"---\nlicense: apache-2.0\n---\n# A test repo\n",
        "weights.safetensors": random.Random(0).randbytes(100_000),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)

    pushed = client(hub, tmp_path, UPLOAD, name="files", folder=str(folder), message="Add the test files")
    repo_id = f"{DEFAULT_USER}/files"
    assert pushed["user"] == DEFAULT_USER
    assert pushed["repo_id"] == pushed["again"] == repo_id
    assert pushed["conflict"] == 409
    expected = {name: sha256_of(data) for name, data in contents.items()}
    assert lfs_uploads(hub) & set(expected.values()) == {expected["weights.safetensors"]}

    fetched = client(hub, tmp_path, DOWNLOAD, repo_id=repo_id, files=sorted(contents))
    assert fetched["downloaded"] == expected
    assert {name: fetched["snapshotted"][name] for name in expected} == expected
    assert sorted(fetched["files"]) == fetched["siblings"] == sorted([*contents, ".gitattributes"])
    assert fetched["private"] is True and fetched["sha"] == pushed["commit"]
    assert fetched["lfs"] == {"notes.txt": False, "README.md": False, "weights.safetensors": True}
    assert fetched["title"] == "Add the test files"
    assert fetched["errors"] == {
        "missing_file": "RemoteEntryNotFoundError",
        "missing_revision": "RevisionNotFoundError",
    }

    refused = client(hub, tmp_path, ANONYMOUS, token=None, repo_id=repo_id)
    assert refused == {
        "model_info": "RepositoryNotFoundError",
        "download": "RepositoryNotFoundError",
        "missing_repo": "RepositoryNotFoundError",
        "whoami": 401,
    }


UPDATE_AND_DELETE = """
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
api = HfApi()
repo_id = api.create_repo("edits").repo_id
first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a/one.txt", repo_id=repo_id).oid
unchanged = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a/one.txt", repo_id=repo_id).oid
operations = [
    CommitOperationAdd(path_in_repo="a/two.txt", path_or_fileobj=b"2"),
    CommitOperationAdd(path_in_repo="b/three.bin", path_or_fileobj=bytes(range(256))),
    CommitOperationAdd(path_in_repo="top.txt", path_or_fileobj=b"top"),
]
api.create_commit(repo_id, operations, commit_message="more files")
api.delete_file("top.txt", repo_id)
api.create_commit(repo_id, [CommitOperationDelete(path_in_repo="a/")], commit_message="drop a/")
print(json.dumps({
    "same_commit": first == unchanged, "files": api.list_repo_files(repo_id),
    "titles": [commit.title for commit in api.list_repo_commits(repo_id)],
    "lfs": [item.path for item in api.list_repo_tree(repo_id, recursive=True) if getattr(item, "lfs", None)],
}))
"""


def test_update_and_delete_commits(hub, tmp_path):
    result = client(hub, tmp_path, UPDATE_AND_DELETE)
    assert result["same_commit"] is True  # an unchanged file is not committed again
    assert sorted(result["files"]) == [".gitattributes", "b/three.bin"]
    assert result["titles"][0] == "drop a/" and result["titles"][-1] == "initial commit"
    assert result["lfs"] == ["b/three.bin"]


def test_plain_http_range_and_error_headers(hub):
    status, _, _ = http(hub, "POST", "/api/repos/create", DEFAULT_TOKEN, json.dumps({"name": "raw"}).encode())
    assert status == 200
    lines = [
        {"key": "header", "value": {"summary": "add", "description": ""}},
        {"key": "file", "value": {"path": "dir/data.txt", "content": "MDEyMzQ1Njc4OQ==", "encoding": "base64"}},
    ]
    payload = "".join(json.dumps(line) + "\n" for line in lines).encode()
    status, _, body = http(hub, "POST", f"/api/models/{DEFAULT_USER}/raw/commit/main", DEFAULT_TOKEN, payload)
    assert status == 200
    commit = json.loads(body)["commitOid"]

    url = f"/{DEFAULT_USER}/raw/resolve/main/dir/data.txt"
    status, headers, body = http(hub, "GET", url)  # a public repo reads without a token
    assert (status, body, headers["X-Repo-Commit"], headers["Content-Length"]) == (200, b"0123456789", commit, "10")
    status, headers, body = http(hub, "GET", url, headers={"Range": "bytes=2-5"})
    assert (status, body, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    status, _, body = http(hub, "GET", url, headers={"Range": "bytes=-3"})
    assert (status, body) == (206, b"789")
    status, headers, _ = http(hub, "GET", url, headers={"Range": "bytes=10-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */10")

    status, headers, _ = http(hub, "HEAD", f"/{DEFAULT_USER}/raw/resolve/main/nope.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", commit)
    status, headers, _ = http(hub, "GET", f"/{DEFAULT_USER}/raw/resolve/v2/dir/data.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = http(hub, "GET", f"/api/models/{DEFAULT_USER}/absent")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, _, _ = http(hub, "GET", url, token="hf_wrong_token")
    assert status == 401
    status, _, body = http(hub, "GET", f"/api/models/{DEFAULT_USER}/raw/tree/main/dir")
    assert [entry["path"] for entry in json.loads(body)] == ["dir/data.txt"]


TINY_LLAMA = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=64,
)
model = LlamaForCausalLM(config).eval()
model.save_pretrained(ARGS["local_dir"])
model.push_to_hub(ARGS["repo_id"], private=True, commit_message="Upload tiny llama")
with torch.no_grad():
    logits = model(torch.arange(12).view(2, 6) % 50).logits
torch.save(logits, ARGS["logits"])
print(json.dumps({"shape": list(logits.shape)}))
"""

LOAD_TINY_LLAMA = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["repo_id"]).eval()
with torch.no_grad():
    logits = model(torch.arange(12).view(2, 6) % 50).logits
reference = torch.load(ARGS["logits"])
print(json.dumps({"class": type(model).__name__, "equal": bool(torch.equal(logits, reference))}))
"""


def test_transformers_push_to_hub_then_from_pretrained(hub, tmp_path):
    repo_id = f"{DEFAULT_USER}/tiny-llama"
    logits = str(tmp_path / "logits.pt")
    pushed = client(hub, tmp_path, TINY_LLAMA, repo_id=repo_id, local_dir=str(tmp_path / "saved"), logits=logits)
    assert pushed == {"shape": [2, 6, 50]}
    assert sha256_of((tmp_path / "saved" / "model.safetensors").read_bytes()) in lfs_uploads(hub)

    loaded = client(hub, tmp_path, LOAD_TINY_LLAMA, repo_id=repo_id, logits=logits)
    assert loaded == {"class": "LlamaForCausalLM", "equal": True}


def test_server_stops_and_releases_its_port(tmp_path):
    with running_hub_server(tmp_path / "storage", token="hf_other") as url:
        port = int(url.rsplit(":", 1)[1])
        request = urllib.request.Request(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer hf_other"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            assert json.loads(response.read())["name"] == DEFAULT_USER
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert not [thread for thread in threading.enumerate() if thread.name == f"hub-server-{port}"]


def test_server_stops_by_itself_after_its_lifetime(tmp_path):
    with HubServer(tmp_path / "storage", max_lifetime_s=0.2) as server:
        time.sleep(0.6)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)

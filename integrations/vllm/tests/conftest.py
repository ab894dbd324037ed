"""Fixtures of the vLLM tests, which run in vLLM's environment (see .ci/run).

The reference is transformers' generate() on the same checkpoints, which needs the project's own environment
(transformers >= 5.24, while vLLM pins an older one): `reference_checkpoints.py` runs there, with the Python named by
MOR_REFERENCE_PYTHON (default: the repository's .venv).
"""

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


vllm = pytest.importorskip("vllm", reason="the vLLM tests run in vLLM's environment (.ci/run builds .venv-vllm)")
# The tests read the model's depth counts with LLM.apply_model, which sends a function to vLLM's worker process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

REPOSITORY = Path(__file__).resolve().parents[3]
REFERENCE_PYTHON = Path(os.environ.get("MOR_REFERENCE_PYTHON", REPOSITORY / ".venv" / "bin" / "python"))
# Small enough for any machine; the test checkpoints need a few MiB.
KV_CACHE_BYTES = 64 * 2**20


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> tuple[Path, dict]:
    """The test checkpoints and generate()'s outputs for them: (folder, reference.json's content). MOR_VLLM_REFERENCES
    names a folder reference_checkpoints.py wrote before, to reuse it."""
    if os.environ.get("MOR_VLLM_REFERENCES"):
        folder = Path(os.environ["MOR_VLLM_REFERENCES"])
        return folder, json.loads((folder / "reference.json").read_text())
    require_reference_python()
    folder = tmp_path_factory.mktemp("checkpoints")
    script = Path(__file__).with_name("reference_checkpoints.py")
    result = subprocess.run([str(REFERENCE_PYTHON), str(script), str(folder)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder, json.loads((folder / "reference.json").read_text())


def missing_setup(reason: str) -> None:
    """Skips a test whose setup is missing here; on CI (CI=true), whose .ci/run builds that setup, fails instead, so
    that a broken install step cannot pass as a skipped test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run should have set it up)", pytrace=False)
    pytest.skip(reason)


def require_reference_python() -> None:
    """The project's environment, which the references (generate()) and the docs' conversion run in."""
    if not REFERENCE_PYTHON.exists():
        missing_setup(f"no Python of the project's environment at {REFERENCE_PYTHON}: set MOR_REFERENCE_PYTHON")


@contextlib.contextmanager
def serving(folder, **kwargs):
    """vLLM's `LLM` on a test checkpoint (float32, small KV cache, prefill chunks of 64 tokens so that the long
    prompts span several), shut down afterwards."""
    from vllm import LLM

    settings = dict(model=str(folder), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256,
                    max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=True, seed=0)
    llm = LLM(**{**settings, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python() -> str:
    return sys.executable


def request(url, payload=None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET, or of a POST of `payload`; an error status is returned, not raised."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def openai_server(command: list[str], log_path: Path, cwd: Path | None = None):
    """vLLM's OpenAI-compatible server started with `command` plus a free port on 127.0.0.1 (in `cwd`); yields its
    base URL (`http://127.0.0.1:PORT/v1`) once /v1/models answers, and stops it afterwards."""
    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen(command + ["--host", "127.0.0.1", "--port", str(port)], stdout=log, cwd=cwd,
                              stderr=subprocess.STDOUT, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                request(f"{base}/models")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start within 10 minutes"
                time.sleep(2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

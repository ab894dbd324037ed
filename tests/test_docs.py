"""The README and the docs/ pages stay runnable (issue 19): every link and anchor resolves, every path they name ships
with the repository, every command line of this project they show parses with its script's own arguments, and their
Python snippets run as written on a checkpoint the test builds.

The vLLM snippets run in vLLM's environment (integrations/vllm/tests/test_docs_snippets.py).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import STORIES_DIR, tiny_mor_config


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
SHIPPED_PATH = re.compile(
    r"(?<![\w./-])((?:examples|docs|conversion|evaluation|metrics|benchmarks|tests|integrations|modeling_mor)/[\w./-]*\w)")
# A record of one run on files this repository does not ship (the SmolLM2 GGUF wheel, ../shared data): its command
# lines are checked, its snippet is not run.
RECORDS = {"smollm2_uptrain.md"}
CONSOLE_SCRIPTS = {
    "mor-convert": "conversion.convert_llama_to_mor",
    "mor-uptrain": "conversion.uptrain",
    "mor-pretrain": "conversion.pretrain",
    "mor-push": "conversion.push_to_hub",
}
PLACEHOLDER_MODEL = "your-name/your-mor-model"


def page_id(page: Path) -> str:
    return page.relative_to(PROJECT_ROOT).as_posix()


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors (lower case, punctuation dropped, spaces as dashes) and explicit `<a id>`s."""
    text = page.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_anchors_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or PROJECT_ROOT not in resolved.parents:
            broken.append(target)
        elif anchor and anchor not in anchors(resolved):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_path_named_ships_with_the_repository(page):
    paths = set(SHIPPED_PATH.findall(page.read_text(encoding="utf-8")))
    # A prefix (`--table-prefix docs/pretrain_isoflop`) names the files it starts.
    missing = [path for path in sorted(paths)
               if not (PROJECT_ROOT / path).exists() and not list((PROJECT_ROOT / path).parent.glob(Path(path).name + "*"))]
    assert missing == []


def test_readme_is_a_front_page():
    """About 200 lines; the two commands, the load snippet and a link for each job come first."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 220
    assert "../" not in text
    for link in ("docs/usage.md", "docs/conversion.md", "docs/training.md", "docs/evaluation.md", "docs/serving.md",
                 "docs/vllm.md", "docs/benchmarks.md", "docs/MOR_SPEC.md"):
        assert f"]({link}" in text, link
    assert "python -m pytest -q tests" in text and "## Serving with vLLM" in text
    assert "examples/assets/stories260K" in SHIPPED_PATH.findall(text)


def test_spec_copy_says_where_it_comes_from():
    spec = (PROJECT_ROOT / "docs" / "MOR_SPEC.md").read_text(encoding="utf-8")
    assert "Provenance:" in spec.split("\n\n", 3)[1]


def test_quickstart_help_runs_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "examples" / "quickstart.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--steps" in result.stdout and "one CPU thread" in result.stdout


def project_command_lines(page: Path) -> list[tuple[str, str, list[str]]]:
    """(kind, target, arguments) of every command line in the page's bash blocks that runs one of this project's
    scripts: a console script, `python -m conversion.*` or `python SCRIPT.py` of the repository."""
    commands = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not line or "$(" in line:
                continue
            words = shlex.split(line)
            while words and re.fullmatch(r"\w+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
                words.pop(0)
            if words and words[0] in CONSOLE_SCRIPTS:
                commands.append(("module", CONSOLE_SCRIPTS[words[0]], words[1:]))
            elif words[:2] == ["python", "-m"] and words[2].startswith("conversion."):
                commands.append(("module", words[2], words[3:]))
            elif words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
                commands.append(("script", words[1], words[2:]))
    return commands


# Runs each command's script up to its argument parsing and stops there: what is checked is that the documented
# options exist and take the documented values, not the (long) work.
PARSE_ONLY = """
import argparse, json, os, runpy, sys

class Parsed(BaseException):
    pass

parse_args = argparse.ArgumentParser.parse_args

def parse_and_stop(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_and_stop
results = []
for kind, target, arguments in json.loads(sys.argv[1]):
    sys.argv = [target, *arguments]
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python SCRIPT.py` does
            try:
                runpy.run_path(target, run_name="__main__")
            finally:
                sys.path.pop(0)
        results.append("finished without parsing arguments")
    except Parsed:
        results.append("parsed")
    except SystemExit as exit:
        results.append(f"exit {exit.code}")
print(json.dumps(results))
"""


@pytest.mark.parametrize("page", [page for page in PAGES if project_command_lines(page)], ids=page_id)
def test_command_lines_parse_with_their_scripts(page):
    commands = [command for command in project_command_lines(page) if command[1] != "benchmarks/vllm_throughput.py"]
    for kind, target, _ in commands:
        assert kind == "module" or (PROJECT_ROOT / target).is_file(), target
    result = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(commands)], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    failed = [(" ".join([target, *arguments]), outcome)
              for (_, target, arguments), outcome in zip(commands, outcomes) if outcome != "parsed"]
    assert failed == [], result.stderr[-3000:]


# What the snippets leave to the reader: a loaded model, and token ids to serve.
SNIPPET_CONTEXT = """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({checkpoint!r}, trust_remote_code=True)
list_of_token_id_lists = [[1, 5, 9, 13], [1, 7], [1, 30, 31, 32, 33, 34]]
token_ids = [1, 4, 6, 8]
"""


@pytest.fixture(scope="module")
def snippet_checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    from modeling_mor import MoRForCausalLM

    folder = tmp_path_factory.mktemp("docs") / "mor-model"
    MoRForCausalLM(tiny_mor_config(vocab_size=512, routing="expert_choice")).save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


def python_snippets(page: Path) -> list[str]:
    return [block for block in code_blocks(page, "python") if "from vllm" not in block]


@pytest.mark.parametrize("page", [page for page in PAGES if page.name not in RECORDS and python_snippets(page)],
                         ids=page_id)
def test_python_snippets_run(page, snippet_checkpoint, tmp_path):
    """The page's snippets in order, in a fresh process, the Hub id of the examples replaced by a saved folder."""
    snippets = [block.replace(PLACEHOLDER_MODEL, str(snippet_checkpoint)) for block in python_snippets(page)]
    script = SNIPPET_CONTEXT.format(checkpoint=str(snippet_checkpoint)) + "\n".join(snippets)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, textwrap.shorten(result.stderr[-3000:], 3000)

"""The README's main command works on a fresh machine: no network, no ../shared (it uses what ships in examples/), and
nothing installed beyond `pip install -e .` (no extras)."""

import ast
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


from conversion.output_dir import OUTPUT_RECORD, record_output


PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = PROJECT_ROOT / "examples" / "quickstart.py"

# Runs a script as if only some packages were installed: every other distribution's top-level modules are set to
# None in sys.modules, so that importing them fails and importlib.util.find_spec (what transformers' availability
# checks use) says they are absent.
RUN_WITH_ONLY = """
import json, os, runpy, sys
for name in json.loads(sys.argv[1]):
    sys.modules.setdefault(name, None)
script = sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` does
runpy.run_path(script, run_name="__main__")
"""


def install_requires() -> list[str]:
    """The `install_requires` list of setup.py, read without running it."""
    tree = ast.parse((PROJECT_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(element) for element in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def requirement_closure(requirements) -> set[str]:
    """The distributions that `pip install` of `requirements` brings in (as installed here, without extras)."""
    names, pending = set(), [Requirement(requirement) for requirement in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in names:
            continue
        names.add(name)
        try:
            dependencies = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for dependency in map(Requirement, dependencies):
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                pending.append(dependency)
    return names


def modules_outside(distributions: set[str]) -> list[str]:
    """Top-level modules of the installed distributions that are not in `distributions` (nor the project)."""
    allowed = distributions | {"mor-transformers"}
    blocked = []
    for module, owners in metadata.packages_distributions().items():
        if not {canonicalize_name(owner) for owner in owners} & allowed and module.isidentifier():
            blocked.append(module)
    return sorted(blocked)


def run_quickstart(*arguments, blocked, cwd):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    environment.pop("OMP_NUM_THREADS", None)  # the quickstart chooses its thread count itself
    return subprocess.run(
        [sys.executable, "-c", RUN_WITH_ONLY, json.dumps(blocked), str(QUICKSTART), *map(str, arguments)],
        cwd=cwd,  # not the project root: the script finds its assets itself
        capture_output=True, text=True, timeout=600, env=environment,
    )


def test_setup_requires_what_the_main_job_imports():
    closure = requirement_closure(install_requires())
    assert {"accelerate", "tqdm", "matplotlib", "transformers", "torch"} <= closure


def test_quickstart_runs_end_to_end_offline_with_the_install_requirements_only(tmp_path):
    blocked = modules_outside(requirement_closure(install_requires()))
    assert "peft" in blocked or "pytest" in blocked  # the simulation hides the extras
    earlier_run(tmp_path / "quickstart")
    result = run_quickstart("--steps", "4", "--eval-tokens", "512", "--output-dir", tmp_path / "quickstart",
                            "--overwrite", blocked=blocked, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "Using 1 CPU thread" in output.splitlines()[0]
    assert "perplexity: original Llama" in output and "uptrained MoR" in output
    # Two mean depths, each saying what it is measured on (issue 18, item 7).
    assert "mean recursion depth on this evaluation text" in output and "generated tokens: " in output
    story = output.split("recursion depth in brackets:")[1]
    assert re.search(r"Once\[[123]\] upon\[[123]\]", story), story[:200]
    assert (tmp_path / "quickstart" / "recursion_depths.png").stat().st_size > 10_000
    model_dir = tmp_path / "quickstart" / "model"
    assert (model_dir / "model.safetensors").exists()
    original = float(output.split("original Llama ")[1].split()[0].rstrip(","))
    assert original < 6  # the shipped checkpoint is the real pretrained model

    # The saved model decodes with its cache, and carries a card with this run's figures.
    assert json.loads((model_dir / "config.json").read_text())["use_cache"] is True
    card = (model_dir / "README.md").read_text()
    uptrained = float(output.split("uptrained MoR ")[1].split()[0])
    assert f"| MoR after uptraining | {uptrained:.2f} |" in card
    assert "**Uptrained** for 4 steps" in card and "tinystories_train_sample.txt" in card
    assert "${" not in card
    assert "from `examples/assets/stories260K`" in card  # no path of this machine
    # The earlier run's folder was replaced as a whole (its notes.txt is gone); the hidden record says what this run
    # wrote, for the next --overwrite.
    assert sorted(path.name for path in (tmp_path / "quickstart").iterdir()) == [
        OUTPUT_RECORD, "model", "recursion_depths.png"]


def earlier_run(folder):
    """A folder as an earlier quickstart run leaves it (recorded as an output of these tools)."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"an earlier, 300-step model")
    (folder / "notes.txt").write_text("written by that run")
    record_output(folder)
    return folder


def test_an_earlier_run_is_kept_without_overwrite(tmp_path):
    """Issue 23, item 7: `--steps 5` silently replaced an earlier 300-step model."""
    folder = earlier_run(tmp_path / "quickstart")
    before = sorted((str(path), path.read_bytes()) for path in folder.rglob("*") if path.is_file())
    result = run_quickstart("--steps", "5", "--output-dir", folder, blocked=[], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (f"error: {folder} already exists; nothing was written. Pass --overwrite to replace it (an "
                             f"earlier output of these tools only), or choose another output folder.\n")
    assert result.stdout == ""
    assert sorted((str(path), path.read_bytes()) for path in folder.rglob("*") if path.is_file()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quickstart"]


def test_quickstart_names_what_to_install_when_accelerate_is_missing(tmp_path):
    result = run_quickstart("--help", blocked=["accelerate"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the quickstart needs accelerate"), lines
    assert "pip install -e ." in lines[0]


def test_the_card_of_another_local_model_names_no_base_model(tmp_path):
    import shutil

    model = tmp_path / "my-llama"
    shutil.copytree(PROJECT_ROOT / "examples" / "assets" / "stories260K", model)
    result = run_quickstart("--model", model, "--steps", "1", "--eval-tokens", "256", "--output-dir", tmp_path / "out",
                            blocked=[], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    front_matter = card.split("---")[1]
    # The licence is the source's, read from its own card as the converter reads it: this copy's says MIT.
    assert "base_model:" not in front_matter and "license: mit" in front_matter
    assert "| source (my-llama) |" in card
    assert 'from_pretrained("path/to/model", trust_remote_code=True)' in card

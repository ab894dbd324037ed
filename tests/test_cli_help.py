"""`--help` of every command line (issue 18, item 7): every option has a help text that shows its default, no help
names an internal class, and the model and output folders are positional arguments everywhere. The installed console
scripts (issue 19, item 3) run those command lines from any folder, and a built package installs `conversion/` as
`mor_conversion`."""

import argparse
import configparser
import importlib
import importlib.util
import inspect
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import conversion
from conftest import STORIES_DIR


PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = PROJECT_ROOT / "examples"
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
    for module_info in pkgutil.walk_packages(conversion.__path__, prefix="conversion."):
        module = importlib.import_module(module_info.name)
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


# The console scripts setup.py installs, and the command line each runs.
CONSOLE_SCRIPTS = {
    "mor-convert": "conversion.convert_llama_to_mor",
    "mor-uptrain": "conversion.uptrain",
    "mor-pretrain": "conversion.pretrain",
    "mor-push": "conversion.push_to_hub",
}


# The function of conversion/commands.py each console script calls.
CONSOLE_SCRIPT_FUNCTIONS = {"mor-convert": "convert", "mor-uptrain": "uptrain", "mor-pretrain": "pretrain",
                            "mor-push": "push"}

# Runs a console script's function (the last argument) as its installed wrapper does, with `import torch`
# interrupted as Ctrl-C interrupts it (torch takes seconds to import).
INTERRUPTED_IMPORT = """
import sys

class InterruptTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

function = sys.argv.pop()
sys.meta_path.insert(0, InterruptTorch())
from conversion import commands
raise SystemExit(getattr(commands, function)())
"""


# A fixed width, so that argparse wraps a help text alike in a subprocess and in the test.
HELP_WIDTH = "120"


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_script_is_installed_and_answers_help_from_any_folder(script, tmp_path, monkeypatch):
    path = shutil.which(script, path=sysconfig.get_path("scripts"))
    assert path, f"{script} is not installed in {sysconfig.get_path('scripts')}: run pip install -e . (again)"
    result = subprocess.run([path, "--help"], cwd=tmp_path, env={**os.environ, "COLUMNS": HELP_WIDTH},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("COLUMNS", HELP_WIDTH)
    assert result.stdout.startswith(f"usage: {script} ")
    assert result.stdout == load(CONSOLE_SCRIPTS[script]).build_argument_parser().format_help()


@pytest.mark.parametrize("script", ["mor-convert", "mor-uptrain", "mor-pretrain"])
def test_ctrl_c_while_torch_is_imported_is_one_error_line(script, tmp_path):
    """Issue 23, item 6: Ctrl-C while `mor-convert` still imported torch ended in a bare KeyboardInterrupt traceback."""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, CONSOLE_SCRIPT_FUNCTIONS[script]],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "\nerror: interrupted by Ctrl-C; nothing was written.\n", result.stderr
    assert result.stdout == ""


def test_built_package_installs_conversion_as_mor_conversion_with_working_scripts(tmp_path):
    """A non-editable install (a wheel built from setup.py): `conversion/` becomes `mor_conversion`, with the model
    card template, next to `modeling_mor` and nothing else; its scripts convert a model from any folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for name in ("modeling_mor", "conversion"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"modeling_mor", "mor_conversion"}
        conversion_files = {path.relative_to(PROJECT_ROOT / "conversion").as_posix()
                            for path in (PROJECT_ROOT / "conversion").rglob("*") if path.suffix in (".py", ".md")}
        assert {name for name in names if name.startswith("mor_conversion/")} == {
            f"mor_conversion/{name}" for name in conversion_files}
        (entry_points_file,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_file).decode())
    assert dict(entry_points["console_scripts"]) == {
        script: f"mor_conversion.commands:{name}" for script, name in CONSOLE_SCRIPT_FUNCTIONS.items()}

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the repository's folders
    imported = subprocess.run(
        [sys.executable, "-c", "import modeling_mor, mor_conversion; print(mor_conversion.__file__, modeling_mor.__file__)"],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300, check=True,
    )
    assert all(Path(file).is_relative_to(site) for file in imported.stdout.split()), imported.stdout
    converted = subprocess.run(
        [str(site / "bin" / "mor-convert"), str(STORIES_DIR), "mor", "--num-recursions", "3"],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "Converted with `mor-convert`" in (elsewhere / "mor" / "README.md").read_text()

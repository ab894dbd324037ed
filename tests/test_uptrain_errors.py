"""Bad input to `python -m conversion.uptrain`: one `error:` line, exit code 2, nothing written, and the model never
loaded."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conversion import uptrain
from conversion.convert_llama_to_mor import main as convert_main

from conftest import TINY_DIMS, edited_model_copy, one_error_line, with_config_fields


PROJECT_ROOT = Path(__file__).resolve().parents[1]
ASSETS = PROJECT_ROOT / "examples" / "assets"
STORIES = ASSETS / "stories260K"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "stories-mor"
    # Tied layers (no relaxation deltas), whose tensors the config-mismatch case counts.
    assert convert_main([str(STORIES), str(output), "--num-recursions", "3", "--relaxation-rank", "0"]) == 0
    return output


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text((ASSETS / "tinystories_train_sample.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture
def refused(monkeypatch, capsys):
    """Runs uptraining on arguments that must be refused before the model is loaded; returns the error line."""

    def never_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(uptrain.AutoModelForCausalLM, "from_pretrained", never_loaded)

    return lambda *arguments: one_error_line(uptrain.main, capsys, arguments)


def _snapshot(folder):
    return sorted((str(path.relative_to(folder)), path.stat().st_mtime_ns) for path in Path(folder).rglob("*"))


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "inside", "contains"])
def test_output_dir_may_not_be_the_input_dir(converted, train_text, tmp_path, refused, spelling, monkeypatch):
    before = _snapshot(converted)
    if spelling == "same":
        output = converted
    elif spelling == "relative":
        monkeypatch.chdir(tmp_path)
        output = os.path.relpath(converted, tmp_path)
    elif spelling == "symlink":
        output = tmp_path / "link"
        output.symlink_to(converted, target_is_directory=True)
    elif spelling == "inside":
        output = converted / "uptrained"
    else:
        output = converted.parent
    error = refused(converted, output, "--train-file", train_text, "--max-steps", "1", "--overwrite")
    assert "INPUT_DIR" in error and str(converted.resolve()) in error
    assert _snapshot(converted) == before


def test_overwrite_refuses_a_folder_holding_anything_but_an_earlier_output(converted, train_text, tmp_path, refused):
    """Issue 18, item 1: a user's folder is never replaced, and the error lists what is there."""
    output = tmp_path / "d"
    (output / "sub").mkdir(parents=True)
    (output / "notes.txt").write_text("keep me")
    before = _snapshot(output)
    error = refused(converted, output, "--train-file", train_text, "--max-steps", "1", "--overwrite")
    assert "not an earlier output" in error and "notes.txt, sub/" in error
    assert _snapshot(output) == before


@pytest.mark.parametrize("output", [".", ".."])
def test_the_working_directory_is_never_replaced(converted, train_text, tmp_path, refused, monkeypatch, output):
    """Even empty (a new run replaces an empty OUTPUT_DIR without --overwrite), the working directory stays."""
    work = tmp_path / "work" / "empty"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    error = refused(converted, output, "--train-file", train_text, "--max-steps", "1", "--overwrite")
    assert "working directory" in error
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["empty", "work"]


def test_output_dir_may_not_be_the_teacher(converted, train_text, tmp_path, refused):
    teacher = tmp_path / "teacher"
    shutil.copytree(STORIES, teacher)
    before = _snapshot(teacher)
    error = refused(converted, teacher, "--train-file", train_text, "--max-steps", "1", "--teacher", teacher,
                    "--overwrite")
    assert "--teacher" in error
    assert _snapshot(teacher) == before


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"  \n\n\t \n", "blank"),
        (b"Once upon\xff a time", "not UTF-8 text (byte 9"),
        ("Once upon a time".encode("utf-16"), "looks like UTF-16). Fix: convert it to UTF-8 (for example `iconv -f utf-16"),
    ],
)
@pytest.mark.parametrize("option", ["--train-file", "--eval-file"])
def test_unreadable_text_files_are_refused(converted, train_text, tmp_path, refused, content, problem, option):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    files = {"--train-file": train_text, "--eval-file": train_text, option: text}
    error = refused(converted, tmp_path / "up", *(item for pair in files.items() for item in pair), "--max-steps", "1")
    # The option is named once, before its file (a reviewer saw "--eval-file --eval-file blank.txt has no text").
    assert error.startswith(f"error: {option} {text} ") and error.count(option) == 1, error
    assert problem in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_training_text_shorter_than_one_block_is_refused(converted, tmp_path, refused):
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time there was a cat.")
    error = refused(converted, tmp_path / "up", "--train-file", text, "--max-steps", "1", "--block-size", "64")
    assert str(text) in error and "fewer than one block of 64" in error and "--block-size" in error
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("kind", ["missing", "empty folder", "llama", "no weights", "config not fitting the weights"])
def test_input_dir_that_is_not_an_mor_model_is_refused(converted, train_text, tmp_path, refused, kind):
    model_dir = tmp_path / "model"
    if kind == "empty folder":
        model_dir.mkdir()
        expected = "no config.json"
    elif kind == "llama":
        shutil.copytree(STORIES, model_dir)
        expected = "a 'llama' model, not an MoR one"
    elif kind == "no weights":
        model_dir.mkdir()
        shutil.copyfile(converted / "config.json", model_dir / "config.json")
        expected = "no model weights"
    elif kind == "config not fitting the weights":  # issue 18, item 6: was transformers' load report, a RuntimeError
        edited_model_copy(converted, model_dir, with_config_fields(intermediate_size=344))
        expected = "config.json does not match the weights next to it (9 tensor(s) have another shape"
    else:
        expected = "does not exist"
    error = refused(model_dir, tmp_path / "up", "--train-file", train_text, "--max-steps", "1")
    assert expected in error and str(model_dir) in error
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--learning-rate", "-1", "--learning-rate -1.0 is not valid: give more than 0."),  # issue 23, item 6
    ("--learning-rate", "0", "--learning-rate 0.0 is not valid: give more than 0."),
    ("--distill-weight", "1.5", "--distill-weight 1.5 is not valid: give a value in [0, 1]."),
    ("--distill-temperature", "0", "--distill-temperature 0.0 is not valid: give more than 0."),
    ("--weight-decay", "-0.1", "--weight-decay -0.1 is not valid: give at least 0."),
])
def test_option_values_out_of_range_are_refused(converted, train_text, tmp_path, refused, option, value, expected):
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", "1", option, value)
    assert error == f"error: {expected}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_steps", ["0", "-1"])
def test_max_steps_must_be_positive(converted, train_text, tmp_path, refused, max_steps):
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", max_steps)
    assert f"--max-steps {max_steps}" in error and "at least 1" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output_state", ["absent", "empty", "no checkpoint"])
def test_resuming_latest_without_a_checkpoint_says_so(converted, train_text, tmp_path, refused, output_state):
    output = tmp_path / "up"
    if output_state != "absent":
        output.mkdir()
    if output_state == "no checkpoint":
        (output / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    error = refused(converted, output, "--train-file", train_text, "--max-steps", "1",
                    "--resume-from-checkpoint", "latest")
    assert "no checkpoint" in error and str(output) in error
    assert _snapshot(tmp_path) == before


def test_resuming_from_a_missing_checkpoint_is_refused(converted, train_text, tmp_path, refused):
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", "1",
                    "--resume-from-checkpoint", tmp_path / "checkpoint-7")
    assert "checkpoint-7" in error and "not a checkpoint" in error
    assert list(tmp_path.iterdir()) == []


def test_resuming_latest_from_an_incomplete_checkpoint_says_so(converted, train_text, tmp_path, refused):
    partial = tmp_path / "up" / "checkpoint-4"  # a run killed while saving it: no trainer_state.json yet
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half written")
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", "8",
                    "--resume-from-checkpoint", "latest")
    assert str(partial) in error and "incomplete" in error


def test_dataset_without_the_datasets_package_names_the_extra(converted, tmp_path, refused, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if it were not installed
    error = refused(converted, tmp_path / "up", "--dataset", "someone/stories", "--max-steps", "1")
    assert "--dataset needs the `datasets` package" in error and 'pip install "mor-transformers[train]"' in error
    assert list(tmp_path.iterdir()) == []


def test_setup_puts_datasets_in_the_train_extra():
    tree = ast.parse((PROJECT_ROOT / "setup.py").read_text(encoding="utf-8"))
    extras = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.keyword) and node.arg == "extras_require")
    for extra in ("train", "dev"):
        assert any(Requirement(requirement).name == "datasets" for requirement in extras[extra]), extra


def test_an_unknown_dataset_offline_names_the_fix(converted, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as on a machine without network), a Hub dataset id is one error line that says what
    to check; in a fresh process, since `datasets` reads HF_HUB_OFFLINE when it is imported."""
    result = subprocess.run(
        [sys.executable, "-m", "conversion.uptrain", str(converted), str(tmp_path / "up"), "--dataset", "nosuch/x",
         "--max-steps", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dataset nosuch/x could not be loaded"), result.stderr
    assert "check the dataset name" in lines[0] and "network" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_eval_options_without_an_eval_file_are_refused(converted, train_text, tmp_path, refused):
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", "1",
                    "--eval-block-size", "64")
    assert "--eval-block-size" in error and "--eval-file" in error
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_safetensors_input_is_refused(converted, train_text, tmp_path, refused):
    model_dir = Path(shutil.copytree(converted, tmp_path / "model"))
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    error = refused(model_dir, tmp_path / "up", "--train-file", train_text, "--max-steps", "1")
    assert f"{weights} is not a readable safetensors file" in error
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("teacher_kind", ["another vocabulary", "a shorter context", "no weights", "missing"])
def test_a_teacher_distillation_cannot_use_is_refused(converted, train_text, tmp_path, refused, teacher_kind):
    """Issue 23, item 5: a teacher with another vocabulary failed mid-training with a tensor size RuntimeError, one
    with a shorter context with an IndexError."""
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = tmp_path / "teacher"
    dims = dict(TINY_DIMS, num_hidden_layers=2)
    if teacher_kind == "another vocabulary":  # 97 tokens, the student 512
        LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(teacher)
        expected = (f"--teacher {teacher} has a vocabulary of 97 tokens and INPUT_DIR {converted} one of 512: "
                    f"distillation compares their next-token distributions token by token")
    elif teacher_kind == "a shorter context":
        LlamaForCausalLM(LlamaConfig(**dict(dims, vocab_size=512, max_position_embeddings=32))).save_pretrained(teacher)
        expected = (f"--teacher {teacher} reads at most 32 tokens (max_position_embeddings), fewer than the training "
                    f"blocks of --block-size 64. Fix: pass --block-size 32 (or less)")
    elif teacher_kind == "no weights":
        teacher.mkdir()
        shutil.copyfile(STORIES / "config.json", teacher / "config.json")
        expected = f"--teacher {teacher} has a config.json but no model weights"
    else:
        expected = f"--teacher {teacher} does not exist. Fix:"
    error = refused(converted, tmp_path / "up", "--train-file", train_text, "--max-steps", "1", "--block-size", "64",
                    "--teacher", teacher)
    assert error.startswith(f"error: {expected}"), error
    assert not (tmp_path / "up").exists()

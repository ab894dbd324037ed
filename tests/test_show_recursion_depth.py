"""`examples/show_recursion_depth.py`: bad input is one `error:` line (exit 2) before the model is loaded, and nothing
is written (issue 18, item 6)."""

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from conversion.convert_llama_to_mor import convert_llama_to_mor

from conftest import STORIES_DIR, edited_model_copy, one_error_line, with_config_fields


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "show_recursion_depth.py"


def load_script():
    spec = importlib.util.spec_from_file_location("show_recursion_depth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mor_dir(tmp_path_factory):
    """stories260K converted to MoR (middle_cycle, N_r = 3) with its tokenizer."""
    folder = tmp_path_factory.mktemp("show_depth") / "mor"
    llama = LlamaForCausalLM.from_pretrained(STORIES_DIR)
    convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle").save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "problem, edit, expected",
    [
        ("truncated", lambda text: text[:200], "config.json that cannot be read"),
        ("strategy", with_config_fields(sharing_strategy="middle_cycel"), "sharing_strategy='middle_cycel' is not valid"),
        ("recursions", with_config_fields(num_recursions=4, capacity=[1.0, 0.75, 0.5, 0.25]), "cannot be unrolled"),
        ("weights", with_config_fields(intermediate_size=344), "config.json does not match the weights"),
    ],
)
def test_a_broken_model_folder_is_one_error_line(mor_dir, tmp_path, capsys, monkeypatch, problem, edit, expected):
    folder = edited_model_copy(mor_dir, tmp_path / problem, edit)
    monkeypatch.chdir(tmp_path)
    script = load_script()
    monkeypatch.setattr(script.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the model was loaded before the checks"))
    error = one_error_line(script.main, capsys, [folder, "--max-new-tokens", "2"])
    assert f"MODEL {folder}" in error and expected in error
    assert sorted(path.name for path in tmp_path.iterdir()) == [problem]  # no picture written


def test_a_mistyped_folder_is_one_error_line_without_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = one_error_line(load_script().main, capsys, [tmp_path / "outputs" / "no-such-model"])
    assert "does not exist" in error
    assert list(tmp_path.iterdir()) == []

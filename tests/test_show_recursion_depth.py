"""`examples/show_recursion_depth.py`: bad input is one `error:` line (exit 2) before the model is loaded, and nothing
is written (issue 18, item 6); a run says how many threads it uses, labels its mean depth and saves its picture under
outputs/, not in the working directory (item 7)."""

import importlib.util
import logging
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


@pytest.mark.parametrize(
    "options, expected",
    [
        # Issue 23, items 6 and 7: a traceback after generating; "saved to mine" while mine.png was written.
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is not valid: give at least 1."),
        (["--output", "notes.txt"], "--output notes.txt does not end in .png, .pdf or .svg, the formats it is written "
                                    "in; nothing was written. Fix: give for example --output notes.png."),
        (["--output", "pictures/mine"], "--output pictures/mine does not end in .png, .pdf or .svg, the formats it is "
                                        "written in; nothing was written. Fix: give for example --output "
                                        "pictures/mine.png."),
        (["--output", "."], "--output . does not end in .png"),
    ],
)
def test_bad_options_are_one_error_line(mor_dir, tmp_path, capsys, monkeypatch, options, expected):
    monkeypatch.chdir(tmp_path)
    script = load_script()
    monkeypatch.setattr(script.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the model was loaded before the checks"))
    error = one_error_line(script.main, capsys, [mor_dir, *options])
    assert error.startswith(f"error: {expected}"), error
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_a_tokenizer_is_named(mor_dir, tmp_path, capsys, monkeypatch):
    """Issue 23, item 7: it said "install sentencepiece or tiktoken", without naming the folder."""
    import shutil

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(mor_dir / name, folder / name)
    monkeypatch.chdir(tmp_path)
    error = one_error_line(load_script().main, capsys, [folder, "--max-new-tokens", "2"])
    assert error.startswith(f"error: MODEL {folder} has no tokenizer (no tokenizer.json, tokenizer_config.json or "
                            f"tokenizer.model); it reads the prompt and writes the continuation with it. Fix: save the "
                            f"tokenizer of the model it came from next to the weights"), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["no-tokenizer"]


def test_a_mistyped_folder_is_one_error_line_without_the_hub(tmp_path, capsys, monkeypatch):
    """'outputs/no-such-model' has the form of a Hub id, but outputs/ is a local folder: it is read as a path and
    refused at once (it cost 30-50 s of Hub retries)."""
    from huggingface_hub import constants

    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a Hub request would fail at once, with another message
    error = one_error_line(load_script().main, capsys, ["outputs/no-such-model"])
    assert "MODEL outputs/no-such-model does not exist (read as a local path, since the folder outputs exists" in error
    assert [path.name for path in tmp_path.rglob("*")] == ["outputs"]


def test_a_hub_id_is_announced_before_the_hub_is_asked(capsys, monkeypatch):
    """Otherwise a mistyped path in Hub-id form waits through the Hub's retries without a word."""
    from huggingface_hub import constants

    from conversion.cli_checks import read_mor_config
    from modeling_mor import MoRConfig

    def unreachable(*args, **kwargs):
        assert "fetching it from the Hub" in capsys.readouterr().out  # said before the (slow) request
        hub_logger.warning("Retrying in 1s [Retry 1/5].")  # as huggingface_hub's HTTP backoff logs each retry
        raise OSError("We couldn't connect to the Hub")

    hub_logger = logging.getLogger("huggingface_hub.utils._http")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    hub_logger.addHandler(handler)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(MoRConfig, "get_config_dict", unreachable)
    try:
        with pytest.raises(ValueError, match="the Hub could not be reached"):
            read_mor_config("someone/mor-model", "MODEL")
    finally:
        hub_logger.removeHandler(handler)
    assert seen == []  # the retries stay off stderr: the failure is one error line


def test_a_run_names_its_threads_labels_its_mean_depth_and_writes_under_outputs(mor_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_script().main([str(mor_dir), "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Using 1 CPU thread(s), as OMP_NUM_THREADS says.")  # conftest sets it
    assert "mean depth of the 3 generated tokens: " in printed
    assert [str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")] == ["outputs", "outputs/recursion_depths.png"]


def test_the_weights_check_reads_the_model_weights_only(mor_dir, tmp_path):
    """Another safetensors file next to the model (an adapter) is not part of the model: no false refusal."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from conversion.cli_checks import read_mor_config

    folder = Path(shutil.copytree(mor_dir, tmp_path / "mor"))
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    assert read_mor_config(str(folder), "MODEL").num_recursions == 3

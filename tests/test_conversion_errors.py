"""Bad input to `python -m conversion.convert_llama_to_mor`: one `error:` line, exit code 2, nothing written; and
the defaults a first conversion relies on (routing for the sequence strategies, perplexity blocks, the card's base
model). Issue 11, items 2, 5, 6, 7, 14 and 15."""

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion.convert_llama_to_mor import (
    convert_llama_to_mor,
    gguf_base_model_name,
    hub_repo_id,
    looks_like_hub_id,
    read_gguf_metadata,
)
from conversion.convert_llama_to_mor import main as convert_main
from conversion.measure import eval_block_size
from conversion.output_dir import OutputDirExistsError, staged_output_dir
from hub_server import DEFAULT_TOKEN, hub_environment, run_hub_client, running_hub_server


PROJECT_ROOT = Path(__file__).resolve().parents[1]
VALID_TEXT = PROJECT_ROOT / "examples" / "assets" / "tinystories_valid_sample.txt"
CONTEXT = 64  # max_position_embeddings of the tiny source


def _llama_folder(path, num_layers=5):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=num_layers, max_position_embeddings=CONTEXT)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_template(tmp_path_factory):
    return _llama_folder(tmp_path_factory.mktemp("template") / "llama")


@pytest.fixture
def llama(tmp_path, llama_template):
    """A tiny 5-layer Llama folder (no tokenizer) inside this test's tmp_path."""
    import shutil

    return Path(shutil.copytree(llama_template, tmp_path / "llama"))


def _digest(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _one_error_line(capsys) -> str:
    """The single line the CLI wrote to stderr, which must be an `error:` line (no traceback, no warning)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _write_gguf(path: Path, metadata: dict) -> Path:
    """A metadata-only GGUF v3 file (no tensors): enough for the checks that run before any loading."""
    def string(value: str) -> bytes:
        data = value.encode("utf-8")
        return struct.pack("<Q", len(data)) + data

    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for key, value in metadata.items():
        blob += string(key) + struct.pack("<I", 8) + string(value)  # type 8: a string
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Issue 11, item 2: OUTPUT_DIR may never be, contain or lie inside the source, whatever the spelling
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "source, output",
    [
        ("llama", "llama"),  # the same folder, with --overwrite
        ("llama", "./llama/../llama/"),  # the same folder, spelled differently
        ("./llama", "llama/mor"),  # OUTPUT_DIR inside SOURCE
        ("llama", "."),  # OUTPUT_DIR contains SOURCE
        ("link", "llama"),  # a symlink to the source, given as SOURCE
        ("llama", "link"),  # a symlink to the source, given as OUTPUT_DIR
        ("llama", "link/sub"),  # inside the source through a symlink
    ],
)
def test_an_output_folder_overlapping_the_source_is_refused_before_anything_is_written(
    tmp_path, llama, monkeypatch, capsys, source, output
):
    (tmp_path / "link").symlink_to(llama, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    before, tree = _digest(llama), _tree(tmp_path)
    assert convert_main([source, output, "--num-recursions", "3", "--overwrite"]) == 2
    error = _one_error_line(capsys)
    assert "SOURCE" in error and "Nothing was written" in error
    assert _digest(llama) == before, "the source checkpoint was modified"
    assert _tree(tmp_path) == tree, "something was written (an output or staging folder)"


def test_an_output_folder_containing_the_eval_file_is_refused(tmp_path, llama, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "valid.txt").write_text(VALID_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    assert convert_main([str(llama), str(texts), "--eval-file", str(texts / "valid.txt"), "--overwrite"]) == 2
    assert "--eval-file" in _one_error_line(capsys)
    assert [path.name for path in texts.iterdir()] == ["valid.txt"]


def test_staged_output_dir_checks_the_inputs_before_creating_anything(tmp_path, llama):
    before, tree = _digest(llama), _tree(tmp_path)
    with pytest.raises(OutputDirExistsError, match="lies inside SOURCE"):
        with staged_output_dir(llama / "sub" / "mor", overwrite=True, inputs={"SOURCE": str(llama)}):
            pytest.fail("the staging folder was created")
    assert _digest(llama) == before and _tree(tmp_path) == tree


def test_the_source_is_still_replaceable_by_a_separate_output(tmp_path, llama):
    """The refusal is about overlapping paths only: a sibling output folder with --overwrite still works."""
    (tmp_path / "mor").mkdir()
    assert convert_main([str(llama), str(tmp_path / "mor"), "--num-recursions", "3", "--overwrite",
                         "--no-tokenizer"]) == 0
    assert (tmp_path / "mor" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Issue 18, item 1: --overwrite replaces an earlier output of these tools only, never a user's folder or the cwd
# ---------------------------------------------------------------------------------------------------------------------

def _convert(source, output, *extra):
    return convert_main([str(source), str(output), "--num-recursions", "3", "--no-tokenizer", *map(str, extra)])


def test_overwrite_replaces_an_earlier_conversion_but_not_what_was_added_to_it(tmp_path, llama, capsys):
    output = tmp_path / "mor"
    assert _convert(llama, output) == 0
    first = json.loads((output / "config.json").read_text())
    assert _convert(llama, output, "--overwrite", "--dtype", "bfloat16") == 0
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16" != first["dtype"]
    (output / "notes.txt").write_text("keep me")
    (output / "plots").mkdir()
    tree = _tree(tmp_path)
    capsys.readouterr()
    assert _convert(llama, output, "--overwrite") == 2
    error = _one_error_line(capsys)
    assert "notes.txt, plots/" in error and "did not write" in error and "nothing was written" in error
    assert _tree(tmp_path) == tree and (output / "notes.txt").read_text() == "keep me"


def test_overwrite_refuses_a_folder_these_tools_did_not_write(tmp_path, llama, capsys):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.bin").write_bytes(b"1234")
    tree = _tree(tmp_path)
    assert _convert(llama, folder, "--overwrite") == 2
    error = _one_error_line(capsys)
    assert "not an earlier output" in error and "notes.txt, sub/" in error
    assert _tree(tmp_path) == tree


@pytest.mark.parametrize("output", [".", ".."])
def test_overwrite_never_replaces_the_working_directory_or_a_folder_containing_it(
    tmp_path, llama, monkeypatch, capsys, output
):
    # The strongest case: the working directory is itself an earlier conversion (and its parent holds only it).
    work = tmp_path / "work" / "mor"
    assert _convert(llama, work) == 0
    if output == "..":
        from conversion.output_dir import record_output

        record_output(work.parent)
    monkeypatch.chdir(work)
    tree = _tree(tmp_path)
    capsys.readouterr()
    assert _convert(llama, output, "--overwrite") == 2
    assert "working directory" in _one_error_line(capsys)
    assert _tree(tmp_path) == tree


def test_staged_output_dir_records_its_entries_and_checks_again_before_replacing(tmp_path):
    from conversion.output_dir import OUTPUT_RECORD, TRAINER_CHECKPOINTS, check_output_dir

    output = tmp_path / "out"
    with staged_output_dir(output, grows=(TRAINER_CHECKPOINTS,)) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
    assert sorted(path.name for path in output.iterdir()) == [OUTPUT_RECORD, "model.safetensors"]
    (output / "checkpoint-12").mkdir()  # what a training run adds after it has moved into place
    check_output_dir(output, overwrite=True)
    # A file added while a run is busy (after the check at its start) is found before the folder is replaced.
    with pytest.raises(OutputDirExistsError, match="did not write: notes.txt"):
        with staged_output_dir(output, overwrite=True) as staging:
            (staging / "model.safetensors").write_bytes(b"new weights")
            (output / "notes.txt").write_text("added during the run")
    assert (output / "notes.txt").is_file() and (output / "model.safetensors").read_bytes() == b"weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_output_files_are_replaced_only_when_their_json_says_these_tools_wrote_them(tmp_path):
    from conversion.output_dir import check_output_files

    table, result = tmp_path / "curve.md", tmp_path / "curve.json"
    table.write_text("notes")
    with pytest.raises(OutputDirExistsError, match="already exist"):
        check_output_files([table, result], result, overwrite=False)
    with pytest.raises(OutputDirExistsError, match="not an earlier output"):
        check_output_files([table, result], result, overwrite=True)
    result.write_text(json.dumps({"written_by": "examples/budget_curve.py"}))
    check_output_files([table, result], result, overwrite=True)


# ---------------------------------------------------------------------------------------------------------------------
# Item 5: the sequence strategies cannot route; the default routing is "none" for them
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, num_recursions", [("sequence", 5), ("middle_sequence", 3)])
def test_sequence_strategies_convert_with_routing_none_by_default(tmp_path, llama, capsys, strategy, num_recursions):
    output = tmp_path / "mor"
    assert convert_main([str(llama), str(output), "--sharing-strategy", strategy,
                         "--num-recursions", str(num_recursions), "--no-tokenizer"]) == 0
    assert f"--sharing-strategy {strategy} cannot route" in capsys.readouterr().out
    config = json.loads((output / "config.json").read_text())
    assert config["routing"] == "none" and config["sharing_strategy"] == strategy

    # The Python function has the same default.
    mor = convert_llama_to_mor(LlamaForCausalLM.from_pretrained(llama), num_recursions=num_recursions,
                               sharing_strategy=strategy)
    assert mor.config.routing == "none"


def test_sequence_strategy_with_explicit_routing_is_one_error_line(tmp_path, llama, capsys):
    assert convert_main([str(llama), str(tmp_path / "mor"), "--sharing-strategy", "sequence", "--num-recursions", "5",
                         "--routing", "expert_choice"]) == 2
    assert "--routing none" in _one_error_line(capsys)
    assert not (tmp_path / "mor").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Item 6: a missing source says so; only Hub-like ids mention the Hub
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "source", ["does/not/exist", "./missing", "../missing", "missing/", "~/surely-missing-mor-source"]
)
def test_a_missing_source_folder_says_it_does_not_exist(tmp_path, monkeypatch, capsys, source):
    monkeypatch.chdir(tmp_path)
    assert convert_main([source, "out"]) == 2
    error = _one_error_line(capsys)
    assert f"the source folder {source} does not exist" in error
    assert "Repo id" not in error and "Hub could not" not in error
    assert _tree(tmp_path) == []


def test_a_missing_absolute_source_says_it_does_not_exist(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert f"the source folder {tmp_path / 'missing'} does not exist;" in _one_error_line(capsys)
    assert _tree(tmp_path) == []


def test_a_quoted_home_relative_source_is_the_local_folder(tmp_path, llama, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert_main(["~/llama", str(tmp_path / "mor"), "--num-recursions", "3", "--no-tokenizer"]) == 0
    assert (tmp_path / "mor" / "model.safetensors").is_file()


@pytest.mark.parametrize("source", ["someone/some-model", "some-model"])
def test_an_unreachable_hub_id_says_the_hub_could_not_be_reached(tmp_path, monkeypatch, capsys, source):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    monkeypatch.chdir(tmp_path)
    assert convert_main([source, "out"]) == 2
    error = _one_error_line(capsys)
    assert f"{source} is not a local folder, and the Hub could not be reached" in error
    assert _tree(tmp_path) == []


def test_what_looks_like_a_hub_id():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("name") and looks_like_hub_id("Org-1/model.v2_b")
    for path in ("a/b/c", "./name", "../org/name", "/org/name", "~/name", "org\\name", "org/", "", "a--b/c"):
        assert not looks_like_hub_id(path), path


def test_hub_sources_name_the_base_model_and_a_missing_repo_says_so(tmp_path, llama):
    """Converted from the Hub (a local Hub server), the card's base model is the Hub id; a repo the Hub does not
    have is one error line saying so."""
    with running_hub_server(tmp_path / "hub") as url:
        # One client process (huggingface_hub reads the endpoint at import): upload, convert, convert a missing repo.
        output = run_hub_client(
            f"""
            import contextlib, io, json
            from huggingface_hub import HfApi
            from conversion.convert_llama_to_mor import main
            HfApi().create_repo("test-user/tiny-llama")
            HfApi().upload_folder(repo_id="test-user/tiny-llama", folder_path={str(llama)!r})
            results = []
            for argv in (["test-user/tiny-llama", {str(tmp_path / "mor")!r}, "--num-recursions", "3", "--no-tokenizer"],
                         ["test-user/no-such-model", {str(tmp_path / "missing")!r}]):
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    code = main(argv)
                results.append([code, stderr.getvalue()])
            print(json.dumps(results))
            """,
            env=hub_environment(url, DEFAULT_TOKEN, tmp_path / "home"),
            cwd=PROJECT_ROOT,
        )
    (converted, converted_err), (missing, missing_err) = json.loads(output.strip().splitlines()[-1])
    assert converted == 0, converted_err
    assert json.loads((tmp_path / "mor" / "mor_card.json").read_text())["base_model"] == "test-user/tiny-llama"
    assert "base_model: test-user/tiny-llama" in (tmp_path / "mor" / "README.md").read_text()
    assert missing == 2
    assert missing_err.strip().splitlines() == [
        "error: test-user/no-such-model is not a local folder, and the Hub has no model repo test-user/no-such-model "
        "(or it is private and you are not logged in); nothing was written. Fix: check the repo id or the local path, "
        "or log in with `hf auth login`."
    ]
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Item 7: bad options, a corrupt checkpoint, a GGUF source without the gguf package
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, expected",
    [
        (["--num-recursions", "0"], "--num-recursions 0 is not valid"),
        (["--num-recursions", "-1"], "--num-recursions -1 is not valid"),
        (["--capacity", "0.5"], "--capacity 0.5 is not valid: it gives 1 fraction(s)"),
        (["--capacity", "1", "0.5", "0"], "--capacity 1 0.5 0 is not valid: it has a fraction outside (0, 1]"),
        (["--capacity", "1", "1.5", "0.5"], "outside (0, 1]"),
        (["--capacity", "0.3", "0.5", "1"], "--capacity 0.3 0.5 1 is not valid: it increases"),
        (["--eval-file", "missing.txt"], "--eval-file missing.txt does not exist"),
        (["--eval-file", str(VALID_TEXT), "--eval-block-size", "1"], "--eval-block-size 1 is not valid"),
        # Without --eval-file nothing is measured: a block size would be ignored silently.
        (["--eval-block-size", "1"], "--eval-block-size 1 needs --eval-file"),
        (["--eval-block-size", "32"], "--eval-block-size 32 needs --eval-file"),
        # The search init scores on its own text, and only it reads that text; a full-rank relaxation has no choice,
        # and a token-choice conversion starts at depth 1, not at the full depth the search scores.
        (["--init-strategy", "search", "--relaxation-rank", "0"],
         "--init-strategy search scores its choices on --calibration-file. Fix: add --calibration-file"),
        (["--calibration-file", str(VALID_TEXT)], "--calibration-file is read only by --init-strategy search"),
        (["--calibration-max-tokens", "64"], "--calibration-max-tokens 64 needs --calibration-file"),
        (["--init-strategy", "search", "--calibration-file", str(VALID_TEXT)],
         "and a full-rank relaxation (--relaxation-rank 16) keeps every position's own source layer"),
        (["--init-strategy", "search", "--relaxation-rank", "0", "--calibration-file", str(VALID_TEXT),
          "--routing", "token_choice"], "a fresh token-choice conversion sends every token out after the first step"),
        (["--init-strategy", "search", "--relaxation-rank", "0", "--calibration-file", "missing.txt"],
         "--calibration-file missing.txt does not exist"),
        (["--init-strategy", "search", "--relaxation-rank", "0", "--calibration-file", str(VALID_TEXT),
          "--calibration-max-tokens", "1"], "--calibration-max-tokens 1 is not valid"),
        (["--init-strategy", "search", "--relaxation-rank", "0", "--calibration-file", str(VALID_TEXT),
          "--eval-file", str(VALID_TEXT)], "--calibration-file and --eval-file are the same file"),
    ],
)
def test_bad_options_are_one_error_line_and_nothing_is_written(tmp_path, llama, monkeypatch, capsys, options, expected):
    monkeypatch.chdir(tmp_path)
    tree = _tree(tmp_path)
    assert convert_main([str(llama), "out", *options]) == 2
    error = _one_error_line(capsys)
    assert expected in error and ("Fix:" in error or "Pass" in error), error
    assert _tree(tmp_path) == tree


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_safetensors_file_is_one_error_line(tmp_path, llama, capsys, damage):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    tree = _tree(tmp_path)
    assert convert_main([str(llama), str(tmp_path / "out")]) == 2
    error = _one_error_line(capsys)
    assert f"{weights} is not a readable safetensors file" in error and "corrupt or truncated" in error
    assert _tree(tmp_path) == tree


def test_a_gguf_source_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch, capsys):
    gguf_path = _write_gguf(tmp_path / "model.gguf", {"general.architecture": "llama"})
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    tree = _tree(tmp_path)
    for argv in ([str(gguf_path), str(tmp_path / "out")],
                 [str(tmp_path), str(tmp_path / "out"), "--gguf-file", "model.gguf"]):
        assert convert_main(argv) == 2
        error = _one_error_line(capsys)
        assert "needs the `gguf` package, which is not installed" in error
        assert 'pip install "mor-transformers[gguf]"' in error
    assert _tree(tmp_path) == tree


def test_a_missing_gguf_file_is_one_error_line(tmp_path, capsys):
    assert convert_main([str(tmp_path / "model.gguf"), str(tmp_path / "out")]) == 2
    assert f"the GGUF file {tmp_path / 'model.gguf'} does not exist" in _one_error_line(capsys)
    (tmp_path / "folder").mkdir()
    assert convert_main([str(tmp_path / "folder"), str(tmp_path / "out"), "--gguf-file", "model.gguf"]) == 2
    assert "--gguf-file model.gguf is not in" in _one_error_line(capsys)
    assert _tree(tmp_path) == ["folder"]


@pytest.mark.parametrize("content", [b"", b"   \n\n", "caf\xe9 au lait".encode("latin-1") * 10])
def test_an_eval_file_that_is_empty_or_not_utf8_is_one_error_line(tmp_path, capsys, content):
    stories = PROJECT_ROOT / "examples" / "assets" / "stories260K"  # a real source with a tokenizer
    (tmp_path / "eval.txt").write_bytes(content)
    assert convert_main([str(stories), str(tmp_path / "out"), "--eval-file", str(tmp_path / "eval.txt")]) == 2
    error = _one_error_line(capsys)
    assert str(tmp_path / "eval.txt") in error
    assert ("is not UTF-8 text" in error) if content.strip() else ("has no text" in error)
    assert _tree(tmp_path) == ["eval.txt"]


# ---------------------------------------------------------------------------------------------------------------------
# Item 14: perplexity blocks never exceed the source's context
# ---------------------------------------------------------------------------------------------------------------------

def test_eval_block_size_defaults_to_the_context_when_it_is_shorter():
    assert eval_block_size(None, 128) == 128
    assert eval_block_size(None, 8192) == 256
    assert eval_block_size(None, None) == 256
    assert eval_block_size(100, 128) == 100
    with pytest.raises(ValueError, match=r"--eval-block-size 512 is longer than the model's context"):
        eval_block_size(512, 128)


def test_conversion_measures_in_blocks_capped_at_the_source_context(tmp_path, monkeypatch, capsys):
    """A source whose context (64) is shorter than the default block (256) is measured in blocks of 64; an explicit
    larger block is refused before loading."""
    import shutil

    source = Path(shutil.copytree(PROJECT_ROOT / "examples" / "assets" / "stories260K", tmp_path / "short-context"))
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (source / "config.json").write_text(json.dumps(config))
    assert convert_main([str(source), str(tmp_path / "mor"), "--eval-file", str(VALID_TEXT),
                         "--eval-max-tokens", "512"]) == 0
    figures = json.loads((tmp_path / "mor" / "mor_card.json").read_text())
    assert figures["eval_block_size"] == CONTEXT
    capsys.readouterr()

    assert convert_main([str(source), str(tmp_path / "mor2"), "--eval-file", str(VALID_TEXT),
                         "--eval-block-size", "256"]) == 2
    assert "longer than the model's context (max_position_embeddings 64)" in _one_error_line(capsys)
    assert not (tmp_path / "mor2").exists()


def test_an_eval_text_shorter_than_one_block_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """As uptraining does: one short block would be scored and labelled as blocks of 256 tokens."""
    stories = PROJECT_ROOT / "examples" / "assets" / "stories260K"
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat.", encoding="utf-8")

    def never_loaded(*args, **kwargs):
        raise AssertionError("the source model was loaded before the evaluation text was checked")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", never_loaded)
    assert convert_main([str(stories), str(tmp_path / "out"), "--eval-file", str(tmp_path / "short.txt")]) == 2
    error = _one_error_line(capsys)
    assert str(tmp_path / "short.txt") in error and "fewer than one perplexity block of 256" in error
    assert "--eval-block-size" in error
    assert _tree(tmp_path) == ["short.txt"]


def test_the_card_gives_the_tokens_actually_scored(tmp_path):
    """300 tokens in blocks of 64 score 4 blocks, 256 tokens: the card says 256, not the 300 read."""
    from conversion.model_card import describe_measurement

    assert describe_measurement({"file": "t.txt", "tokens": 2000, "block_size": 256}) == (
        "first 1,792 tokens of `t.txt`, blocks of 256 tokens")
    stories = PROJECT_ROOT / "examples" / "assets" / "stories260K"
    assert convert_main([str(stories), str(tmp_path / "mor"), "--eval-file", str(VALID_TEXT), "--eval-max-tokens",
                         "300", "--eval-block-size", "64"]) == 0
    card = (tmp_path / "mor" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ") and "blocks of" in line]
    assert len(rows) == 3 and all("first 256 tokens" in row and "blocks of 64 tokens" in row for row in rows), rows
    caption = next(line for line in card.splitlines() if line.startswith("Recursion steps taken per token"))
    assert "first 256 tokens" in caption


# ---------------------------------------------------------------------------------------------------------------------
# Item 15: the card's base model is a Hub id or nothing, never a local path
# ---------------------------------------------------------------------------------------------------------------------

def test_a_local_source_gives_no_base_model_unless_named(tmp_path, llama):
    assert convert_main([str(llama), str(tmp_path / "mor"), "--num-recursions", "3", "--no-tokenizer"]) == 0
    figures = json.loads((tmp_path / "mor" / "mor_card.json").read_text())
    assert figures["base_model"] is None and figures["source_name"] == "llama"
    assert f"base_model: {llama}" not in (tmp_path / "mor" / "README.md").read_text()

    assert convert_main([str(llama), str(tmp_path / "named"), "--num-recursions", "3",
                         "--base-model-name", "someone/tiny-llama", "--no-tokenizer"]) == 0
    assert json.loads((tmp_path / "named" / "mor_card.json").read_text())["base_model"] == "someone/tiny-llama"


def test_the_base_model_of_a_gguf_source_comes_from_its_metadata(tmp_path):
    from huggingface_hub.constants import ENDPOINT

    assert hub_repo_id("org/name") == "org/name"
    assert hub_repo_id(f"{ENDPOINT}/org/name") == "org/name"
    assert hub_repo_id(f"{ENDPOINT}/org/name/tree/main") == "org/name"
    for value in (f"{ENDPOINT}/datasets/org/name", "https://example.com/org/name", "name", "", None, 3):
        assert hub_repo_id(value) is None, value

    source_url = _write_gguf(tmp_path / "a.gguf", {"general.architecture": "llama",
                                                    "general.source.repo_url": f"{ENDPOINT}/org/source-model",
                                                    "general.repo_url": f"{ENDPOINT}/quantizer/source-model-GGUF"})
    assert gguf_base_model_name(read_gguf_metadata(source_url)) == "org/source-model"
    legacy = _write_gguf(tmp_path / "b.gguf", {"general.architecture": "llama",
                                               "general.source.huggingface.repository": "org/legacy"})
    assert gguf_base_model_name(read_gguf_metadata(legacy)) == "org/legacy"
    # general.base_model.N names the model the source was fine-tuned from, not the source: not used.
    unnamed = _write_gguf(tmp_path / "c.gguf", {"general.architecture": "llama", "general.name": "Smollm2 135M",
                                                "general.base_model.0.repo_url": f"{ENDPOINT}/org/parent"})
    assert gguf_base_model_name(read_gguf_metadata(unnamed)) is None
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        read_gguf_metadata(VALID_TEXT)


def test_a_source_without_a_tokenizer_is_refused_unless_asked(tmp_path, llama, capsys):
    """Issue 23, item 7: it only warned, and wrote a folder that uptraining, evaluation and generation refuse."""
    before = _digest(llama)
    assert convert_main([str(llama), str(tmp_path / "mor"), "--num-recursions", "3"]) == 2
    assert _one_error_line(capsys) == (
        f"error: SOURCE {llama} has no tokenizer (no tokenizer.json, tokenizer_config.json or tokenizer.model); the "
        f"MoR folder needs it to be uptrained, evaluated or to generate text. Fix: save the source model's tokenizer "
        f"next to its weights, or pass --no-tokenizer to write the folder without one (and add it later).")
    assert [path.name for path in tmp_path.iterdir()] == ["llama"]
    assert _digest(llama) == before
    assert convert_main([str(llama), str(tmp_path / "mor"), "--num-recursions", "3", "--no-tokenizer"]) == 0
    assert not list((tmp_path / "mor").glob("tokenizer*"))

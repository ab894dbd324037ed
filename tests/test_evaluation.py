"""Offline evaluation: the metric modules in metrics/, evaluation/core.py and examples/evaluate_model.py.

Every number is checked against an independent computation with plain torch. The models are tiny (a random MoR of
hidden size 32 with mixed routing, and the real stories260K checkpoint) and the inputs are a few hundred tokens, so
that the whole file runs in seconds on a shared CPU.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from evaluation import (
    check_supported_checkpoint,
    collect_recursion_depths,
    fewshot_prompt,
    load_model_and_tokenizer,
    load_multiple_choice_items,
    load_text,
    multiple_choice_accuracy,
    routing_statistics,
    summarize_recursion_depths,
    text_file_perplexity,
)
from evaluation import core
from conversion.measure import format_depth_histogram
from modeling_mor import MoRForCausalLM

from conftest import (
    STORIES_DIR,
    TINYSTORIES_VALID,
    edited_model_copy,
    mixed_routing_model,
    tiny_mor_config,
    with_config_fields,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
MC_FILE = REPO_ROOT / "examples" / "data" / "tiny_stories_mc.jsonl"
SAMPLE_TEXT = REPO_ROOT / "examples" / "data" / "tiny_stories_sample.txt"


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These models are tiny: a second thread buys nothing, and on a shared machine its synchronisation costs up to
    100x per forward pass."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mixed_mor_dir(tmp_path_factory):
    """A tiny random MoR (vocab 512, so that it takes the stories tokenizer) whose routers send tokens to every
    depth, saved with the stories260K tokenizer."""
    torch.manual_seed(0)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(vocab_size=512, max_position_embeddings=512))).eval()
    folder = tmp_path_factory.mktemp("mixed_mor")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted_mor_dir(tmp_path_factory):
    """stories260K converted to MoR (middle_cycle, N_r = 3), as conversion/ produces it, with its tokenizer."""
    from transformers import LlamaForCausalLM

    from conversion.convert_llama_to_mor import convert_llama_to_mor

    llama = LlamaForCausalLM.from_pretrained(STORIES_DIR)
    folder = tmp_path_factory.mktemp("converted_mor")
    convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle").save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eval_text_file():
    """Real TinyStories validation text (the sample shipped in examples/assets)."""
    return TINYSTORIES_VALID


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_model", REPO_ROOT / "examples" / "evaluate_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Direct computations with plain torch, written independently of metrics/ and evaluation/
# ---------------------------------------------------------------------------------------------------------------


def direct_sliding_window_nll(model, token_ids, max_length, stride):
    """Summed NLL and count of tokens 1..n-1, each scored in the first window (start k * stride, length max_length)
    that contains it with some context: window k = max(0, floor((t - max_length) / stride) + 1)."""
    num_tokens = len(token_ids)
    total_nll, count = 0.0, 0
    window = 0
    while True:
        begin = window * stride
        end = min(begin + max_length, num_tokens)
        with torch.no_grad():
            logits = model(torch.tensor([token_ids[begin:end]])).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        for target in range(begin + 1, end):
            if max(0, (target - max_length) // stride + 1) == window:
                total_nll -= log_probs[target - begin - 1, token_ids[target]].item()
                count += 1
        if end == num_tokens:
            return total_nll, count
        window += 1


def direct_text_nll(model, token_ids):
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -sum(log_probs[position - 1, token_ids[position]].item() for position in range(1, len(token_ids)))


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mixed_mor", "converted_mor", "llama"])
def test_text_file_perplexity_equals_direct_sliding_window(which, request, eval_text_file):
    folder = {
        "mixed_mor": lambda: request.getfixturevalue("mixed_mor_dir"),
        "converted_mor": lambda: request.getfixturevalue("converted_mor_dir"),
        "llama": lambda: STORIES_DIR,
    }[which]()
    max_tokens, max_length, stride = 150, 64, 24
    result = text_file_perplexity(
        folder, eval_text_file, max_tokens=max_tokens, max_length=max_length, stride=stride, batch_size=3
    )

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = load_text(eval_text_file, tokenizer, max_tokens)
    token_ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(token_ids) == max_tokens + 1
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    total_nll, count = direct_sliding_window_nll(model, token_ids, max_length, stride)

    assert result["num_tokens"] == count == max_tokens
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / count), rel=1e-5)
    assert result["metric"] == "local:metrics/perplexity"


def test_perplexity_metric_hub_interface_per_text(mixed_mor_dir):
    """The Hub's interface: several texts, batched with padding, truncated to max_length, with or without BOS."""
    perplexity = evaluate.load(str(REPO_ROOT / "metrics" / "perplexity"))
    texts = [
        "Once upon a time there was a little cat.",
        "Tom liked to play with his red ball in the park every day, and his dog ran after it.",
        "Lily smiled.",
    ]
    tokenizer = AutoTokenizer.from_pretrained(mixed_mor_dir)
    model = AutoModelForCausalLM.from_pretrained(mixed_mor_dir, trust_remote_code=True).eval()
    for add_start_token in (True, False):
        results = perplexity.compute(
            predictions=texts,
            model_id=str(mixed_mor_dir),
            batch_size=2,
            add_start_token=add_start_token,
            max_length=12,
            device="cpu",
            trust_remote_code=True,
        )
        expected = []
        for text in texts:
            token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            token_ids = ([tokenizer.bos_token_id] if add_start_token else []) + token_ids
            token_ids = token_ids[:12]
            expected.append(math.exp(direct_text_nll(model, token_ids) / (len(token_ids) - 1)))
        assert results["perplexities"] == pytest.approx(expected, rel=1e-5)
        assert results["mean_perplexity"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_window_rules_agree_and_score_every_token_once():
    """evaluation/core.py keeps a copy of the metric's window rule (the metric module must stay self-contained)."""
    metric_file = REPO_ROOT / "metrics" / "perplexity" / "perplexity.py"
    spec = importlib.util.spec_from_file_location("perplexity_metric", metric_file)
    metric_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metric_module)
    for num_tokens in (1, 2, 7, 16, 17, 50, 101):
        for max_length, stride in ((16, 1), (16, 8), (16, 15), (5, 3)):
            windows = core.sliding_windows(num_tokens, max_length, stride)
            assert windows == metric_module.sliding_windows(num_tokens, max_length, stride)
            scored = [t for begin, end, first in windows for t in range(first, end)]
            assert scored == list(range(1, num_tokens))
            assert all(end - begin <= max_length and begin < first for begin, end, first in windows)


def test_perplexity_metric_rejects_bad_stride(mixed_mor_dir):
    perplexity = evaluate.load(str(REPO_ROOT / "metrics" / "perplexity"))
    with pytest.raises(ValueError, match="stride=16 is not valid for max_length=16"):
        perplexity.compute(predictions=["a b c"], model_id=str(mixed_mor_dir), max_length=16, stride=16)


def test_hub_metric_source_uses_hub_names_and_hub_interface(monkeypatch, mixed_mor_dir):
    """--metric-source hub asks evaluate for "perplexity"/"accuracy" by name and passes only the Hub's arguments.
    The Hub is unreachable here, so the project's modules stand in for the Hub's ones."""
    real_load = evaluate.load
    requested = []

    class HubInterfaceOnly:
        """Rejects the arguments that only the project's perplexity module accepts."""

        def __init__(self, module):
            self.module = module

        def compute(self, **kwargs):
            assert not {"stride", "trust_remote_code"} & set(kwargs), kwargs
            return self.module.compute(**kwargs)

    def fake_load(path, *args, **kwargs):
        requested.append(path)
        local = {"perplexity": "perplexity", "accuracy": "multiple_choice_accuracy"}[path]
        return HubInterfaceOnly(real_load(str(REPO_ROOT / "metrics" / local)))

    monkeypatch.setattr(evaluate, "load", fake_load)
    result = text_file_perplexity(
        mixed_mor_dir, SAMPLE_TEXT, max_tokens=60, max_length=24, stride=8, batch_size=2, metric_source="hub"
    )
    assert requested == ["perplexity"]
    assert result["metric"] == "hub:perplexity" and result["stride"] is None

    # The Hub metric sees pieces of max_length - 1 tokens, each with its own BOS; the result is their token-weighted
    # combination, that is exp(total NLL / total tokens) over the pieces.
    tokenizer = AutoTokenizer.from_pretrained(mixed_mor_dir)
    model = AutoModelForCausalLM.from_pretrained(mixed_mor_dir, trust_remote_code=True).eval()
    text = load_text(SAMPLE_TEXT, tokenizer, 60)
    pieces = core.split_text_for_hub_metric(text, tokenizer, 23)
    total_nll, count = 0.0, 0
    for piece in pieces:
        token_ids = [tokenizer.bos_token_id] + tokenizer(piece, add_special_tokens=False)["input_ids"][:23]
        total_nll += direct_text_nll(model, token_ids)
        count += len(token_ids) - 1
    assert result["num_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / count), rel=1e-5)


def test_unreachable_hub_metric_says_what_to_do(monkeypatch):
    def offline_load(path, *args, **kwargs):
        raise FileNotFoundError(f"Couldn't find a module script for {path}")

    monkeypatch.setattr(evaluate, "load", offline_load)
    with pytest.raises(RuntimeError, match="metric_source='local'"):
        core.load_metric("perplexity", "hub")


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------


def test_accuracy_metric_equals_direct_count():
    accuracy = evaluate.load(str(REPO_ROOT / "metrics" / "multiple_choice_accuracy"))
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 4, (57,), generator=generator).tolist()
    references = torch.randint(0, 4, (57,), generator=generator).tolist()
    correct = sum(prediction == reference for prediction, reference in zip(predictions, references))
    assert accuracy.compute(predictions=predictions, references=references) == {"accuracy": correct / 57}
    assert accuracy.compute(predictions=predictions, references=references, normalize=False) == {
        "accuracy": float(correct)
    }
    weights = [1.0 + index % 3 for index in range(57)]
    weighted = sum(w for p, r, w in zip(predictions, references, weights) if p == r) / sum(weights)
    result = accuracy.compute(predictions=predictions, references=references, sample_weight=weights)
    assert result["accuracy"] == pytest.approx(weighted)


def test_example_multiple_choice_file_is_well_formed():
    items = load_multiple_choice_items(MC_FILE)
    assert len(items) == 40
    assert all(len(item["choices"]) == 4 for item in items)
    assert sorted(item["answer"] for item in items) == sorted([0, 1, 2, 3] * 10)
    prompt = fewshot_prompt(items, 1, num_fewshot=2)
    # The examples are the first items other than the one asked, each with its answer.
    assert prompt.startswith(items[0]["context"] + "\nQuestion: " + items[0]["question"] + "\nAnswer: red\n\n")
    assert "\nAnswer: It was raining.\n\n" in prompt
    assert prompt.endswith(items[1]["context"] + "\nQuestion: What did Tom eat?\nAnswer:")


def test_fewshot_accuracy_equals_direct_loglikelihood_argmax(tmp_path, mixed_mor_dir):
    items = load_multiple_choice_items(MC_FILE)[:6]
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(item) + "\n" for item in items))
    model, tokenizer = load_model_and_tokenizer(str(mixed_mor_dir))
    result = multiple_choice_accuracy(model, tokenizer, mc_file, num_fewshot=2, batch_size=5, show_progress=False)

    # Directly: one unpadded forward per choice; the choice's tokens are those after the prompt's tokens.
    predictions = []
    for index, item in enumerate(items):
        prompt = fewshot_prompt(items, index, 2)
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole_ids = tokenizer(prompt + " " + choice, add_special_tokens=False)["input_ids"]
            whole_ids = [tokenizer.bos_token_id] + whole_ids
            assert whole_ids[: len(prompt_ids)] == prompt_ids
            with torch.no_grad():
                log_probs = F.log_softmax(model(torch.tensor([whole_ids])).logits[0].double(), dim=-1)
            scores.append(sum(log_probs[t - 1, whole_ids[t]].item() for t in range(len(prompt_ids), len(whole_ids))))
        predictions.append(max(range(4), key=lambda choice_index: scores[choice_index]))
    correct = sum(prediction == item["answer"] for prediction, item in zip(predictions, items))

    assert result["predictions"] == predictions
    assert result["accuracy"] == correct / len(items)
    assert result["num_items"] == 6 and result["num_fewshot"] == 2 and result["chance_accuracy"] == 0.25


# ---------------------------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------------------------


def test_routing_summary_matches_hand_computation():
    # L = 8, middle_cycle, N_r = 3: B = (8 - 2) / 3 = 2 shared layers.
    config = tiny_mor_config()
    depths = torch.tensor([1, 1, 2, 3, 3, 3, 1, 2])
    summary = summarize_recursion_depths(depths, config)
    assert summary["mean_depth"] == 2.0  # 16 / 8
    assert summary["depth_histogram"] == {1: 3, 2: 2, 3: 3}  # no depth 0: every real token takes a step
    assert summary["block_size"] == 2 and summary["unshared_end_layers"] == 2
    assert summary["block_compute_saved"] == pytest.approx(1 - 2.0 / 3)
    # Per token 2 + 2 * 2 = 6 of 8 layer applications: 2 / 8 saved.
    assert summary["model_compute_saved"] == pytest.approx(0.25)

    cycle_config = tiny_mor_config(sharing_strategy="cycle", num_hidden_layers=9)
    cycle = summarize_recursion_depths(torch.tensor([3, 3, 1]), cycle_config)
    # B = 9 / 3 = 3, mean depth 7/3: 3 * (3 - 7/3) / 9 = 2/9 of the model saved.
    assert cycle["model_compute_saved"] == pytest.approx(2 / 9)
    assert cycle["block_compute_saved"] == pytest.approx(2 / 9)


def test_depth_histograms_print_alike_whatever_their_keys():
    """Issue 18, item 7: {'3': 16384} (a card's JSON), {0: 0, 1: 0, ...} (evaluation) and {1: 9, ...} are one format."""
    assert format_depth_histogram({"3": 16384}) == "{3: 16384}"
    assert format_depth_histogram({0: 0, 1: 9, 2: 0, 3: 4}) == "{1: 9, 2: 0, 3: 4}"
    assert format_depth_histogram({"10": 1, "2": 5}) == "{2: 5, 10: 1}"  # by depth, not as text


def test_routing_statistics_match_model_depths(mixed_mor_dir):
    model, tokenizer = load_model_and_tokenizer(str(mixed_mor_dir))
    statistics = routing_statistics(model, tokenizer, SAMPLE_TEXT, max_tokens=40, max_length=64, stride=32)

    # One window holds all 41 tokens: the depths are those of one plain forward pass.
    text = load_text(SAMPLE_TEXT, tokenizer, 40)
    token_ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        depths = model(torch.tensor([token_ids]), output_recursion_depth=True).recursion_depth[0]
    assert len(set(depths.tolist())) > 1, "the fixture should route tokens to different depths"
    assert statistics["num_tokens"] == 41
    assert statistics["mean_depth"] == pytest.approx(depths.double().mean().item())
    assert statistics["depth_histogram"] == {d: int((depths == d).sum()) for d in range(1, 4)}
    assert statistics["block_compute_saved"] == pytest.approx(1 - depths.double().mean().item() / 3)
    assert statistics["model_compute_saved"] == pytest.approx(2 * (3 - depths.double().mean().item()) / 8)


def test_recursion_depths_count_every_token_once_across_windows(mixed_mor_dir):
    model = AutoModelForCausalLM.from_pretrained(mixed_mor_dir, trust_remote_code=True).eval()
    token_ids = torch.randint(3, 512, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    depths = collect_recursion_depths(model, token_ids, max_length=20, stride=8, batch_size=2, show_progress=False)
    assert depths.shape == (50,)
    # Token t is counted from the first window that scores it: window k = max(0, floor((t - 20) / 8) + 1).
    for position in (0, 19, 20, 27, 28, 49):
        window = max(0, (position - 20) // 8 + 1)
        begin = window * 8
        with torch.no_grad():
            window_depths = model(torch.tensor([token_ids[begin : begin + 20]]), output_recursion_depth=True)
        assert depths[position] == window_depths.recursion_depth[0, position - begin]


def test_llama_has_no_routing_statistics():
    model, tokenizer = load_model_and_tokenizer(str(STORIES_DIR))
    assert routing_statistics(model, tokenizer, SAMPLE_TEXT, max_tokens=10) is None


# ---------------------------------------------------------------------------------------------------------------
# Unsupported checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_gpt2_folder_is_rejected_before_loading(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)  # config only: loading weights would fail
    for call in (
        lambda: check_supported_checkpoint(str(tmp_path)),
        lambda: load_model_and_tokenizer(str(tmp_path)),
        lambda: text_file_perplexity(tmp_path, SAMPLE_TEXT, max_tokens=10),
    ):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert "'gpt2' checkpoint" in message
        assert "'mor'" in message and "'llama'" in message


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"no config.json.*notes.txt.*model_type 'mor'.*model_type 'llama'"):
        load_model_and_tokenizer(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter"):
        check_supported_checkpoint(str(tmp_path))


def test_supported_folders_are_accepted(mixed_mor_dir):
    assert check_supported_checkpoint(str(mixed_mor_dir)) == "mor"
    assert check_supported_checkpoint(str(STORIES_DIR)) == "llama"


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_help(capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.build_argument_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--eval-file", "--mc-file", "--num-fewshot", "--max-tokens", "--batch-size", "--metric-source",
                   "--output-json"):
        assert option in help_text


def test_cli_end_to_end(tmp_path, capsys, converted_mor_dir, eval_text_file):
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(line + "\n" for line in MC_FILE.read_text().splitlines()[:4]))
    output_json = tmp_path / "results.json"
    cli = load_cli()
    results = cli.main(
        [
            str(converted_mor_dir),
            "--eval-file", str(eval_text_file),
            "--mc-file", str(mc_file),
            "--num-fewshot", "1",
            "--max-tokens", "80",
            "--max-length", "48",
            "--stride", "16",
            "--batch-size", "4",
            "--device", "cpu",
            "--output-json", str(output_json),
        ]
    )
    printed = capsys.readouterr().out
    saved = json.loads(output_json.read_text())
    perplexity = results["perplexity"]["perplexity"]
    assert math.isfinite(perplexity) and perplexity > 1
    assert f"Perplexity: {perplexity:.4f} over 80 tokens" in printed
    assert f"1-shot multiple choice: accuracy {results['multiple_choice']['accuracy']:.4f}" in printed
    routing = results["routing"]
    assert sum(routing["depth_histogram"].values()) == 81  # the 80 tokens and the BOS token
    assert f"Routing: mean depth {routing['mean_depth']:.4f} of 3 over 81 tokens" in printed
    # Printed as every command line prints a depth histogram (issue 18, item 7; it showed an impossible depth 0).
    assert f"tokens per depth {format_depth_histogram(routing['depth_histogram'])}" in printed and "{0:" not in printed
    # stories260K has L = 5 layers: B = (5 - 2) / 3 = 1 shared layer.
    block_saved, model_saved = 1 - routing["mean_depth"] / 3, (3 - routing["mean_depth"]) / 5
    assert f"recursion block {100 * block_saved:.2f}%, whole model {100 * model_saved:.2f}%" in printed
    assert saved["perplexity"]["perplexity"] == pytest.approx(perplexity)
    assert saved["multiple_choice"]["num_items"] == 4
    assert saved["routing"]["mean_depth"] == pytest.approx(routing["mean_depth"])


def run_cli(*arguments):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "evaluate_model.py"), *map(str, arguments), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        # Issue 18, item 6: was "Unterminated string ..." without the file's name.
        (lambda text: text[:100], "truncated/config.json is not a valid JSON file ("),
        # Issue 18, item 6: was transformers' load report, then a RuntimeError.
        (with_config_fields(num_hidden_layers=6), "config.json does not match the weights next to it (9 tensor(s) it "
                                                  "needs are not in the weights (e.g. model.layers.5."),
    ],
    ids=["truncated", "not fitting the weights"],
)
def test_cli_refuses_a_broken_config_json_in_one_line(tmp_path, capsys, monkeypatch, edit, expected):
    folder = edited_model_copy(STORIES_DIR, tmp_path / "truncated", edit)
    cli = load_cli()
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(folder), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and expected in error


def test_cli_without_evaluate_names_the_extra_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # `import evaluate` fails, as after a plain `pip install -e .`
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main([str(STORIES_DIR), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and 'pip install "mor-transformers[eval]"' in error


def test_cli_rejects_unsupported_folder(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main([str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "'gpt2' checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "problem",
    ["no_config", "gpt2", "missing", "a_file", "bad_eval_file", "bad_mc_file", "blank_eval_file", "corrupt_weights",
     "config_only", "no_tokenizer", "output_json_folder", "output_json_missing_folder", "unreachable_hub_id",
     "hub_metrics_offline"],
)
def test_cli_bad_input_is_one_error_line(tmp_path, problem):
    import shutil

    folder, extra = tmp_path / "folder", []
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    if problem == "corrupt_weights":
        folder = Path(shutil.copytree(STORIES_DIR, tmp_path / "corrupt"))
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    elif problem == "config_only":
        shutil.copyfile(STORIES_DIR / "config.json", folder / "config.json")
    elif problem == "no_tokenizer":
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(STORIES_DIR / name, folder / name)
    elif problem in ("output_json_folder", "output_json_missing_folder"):
        extra = ["--output-json", tmp_path if problem == "output_json_folder" else tmp_path / "no-such" / "r.json"]
        folder = STORIES_DIR
    elif problem == "hub_metrics_offline":  # issue 23, item 6: a traceback after the model had run
        folder, extra = STORIES_DIR, ["--metric-source", "hub"]
    elif problem == "unreachable_hub_id":
        folder = "someone/some-model"  # HF_HUB_OFFLINE=1 in run_cli
    elif problem == "blank_eval_file":
        folder = STORIES_DIR
        (tmp_path / "blank.txt").write_text("  \n")
        extra = ["--eval-file", tmp_path / "blank.txt"]
    elif problem == "gpt2":
        GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)

    elif problem == "missing":
        folder = tmp_path / "outputs" / "no-such-model"
    elif problem == "a_file":
        folder = folder / "notes.txt"
    elif problem in ("bad_eval_file", "bad_mc_file"):
        folder = STORIES_DIR
        bad_file = tmp_path / "bad.txt"
        bad_file.write_bytes(b"\xff\xfe not utf-8")
        extra = ["--eval-file" if problem == "bad_eval_file" else "--mc-file", bad_file]
    result = run_cli(folder, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    expected = {
        "no_config": "no config.json", "gpt2": "'gpt2' checkpoint", "missing": "does not exist",
        "a_file": "is a file", "bad_eval_file": "not UTF-8", "bad_mc_file": "not UTF-8",
        "blank_eval_file": "--eval-file " + str(tmp_path / "blank.txt") + " has no text",
        "corrupt_weights": "model.safetensors is not a readable safetensors file",
        "config_only": "no model weights", "no_tokenizer": f"{tmp_path / 'folder'} has no tokenizer (no tokenizer.json",
        "output_json_folder": f"--output-json {tmp_path} is a folder",
        "output_json_missing_folder": f"the folder {tmp_path / 'no-such'} does not exist",
        "unreachable_hub_id": "the Hub could not be reached",
        "hub_metrics_offline": "error: --metric-source hub: the Hub's 'perplexity' metric could not be loaded (",
    }[problem]
    assert expected in lines[0]
    assert result.stdout == ""  # refused before anything was loaded or printed

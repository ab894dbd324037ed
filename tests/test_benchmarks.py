"""The benchmark scripts' ideal ratios, and that the scripts run end to end (tiny sizes; their numbers are not
checked here: timing belongs in the scripts, not in tests)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from modeling_mor import MoRConfig

from conftest import TINY_DIMS


PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = PROJECT_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import matmul_flop_ratio, weight_pass_ratio  # noqa: E402


def _configs():
    vanilla = LlamaConfig(**TINY_DIMS, num_hidden_layers=14)
    mor = MoRConfig(**TINY_DIMS, num_hidden_layers=14, num_recursions=3, sharing_strategy="middle_cycle")
    return vanilla, mor


def test_weight_pass_ratio_counts_the_deepest_token_of_each_decode_step():
    vanilla, mor = _configs()
    one_row = torch.tensor([[1, 2, 3, 1, 1, 2]])
    # Batch 1: every step runs exactly the token's depth, so both ideals agree.
    assert abs(weight_pass_ratio(vanilla, mor, one_row) - matmul_flop_ratio(vanilla, mor, one_row)) < 1e-12
    # A batch where some row's token takes step 3 at every decode step pays for the full depth every time.
    batch = torch.tensor([[1, 1, 1, 1], [3, 3, 3, 3], [1, 2, 1, 1]])
    assert abs(weight_pass_ratio(vanilla, mor, batch) - 1.0) < 1e-12
    assert matmul_flop_ratio(vanilla, mor, batch) > 1.3


def run_benchmark(script: str, *arguments) -> subprocess.CompletedProcess:
    """A benchmark script on this checkout's code (a script's folder, not the working directory, is on its path, so
    it would import an installed copy of the package otherwise)."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *map(str, arguments)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )


TINY_DECODE = ["--batch-sizes", "1", "3", "--prompt-len", "6", "--new-tokens", "4", "--repeats", "1", "--hidden-size",
               "32", "--num-heads", "4", "--num-kv-heads", "2", "--num-layers", "8", "--vocab-size", "97"]
DECODE_MODELS = ("vanilla Llama", "vanilla Llama, StaticCache", "MoR routing=none", "MoR expert, recursion-wise",
                 "MoR expert, shared KV")


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_decode_benchmark_runs(mode):
    result = run_benchmark("decode_throughput.py", *TINY_DECODE, "--mode", mode)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("vanilla", "MoR"))]
    assert [row[:28].strip() for row in rows] == list(DECODE_MODELS) * 2, result.stdout


def test_decode_benchmark_times_another_version_of_the_code_in_the_same_rounds(tmp_path):
    shutil.copytree(PROJECT_ROOT / "modeling_mor", tmp_path / "modeling_mor")
    result = run_benchmark("decode_throughput.py", *TINY_DECODE, "--baseline-code", tmp_path)
    assert result.returncode == 0, result.stderr
    twins = [f"{name} [baseline code]" for name in DECODE_MODELS[2:]]
    rows = [line for line in result.stdout.splitlines()
            if line.startswith(("vanilla", "MoR")) and "the speed of the baseline code" not in line]
    assert [row[:44].strip() for row in rows] == (list(DECODE_MODELS) + twins) * 2, result.stdout
    speed_lines = [line for line in result.stdout.splitlines() if "the speed of the baseline code" in line]
    assert len(speed_lines) == 2 * len(twins), result.stdout


def test_train_benchmark_runs():
    result = run_benchmark(
        "train_throughput.py", "--batch-size", "2", "--seq-len", "8", "--steps", "1", "--hidden-size", "32",
        "--num-heads", "4", "--num-kv-heads", "2", "--num-layers", "8", "--vocab-size", "97",
    )
    assert result.returncode == 0, result.stderr
    assert "MoR expert-choice" in result.stdout, result.stdout


def test_serving_benchmark_runs_and_the_engine_matches_generate():
    result = run_benchmark(
        "serving_throughput.py", "--num-requests", "5", "--min-prompt", "3", "--max-prompt", "9", "--new-tokens", "4",
        "--slots", "2", "3", "--page-size", "4", "--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2",
        "--num-layers", "8", "--vocab-size", "97", "--check",
    )
    assert result.returncode == 0, result.stderr
    assert "differ from generate()" not in result.stdout, result.stdout
    table = result.stdout.split("\nmodel")[1].split("\n\n")[0].splitlines()[1:]
    modes = [(row[:28].strip(), row[28:52].strip()) for row in table]
    assert modes == [
        ("vanilla Llama", "generate() x16"), ("vanilla Llama", "generate_batch, 3 slots"),
        *[(name, mode) for name in ("MoR routing=none", "MoR expert, recursion-wise", "MoR expert, shared KV")
          for mode in ("generate() x16", "engine, 2 slots", "engine, 3 slots")],
    ], result.stdout
    assert "block_pass_layers" in result.stdout and "attention_kv_paging" in result.stdout and "/ideal" in result.stdout


def test_wikitext_is_detokenized_into_plain_english():
    from conversion.text_files import detokenize_wikitext

    tokenized = (' = Homarus gammarus = \n \n It may grow to 60 @-@ cm ( 24 in ) , 1 @,@ 000 or 0 @.@ 7 kg ; H. americanus '
                 '\'s claws are " lobster red " . It isn \'t <unk> ! \n \n = = Description = = \n')
    assert detokenize_wikitext(tokenized) == (
        '= Homarus gammarus =\n\nIt may grow to 60-cm (24 in), 1,000 or 0.7 kg; H. americanus\'s claws are "lobster '
        'red". It isn\'t <unk>!\n\n== Description ==\n'
    )


def test_conversion_recipe_runs_end_to_end(tmp_path):
    """benchmarks/conversion_recipe.py on stories260K with a small word-level WikiText-style text: one JSON line per
    measured model, the source's perplexity on the same tokens, the final model loadable in OUTPUT_DIR."""
    import json

    wikitext = tmp_path / "wikitext"
    wikitext.mkdir()
    story = (PROJECT_ROOT / "examples" / "assets" / "tinystories_valid_sample.txt").read_text()[:20000]
    for split in ("valid", "test"):
        (wikitext / f"{split}.txt").write_text(story.replace(",", " ,").replace(".", " ."))
    output = tmp_path / "recipe"
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", output, "--minutes", "0.8", "--num-recursions", "3", "--threads", "1",
                           "--wikitext-dir", wikitext, "--eval-tokens", "512", "--curve-tokens", "256",
                           "--eval-steps", "5", "--relaxation-rank", "0", "--learning-rate", "3e-3",
                           "--capacity", "1.0", "0.6", "0.3", "--random-capacity", "0.2",
                           "--thresholds", "0.9", "--layer-budget", "0.85")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (output / "conversion_recipe.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["source", "converted", "uptrained", "uptrained, router_threshold 0.9"]
    source, converted, uptrained, stricter = rows
    if uptrained["router_threshold"] <= 0.9:
        assert stricter["mean_depth"] <= uptrained["mean_depth"]
    else:
        assert stricter["mean_depth"] >= uptrained["mean_depth"]
    assert source["layer_applications"] == 5.0 and converted["mean_depth"] == 3.0
    # The source and the final model answer the evaluation package's multiple-choice questions.
    assert all(0.0 <= row["mc_accuracy"] <= 1.0 for row in (source, uptrained)) and "mc_accuracy" not in converted
    for row in (converted, uptrained):
        for text in ("wikitext2_test", "tinystories_valid"):
            assert row[f"vs_source_{text}"] == pytest.approx(row[f"perplexity_{text}"] / source[f"perplexity_{text}"],
                                                             rel=1e-2)
    # middle_cycle with a block of one layer: the two end layers plus one layer per recursion step taken.
    assert uptrained["layer_applications"] == pytest.approx(2 + uptrained["mean_depth"], abs=0.01)
    assert uptrained["parameters_vs_source"] < 0.7
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["stopped_by"] == "time budget"
    # --layer-budget: the saved threshold keeps the training text within 0.85 of the source's layer applications, the
    # final row is measured at it, and the card says so.
    calibration = summary["router_calibration"]
    assert calibration["layer_fraction"] <= 0.85 and uptrained["router_threshold"] == pytest.approx(
        calibration["router_threshold"], abs=1e-4)
    assert "`--layer-budget 0.85`" in (output / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert "refused" not in result.stderr


@pytest.mark.parametrize("num_recursions", [2, 4, 7, 14])
def test_recipe_training_capacities_spend_the_layer_budget(num_recursions):
    """The recipe's default training capacities for --layer-budget 0.75: a conversion of a 30-layer source
    (SmolLM2-135M's depth) routed at them as training routes (expert-choice top-k) takes 0.75x the source's layer
    applications per token, counted by `conversion.flops.layer_applications` from the depths the model took. (Tied
    layers: a tiny model's per-step norm weights would add 0.7% to a full-rank step, 0.01% in SmolLM2.)"""
    from conftest import tiny_llama
    from conversion.convert_llama_to_mor import convert_llama_to_mor
    from conversion.flops import layer_applications
    from conversion_recipe import capacities_for_layer_budget

    capacities = capacities_for_layer_budget(30, num_recursions, "middle_cycle", 0.75)
    assert capacities[0] == 1.0 and capacities == sorted(capacities, reverse=True) and capacities[-1] > 0
    mor = convert_llama_to_mor(tiny_llama(num_hidden_layers=30), num_recursions=num_recursions,
                               sharing_strategy="middle_cycle", capacity=capacities).train()
    seq_len = TINY_DIMS["max_position_embeddings"]
    tokens = torch.randint(0, TINY_DIMS["vocab_size"], (2, seq_len))
    with torch.no_grad():
        depths = mor(tokens, output_recursion_depth=True).recursion_depth
    fraction = layer_applications(mor, depths.float().mean().item()) / 30
    # Top-k rounds each step's k = capacity x seq_len up: at most one token more per step, a block's layers each.
    assert 0.75 - 1e-3 <= fraction <= 0.75 + 28 / (30 * seq_len) + 1e-3


def test_recipe_refuses_a_layer_budget_its_training_capacities_cannot_spend(tmp_path):
    """--layer-budget 0.3 of stories260K's 5 layers is less than its end layers and one recursion step take: one line
    naming the fix, nothing left behind."""
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--no-mc", "--num-recursions", "3",
                           "--layer-budget", "0.3", "--threads", "1")
    assert result.returncode == 2 and result.stderr.startswith("error: --layer-budget 0.3 is below what every token")
    assert "Fix: give a larger --layer-budget." in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_recipe_training_capacities_refuse_what_a_linear_ramp_cannot_spend():
    """Between one step's cost and half the block: capacities from 1.0 exist, but not a linear ramp; the error says
    --capacity. At or below one step's cost nothing can: the error says a larger budget."""
    from conversion_recipe import capacities_for_layer_budget

    with pytest.raises(ValueError, match="Fix: give --capacity"):
        capacities_for_layer_budget(30, 4, "middle_cycle", 0.4)  # mean capacity 0.36, one step 0.25
    with pytest.raises(ValueError, match="Fix: give a larger --layer-budget"):
        capacities_for_layer_budget(30, 4, "middle_cycle", 0.3)  # 9 of 30 layers: just one step
    assert capacities_for_layer_budget(30, 3, "middle_cycle", 0.75) is None  # 28 layers do not fit N_r = 3
    assert capacities_for_layer_budget(30, 2, "cycle", 1.0) == [1.0, 1.0]


def test_conversion_recipe_refuses_a_missing_question_file_before_any_work(tmp_path):
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--mc-file", tmp_path / "missing.jsonl")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "missing.jsonl" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_conversion_recipe_refuses_a_block_wise_stage_it_cannot_run_before_any_work(tmp_path):
    """--block-wise-fraction on a layout whose deeper steps read step 1's keys (shared KV) is refused as mor-uptrain
    would refuse it, but before the source is measured and converted."""
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--kv-cache-policy", "shared",
                           "--block-wise-fraction", "0.2")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "--kv-cache-policy shared a deeper step reads step 1's keys" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_recipe_refuses_a_router_fit_time_without_a_fit(tmp_path):
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--no-mc", "--num-recursions", "3",
                           "--router-fit-tokens", "0", "--router-fit-at", "0.3", "--threads", "1")
    assert result.returncode == 2 and result.stderr.startswith("error: --router-fit-at 0.3 says when")
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_recipe_refuses_a_router_fit_for_a_conversion_that_decides_nothing(tmp_path):
    """An explicit fit is refused before any work where every token takes every step (the default fit is then off,
    said in one line, as in the fewer-parameters recipe at full depth)."""
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--no-mc", "--num-recursions", "3",
                           "--capacity", "1.0", "1.0", "1.0", "--no-layer-budget", "--router-fit-tokens", "256",
                           "--threads", "1")
    assert result.returncode == 2 and "this conversion has none (every --capacity is 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_recipe_refuses_a_search_init_at_full_rank_before_any_work(tmp_path):
    result = run_benchmark("conversion_recipe.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--output-dir", tmp_path / "recipe", "--no-wikitext", "--no-mc", "--num-recursions", "3",
                           "--init-strategy", "search", "--threads", "1")
    assert result.returncode == 2 and "--init-strategy search chooses the source layer" in result.stderr
    assert "--relaxation-rank 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_conversion_quality_study_runs_with_the_layer_study_and_the_search_init(tmp_path):
    """The init-strategy study runs end to end on stories260K: each source layer repeated and skipped, and every init
    strategy including the search (a smoke test: with one shared layer the search is the best uniform choice; its
    descent is tested in test_conversion.py)."""
    import json

    text = PROJECT_ROOT / "examples" / "assets" / "tinystories_valid_sample.txt"
    result = run_benchmark("conversion_quality.py", PROJECT_ROOT / "examples" / "assets" / "stories260K",
                           "--eval-file", text, "--eval-tokens", "2048", "--layouts", "middle_cycle:3",
                           "--layer-study", "--calibration-file", text, "--threads", "1",
                           "--json", tmp_path / "rows.json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["layer"] for row in rows["layer_study"]] == [1, 2, 3, 4]
    assert all(row["ppl_skipped"] > 0 and row["ppl_repeated_previous"] > 0 for row in rows["layer_study"])
    by_init = {row["init"]: row["ppl_full_depth"] for row in rows["rows"]}
    assert set(by_init) == {"stepwise", "average", "lower", "upper", "random", "search"}
    # Scored on the same 2,048 tokens here, so the search is the best of the uniform choices.
    assert by_init["search"] <= min(by_init["lower"], by_init["upper"]) * (1 + 1e-5)
    assert "Each source layer with the previous layer's weights in its place" in result.stdout

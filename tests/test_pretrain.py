"""Pretraining from scratch (conversion/pretrain.py on uptraining's Trainer path): the FLOP count against a hand count
from recursion depths, the FLOP budget stopping at the right count for routed and unrouted models, bad input, a
fresh MoR learning causal eval routing near its capacities, and the equal-compute benchmark's --quick run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion import pretrain
from conversion.flops import FlopCounter
from conversion.measure import perplexity_and_depths, read_eval_tokens
from conversion.output_dir import check_output_dir
from modeling_mor import MoRConfig, MoRForCausalLM

from conftest import STORIES_DIR, TINYSTORIES_TRAIN, TINYSTORIES_VALID, last_log_history, one_error_line


PROJECT_ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=8, max_position_embeddings=128)


# ---------------------------------------------------------------------------------------------------------------------
# The hand count: parameters from the config's dimensions (not from the modules), and a loop over tokens.

def layer_parameters(dims, with_key_value=True):
    hidden, head_dim = dims["hidden_size"], dims["hidden_size"] // dims["num_attention_heads"]
    query = output = hidden * dims["num_attention_heads"] * head_dim
    key_value = 2 * hidden * dims["num_key_value_heads"] * head_dim if with_key_value else 0
    return query + key_value + output + 3 * hidden * dims["intermediate_size"] + 2 * hidden  # + the two RMSNorms


def hand_count(config, depth, dims=DIMS):
    """Training FLOPs of a [batch, seq] batch of real tokens with recursion depths `depth` (None: vanilla), one token
    and one layer application at a time."""
    hidden = dims["hidden_size"]
    attention_width = hidden  # num_attention_heads * head_dim
    head = hidden * dims["vocab_size"] + hidden  # the LM head and the final norm
    batch, seq = depth.shape if depth is not None else (1, 0)
    total = 0
    if depth is None:
        raise AssertionError("give a depth tensor")
    is_mor = isinstance(config, MoRConfig)
    num_recursions = config.num_recursions if is_mor else 0
    block = config.block_size if is_mor else 0
    end_layers = (2 if config.has_unshared_ends else 0) if is_mor else config.num_hidden_layers
    for row in range(batch):
        for t in range(seq):
            total += 6 * head
            for _ in range(end_layers):
                total += 6 * layer_parameters(dims) + 12 * attention_width * (t + 1)
            if not is_mor:
                continue
            d = int(depth[row, t])
            if config.routing == "token_choice":
                total += 6 * hidden * num_recursions  # the router, before the recursions
            for step in range(num_recursions):
                if config.routing == "expert_choice" and d >= step:  # still active before step: its router decides
                    total += 6 * hidden
                if d <= step:
                    continue
                shares_step_one = config.kv_cache_policy == "shared" and step > 0
                parameters = layer_parameters(dims, with_key_value=not shares_step_one)
                if shares_step_one:
                    keys = int((depth[row, : t + 1] > 0).sum())
                else:
                    keys = int((depth[row, : t + 1] > step).sum())
                total += block * (6 * parameters + 12 * attention_width * keys)
    return total


CONFIGS = {
    "vanilla": lambda: LlamaConfig(**DIMS),
    "recursive middle_cycle": lambda: MoRConfig(**DIMS, num_recursions=3, routing="none"),
    "recursive cycle": lambda: MoRConfig(**DIMS, num_recursions=2, sharing_strategy="cycle", routing="none"),
    "recursive middle_sequence": lambda: MoRConfig(**DIMS, num_recursions=2, sharing_strategy="middle_sequence",
                                                   routing="none"),
    "expert recursion-wise": lambda: MoRConfig(**DIMS, num_recursions=3),
    "expert shared KV": lambda: MoRConfig(**DIMS, num_recursions=3, kv_cache_policy="shared"),
    "token choice": lambda: MoRConfig(**DIMS, num_recursions=3, routing="token_choice"),
}


def build(config):
    return (MoRForCausalLM if isinstance(config, MoRConfig) else LlamaForCausalLM)(config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flop_count_equals_a_hand_count_from_the_depths_taken(name):
    config = CONFIGS[name]()
    model = build(config).train()
    input_ids = torch.randint(0, DIMS["vocab_size"], (2, 12))
    if isinstance(config, MoRConfig):
        depth = model(input_ids, output_recursion_depth=True).recursion_depth
    else:
        depth = torch.zeros_like(input_ids)
    counted = FlopCounter(model).batch_flops(torch.ones_like(input_ids, dtype=torch.bool),
                                             depth if isinstance(config, MoRConfig) else None)
    assert counted == hand_count(config, depth)
    if name.startswith("expert"):
        assert depth[0].bincount(minlength=4)[1:].tolist() == [4, 4, 4]  # top-k training routing: 12, 8, 4 tokens per step


def test_routed_depths_cost_less_than_full_depth():
    """The same model, counted at the depths its routing took and at full depth: routing saves what it skips."""
    model = MoRForCausalLM(MoRConfig(**DIMS, num_recursions=3)).train()
    input_ids = torch.randint(0, DIMS["vocab_size"], (2, 12))
    routed = model(input_ids, output_recursion_depth=True).recursion_depth
    counter, valid = FlopCounter(model), torch.ones_like(input_ids, dtype=torch.bool)
    assert counter.batch_flops(valid, routed) < counter.batch_flops(valid, torch.full_like(routed, 3))
    assert counter.planned_batch_flops(2, 12) == counter.batch_flops(valid, routed)  # top-k depths are planned exactly


def test_full_rank_relaxation_is_merged_and_costs_no_extra_multiplication():
    """A full-rank per-step delta is stored whole and added to the shared weight before the product (one matmul per
    projection per step, the source's cost); a low-rank delta adds its two factors' products."""
    depth = torch.full((2, 12), 3)
    valid = torch.ones_like(depth, dtype=torch.bool)
    counts = {}
    for rank in (0, 2, DIMS["hidden_size"]):
        model = MoRForCausalLM(MoRConfig(**DIMS, num_recursions=3, routing="none", relaxation_rank=rank))
        counts[rank] = FlopCounter(model).batch_flops(valid, depth)
        projections = [module for module in model.modules() if hasattr(module, "is_dense")]
        assert all(module.is_dense == (rank == DIMS["hidden_size"]) for module in projections)
    assert counts[DIMS["hidden_size"]] == pytest.approx(counts[0], rel=1e-2)  # the norms' per-step deltas only
    assert counts[2] > counts[0]


# ---------------------------------------------------------------------------------------------------------------------
# The FLOP budget through `python -m conversion.pretrain`.

BLOCK, BATCH = 32, 2


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    return path


def _pretrain(config, folder, train_text, *extra):
    config_file = folder / "config.json"
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(config_file)
    output = folder / "out"
    arguments = [config_file, output, "--tokenizer", STORIES_DIR, "--train-file", train_text, "--block-size", BLOCK,
                 "--per-device-train-batch-size", BATCH, "--learning-rate", "3e-3", "--warmup-steps", "0",
                 "--logging-steps", "1", "--disable-tqdm", *extra]
    assert pretrain.main([str(argument) for argument in arguments]) == 0
    return output


def _logged(output):
    return [entry for entry in last_log_history(output) if "train_flops" in entry]


def _step_hand_count(config):
    """One optimizer step (BATCH sequences of BLOCK tokens) at the depths training takes: every token at full depth
    without routing; under expert-choice top-k, ceil(capacity_r * T) tokens of each row at step r, with the causal
    attention term of recursion-wise KV independent of which ones."""
    if not isinstance(config, MoRConfig) or config.routing == "none":
        depth = torch.full((BATCH, BLOCK), config.num_recursions if isinstance(config, MoRConfig) else 0)
    else:
        top_k = [config.expert_choice_top_k(step, BLOCK) for step in range(config.num_recursions)]
        depth = torch.tensor([sum(position < k for k in top_k) for position in range(BLOCK)]).expand(BATCH, BLOCK)
    return hand_count(config, depth)


@pytest.mark.parametrize("name", ["vanilla", "recursive middle_cycle", "expert recursion-wise"])
def test_flop_budget_stops_at_the_right_count(name, train_text, tmp_path):
    config = CONFIGS[name]()
    config.max_position_embeddings = BLOCK
    step_flops = _step_hand_count(config)
    budget = 7.5 * step_flops  # crossed during step 8
    output = _pretrain(config, tmp_path / "run", train_text, "--max-train-flops", budget)
    logged = _logged(output)
    assert [entry["step"] for entry in logged] == list(range(1, 9))
    assert [entry["train_flops"] for entry in logged] == [step * step_flops for step in range(1, 9)]
    assert [entry["num_input_tokens_seen"] for entry in logged] == [step * BATCH * BLOCK for step in range(1, 9)]
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["train_flops"] == 8 * step_flops and summary["stopped_by"] == "FLOP budget"
    assert summary["steps"] == summary["planned_steps"] == 8 and summary["tokens_seen"] == 8 * BATCH * BLOCK


def test_time_budget_stops_the_run_and_the_learning_rate_follows_the_clock(train_text, tmp_path):
    """--max-minutes alone: the run stops at the end of the first step past the budget, and the learning rate warms up
    over its steps, then decays with the share of the budget spent, ending near zero when the time does."""
    config = CONFIGS["expert recursion-wise"]()
    config.max_position_embeddings = BLOCK
    output = _pretrain(config, tmp_path / "run", train_text, "--max-minutes", "0.05", "--warmup-steps", "2")
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["stopped_by"] == "time budget" and summary["max_minutes"] == 0.05
    rates = [entry["learning_rate"] for entry in last_log_history(output) if "learning_rate" in entry]
    assert len(rates) >= 6, "a few steps fit into 3 seconds"
    peak = max(rates)
    assert peak == pytest.approx(3e-3, rel=0.2)
    assert rates[-1] < 0.1 * peak
    decay = rates[rates.index(peak):]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))


def test_a_run_needs_a_budget(train_text, tmp_path, capsys):
    config = CONFIGS["vanilla"]()
    config_file = tmp_path / "config.json"
    config.to_json_file(config_file)
    arguments = [config_file, tmp_path / "out", "--tokenizer", STORIES_DIR, "--train-file", train_text]
    assert pretrain.main([str(argument) for argument in arguments]) == 2
    assert "give --max-steps (optimizer steps to train), --max-train-flops (a training FLOP budget), --max-minutes" in capsys.readouterr().err
    assert pretrain.main([str(argument) for argument in [*arguments, "--max-minutes", "0"]]) == 2
    assert "--max-minutes 0.0 is not valid: give" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_routed_model_trains_on_more_tokens_for_the_same_budget(train_text, tmp_path):
    """Counting differs for routed and unrouted models of the same shape: expert-choice skips steps, so the same
    budget buys more steps; token-choice (whose depths vary) stops at the end of the first step at or past it."""
    recursive, expert = CONFIGS["recursive middle_cycle"](), CONFIGS["expert recursion-wise"]()
    assert _step_hand_count(expert) < 0.8 * _step_hand_count(recursive)
    budget = 10 * _step_hand_count(recursive)
    summaries = {}
    for name in ("recursive middle_cycle", "expert recursion-wise", "token choice"):
        config = CONFIGS[name]()
        config.max_position_embeddings = BLOCK
        # The steps are planned from the budget: exactly for top-k and unrouted depths; token-choice's, whose depths
        # vary, at an even load with a margin, so that the budget still ends its run.
        output = _pretrain(config, tmp_path / name.replace(" ", "-"), train_text, "--max-train-flops", budget)
        summaries[name] = json.loads((output / "training_summary.json").read_text())
        counts = [entry["train_flops"] for entry in _logged(output)]
        assert counts[-1] >= budget > counts[-2]
        assert summaries[name]["stopped_by"] == "FLOP budget"
    assert summaries["recursive middle_cycle"]["steps"] == 10
    assert summaries["expert recursion-wise"]["steps"] == math.ceil(budget / _step_hand_count(expert)) > 12
    assert summaries["expert recursion-wise"]["tokens_seen"] > summaries["recursive middle_cycle"]["tokens_seen"]


def test_resuming_keeps_the_flop_count(train_text, tmp_path):
    config = CONFIGS["expert recursion-wise"]()
    config.max_position_embeddings = BLOCK
    step_flops = _step_hand_count(config)
    first = _pretrain(config, tmp_path / "a", train_text, "--max-steps", "6", "--save-steps", "3")
    resumed = _pretrain(config, tmp_path / "b", train_text, "--max-steps", "6", "--save-steps", "3",
                        "--resume-from-checkpoint", first / "checkpoint-3")
    summary = json.loads((resumed / "training_summary.json").read_text())
    assert summary["train_flops"] == 6 * step_flops and summary["tokens_seen"] == 6 * BATCH * BLOCK


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one error line, exit 2, nothing written, no model built.

@pytest.fixture
def refused(monkeypatch, capsys):
    def never_built(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(pretrain, "build_model", never_built)

    return lambda *arguments: one_error_line(pretrain.main, capsys, arguments)


@pytest.mark.parametrize("problem", ["missing", "not json", "other model type", "invalid mor", "mistyped field",
                                     "vocab too small", "no budget"])
def test_bad_input_is_refused_before_any_work(problem, train_text, tmp_path, refused):
    config_file = tmp_path / "config.json"
    fields = MoRConfig(**DIMS).to_dict()
    extra = ["--max-train-flops", "1e9"]
    expected = {"missing": "does not exist", "not json": "not a JSON file", "other model type": "model_type 'gpt2'",
                "invalid mor": "num_hidden_layers=9", "mistyped field": "hidden_size", "vocab too small": "vocab_size 100",
                "no budget": "--max-train-flops"}[problem]
    if problem == "not json":
        config_file.write_text("{")
    elif problem != "missing":
        fields.update({"other model type": {"model_type": "gpt2"}, "invalid mor": {"num_hidden_layers": 9},
                       "mistyped field": {"hidden_size": "big"}, "vocab too small": {"vocab_size": 100}}.get(problem, {}))
        config_file.write_text(json.dumps(fields))
    if problem == "no budget":
        extra = []
    error = refused(config_file, tmp_path / "out", "--tokenizer", STORIES_DIR, "--train-file", train_text, *extra)
    assert expected in error
    assert not (tmp_path / "out").exists()


def test_a_folder_with_trained_weights_is_refused(train_text, tmp_path, refused):
    """Issue 23, item 7: a checkpoint folder given as CONFIG silently trained from random weights; its config.json
    given as a file still starts afresh."""
    folder = tmp_path / "trained"
    MoRForCausalLM(MoRConfig(**DIMS)).save_pretrained(folder)
    error = refused(folder, tmp_path / "out", "--tokenizer", STORIES_DIR, "--train-file", train_text, "--max-steps",
                    "1")
    assert error == (
        f"error: CONFIG {folder} holds trained weights (model.safetensors), and pretraining starts from random "
        f"weights: they would be ignored. Fix: to train these weights further, give an MoR folder to `mor-uptrain "
        f"{folder} OUTPUT_DIR` (a Llama: convert it first with mor-convert); to start afresh with this shape, give the "
        f"file {folder / 'config.json'}.\n")
    assert not (tmp_path / "out").exists()
    assert pretrain.read_model_config(folder / "config.json").hidden_size == DIMS["hidden_size"]


# ---------------------------------------------------------------------------------------------------------------------
# A fresh MoR learns to route causally.

def test_fresh_mor_routes_causally_in_eval_mode_near_its_training_capacities(train_text, tmp_path):
    """Expert-choice trains with top-k over the sequence (capacities 1, 2/3, 1/3: mean depth 2); its routers learn,
    through their own BCE loss, to make the same decisions token by token. After a few hundred steps from scratch,
    eval-mode routing is causal (a prefix routes alike alone) and its depths are near the capacities: neither every
    token at depth 1 nor every token at full depth."""
    config = MoRConfig(**DIMS, num_recursions=3, gating="output", router_inference="threshold",
                       router_aux_loss_coef=1e-2)
    config.max_position_embeddings = 64
    output = _pretrain(config, tmp_path / "run", TINYSTORIES_TRAIN, "--block-size", "64",
                       "--per-device-train-batch-size", "8", "--max-steps", "500", "--logging-steps", "50",
                       "--save-steps", "500", "--max-train-documents", "400")
    model = MoRForCausalLM.from_pretrained(output).eval()
    from transformers import AutoTokenizer

    tokens = read_eval_tokens(AutoTokenizer.from_pretrained(output), TINYSTORIES_VALID, 4096)
    _, depths = perplexity_and_depths(model, tokens, 64)
    total = sum(depths.values())
    continuing = [sum(count for depth, count in depths.items() if depth > step) / total for step in range(3)]
    mean = sum(depth * count for depth, count in depths.items()) / total
    assert abs(mean - sum(config.capacity)) < 0.3, (depths, continuing)
    for fraction, capacity in zip(continuing, config.capacity):
        assert abs(fraction - capacity) < 0.2, (depths, continuing)
    assert depths[1] > 0.05 * total and depths[3] > 0.05 * total, depths

    with torch.no_grad():
        block = tokens[:64].unsqueeze(0)
        full = model(block, output_recursion_depth=True).recursion_depth
        prefix = model(block[:, :40], output_recursion_depth=True).recursion_depth
    assert torch.equal(full[:, :40], prefix)


# ---------------------------------------------------------------------------------------------------------------------
# The equal-compute benchmark.

def test_isoflop_benchmark_quick_runs_every_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "pretrain_isoflop.py"), "--quick", "--output-dir",
         str(tmp_path / "isoflop")],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "isoflop" / "pretrain_isoflop.json").read_text())
    variants = {line["variant"] for line in table["table"]}
    assert variants == {"vanilla", "recursive N_r=2", "recursive N_r=3", "MoR expert N_r=2", "MoR expert N_r=3",
                        "MoR token N_r=3", "MoR expert N_r=3, shared KV"}
    assert len({line["budget"] for line in table["table"]}) == 2
    headline = [line for line in table["table"] if line["variant"] == "MoR expert N_r=3"]
    assert headline[-1]["seeds"] == [0, 1] and headline[-1]["ppl_causal_spread"] is not None
    for line in table["table"]:
        assert line["train_flops"] >= line["budget"] and math.isfinite(line["ppl_causal"])
    assert (tmp_path / "isoflop" / "pretrain_isoflop.png").stat().st_size > 0
    assert "| MoR expert N_r=3 |" in (tmp_path / "isoflop" / "pretrain_isoflop.md").read_text()
    check_output_dir(tmp_path / "isoflop", overwrite=True)  # an earlier output: --overwrite may replace it


def test_isoflop_benchmark_help_and_bad_input(tmp_path):
    script = str(PROJECT_ROOT / "benchmarks" / "pretrain_isoflop.py")
    assert "Example" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    existing = tmp_path / "exists"
    existing.mkdir()
    result = subprocess.run([sys.executable, script, "--quick", "--output-dir", str(existing)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert list(existing.iterdir()) == []
    # Issue 18, item 1: --overwrite replaces an earlier output of the benchmark only.
    (existing / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, script, "--quick", "--output-dir", str(existing), "--overwrite"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not an earlier output" in result.stderr
    assert [path.name for path in existing.iterdir()] == ["notes.txt"]

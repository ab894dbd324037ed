"""One checkpoint, many budgets: --random-capacity (`CapacitySchedule` of conversion/training/trainer.py, shared by
uptraining and pretraining) draws every optimizer step's capacities within bounds and leaves the configured ones in
place; examples/budget_curve.py sweeps router_threshold on a checkpoint, end to end, with the mean depth
non-increasing in the threshold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from conversion import pretrain
from conversion.training.trainer import CapacitySchedule
from modeling_mor import MoRConfig, MoRForCausalLM

from conftest import STORIES_DIR, TINYSTORIES_TRAIN, TINYSTORIES_VALID, edited_model_copy, with_config_fields


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "examples" / "budget_curve.py"
DIMS = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=5, max_position_embeddings=64)
CAPACITY = [1.0, 2 / 3, 1 / 3]


def tiny_config(**overrides):
    fields = dict(num_recursions=3, routing="expert_choice", gating="output", router_inference="threshold",
                  router_aux_loss_coef=1e-2, capacity=CAPACITY)
    return MoRConfig(**DIMS, **{**fields, **overrides})


def pretrain_argv(config_file, output, *extra):
    return [str(config_file), str(output), "--tokenizer", str(STORIES_DIR), "--train-file", str(TINYSTORIES_TRAIN),
            "--block-size", "64", "--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps",
            "0", "--logging-steps", "20", "--save-steps", "1000", "--max-train-documents", "200", "--disable-tqdm",
            *map(str, extra)]


@pytest.fixture(scope="module")
def random_capacity_run(tmp_path_factory):
    """A tiny MoR pretrained 60 steps with --random-capacity 0.1, recording the capacities every step trained with."""
    folder = tmp_path_factory.mktemp("random-capacity")
    config_file = folder / "config.json"
    tiny_config().to_json_file(config_file)
    seen = []
    original = CapacitySchedule.on_step_begin

    def recording(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        seen.append(list(self.config.capacity))

    CapacitySchedule.on_step_begin = recording
    try:
        assert pretrain.main(pretrain_argv(config_file, folder / "model", "--max-steps", 60, "--random-capacity",
                                           0.1)) == 0
    finally:
        CapacitySchedule.on_step_begin = original
    return folder / "model", seen


def test_random_capacity_draws_within_bounds_and_restores_the_configured_capacity(random_capacity_run):
    model_dir, seen = random_capacity_run
    assert len(seen) == 60
    for capacity in seen:
        assert capacity[0] == 1.0
        assert all(0.1 <= fraction <= 1.0 for fraction in capacity[1:]), capacity
        assert capacity[1] >= capacity[2], capacity
    mean_depths = [sum(capacity) for capacity in seen]
    assert min(mean_depths) < 1.8 and max(mean_depths) > 2.4  # the draws span a wide range of depths
    # The saved model (and the live config after training) keeps the configured capacities.
    assert json.loads((model_dir / "config.json").read_text())["capacity"] == pytest.approx(CAPACITY)


def test_capacity_schedule_is_deterministic_and_restores_after_every_step():
    model = MoRForCausalLM(tiny_config())
    schedule = CapacitySchedule(model, random_min=0.2, seed=3)
    again = CapacitySchedule(model, random_min=0.2, seed=3)
    assert [schedule.capacity_at(step) for step in range(5)] == [again.capacity_at(step) for step in range(5)]

    class State:
        global_step = 7

    schedule.on_step_begin(None, State, None)
    assert model.config.capacity == schedule.capacity_at(7) != CAPACITY
    schedule.on_step_end(None, State, None)  # evaluation and checkpoints see the configured capacities
    assert model.config.capacity == pytest.approx(CAPACITY)
    # The FLOP budget plans with the draws' mean: 0.2 + 0.8 * 2/3 and 0.2 + 0.8 / 3.
    assert schedule.expected_capacity() == pytest.approx([1.0, 0.2 + 0.8 * 2 / 3, 0.2 + 0.8 / 3])
    # Warm-up still starts every step at full capacity and the configured schedule without random draws.
    warmup = CapacitySchedule(model, warmup_steps=4)
    assert warmup.capacity_at(0) == [1.0, 1.0, 1.0] and warmup.capacity_at(4) == pytest.approx(CAPACITY)


@pytest.mark.parametrize("config, value, message", [
    (tiny_config(), "1.5", "--random-capacity 1.5 is not valid"),
    (tiny_config(routing="none"), "0.1", "schedules expert-choice capacities"),
    (LlamaConfig(**DIMS), "0.1", "is not an MoR model"),
])
def test_random_capacity_bad_input_is_one_line_and_writes_nothing(config, value, message, tmp_path, capsys):
    config_file = tmp_path / "config.json"
    config.to_json_file(config_file)
    assert pretrain.main(pretrain_argv(config_file, tmp_path / "out", "--max-steps", 2, "--random-capacity",
                                       value)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0], error
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def run_script(*arguments):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True,
                          timeout=120, cwd=PROJECT_ROOT)


def test_budget_curve_sweeps_one_checkpoint_end_to_end(random_capacity_run, tmp_path):
    model_dir, _ = random_capacity_run
    thresholds = [0.05, 0.3, 0.5, 0.7, 0.95]
    prefix = tmp_path / "curve" / "budget"
    result = run_script(model_dir, "--reference", model_dir, "--thresholds", *thresholds, "--eval-file",
                        TINYSTORIES_VALID, "--eval-max-tokens", 1024, "--output-prefix", prefix,
                        "--layer-budgets", 0.8, "--calibration-file", TINYSTORIES_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(prefix.with_suffix(".json").read_text())
    assert table["written_by"] == "examples/budget_curve.py"  # what lets --overwrite replace these files
    # --layer-budgets: the threshold calibrated on the training text, measured like the sweep's.
    (calibrated,) = [row for row in table["sweeps"][0]["rows"] if "layer_budget" in row]
    assert calibrated["layer_budget"] == 0.8 and calibrated["calibration_fraction"] <= 0.8
    assert calibrated["layer_fraction"] == pytest.approx((2 + calibrated["mean_depth"]) / 5)
    assert "(--layer-budgets 0.8)" in prefix.with_suffix(".md").read_text()
    rows = [row for row in table["sweeps"][0]["rows"] if "layer_budget" not in row]
    assert [row["threshold"] for row in rows] == thresholds
    depths = [row["mean_depth"] for row in rows]
    assert all(later <= earlier for earlier, later in zip(depths, depths[1:])), depths
    assert depths[0] > depths[-1]  # the knob moves the compute
    assert 1.0 <= depths[-1] and depths[0] <= 3.0
    assert table["sweeps"][0]["monotone"]["depth_non_increasing_in_threshold"]
    # The checkpoint's own threshold (0.5) measured as a reference matches the sweep at 0.5.
    assert table["references"][0]["perplexity"] == pytest.approx(rows[2]["perplexity"])
    assert prefix.with_suffix(".png").stat().st_size > 0 and "| router_threshold |" in prefix.with_suffix(".md").read_text()
    # The model's saved threshold is untouched.
    assert json.loads((model_dir / "config.json").read_text())["router_threshold"] == 0.5


def test_budget_curve_help_and_bad_input(random_capacity_run, tmp_path):
    model_dir, _ = random_capacity_run
    assert "Example" in run_script("--help").stdout
    for arguments, message in (
        (["--thresholds", "1.5"], "--thresholds 1.5 is not valid"),
        (["--layer-budgets", "1.5"], "--layer-budgets 1.5 is not valid"),
        (["--layer-budgets", "0.8", "--calibration-file", tmp_path / "missing.txt"], "missing.txt"),
        (["--reference", tmp_path / "missing"], "does not exist"),
    ):
        result = run_script(model_dir, *arguments, "--output-prefix", tmp_path / "out" / "curve")
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
    # Issue 18, item 6: a config.json that does not fit the weights (was transformers' load report, a RuntimeError).
    mismatched = edited_model_copy(model_dir, tmp_path / "mismatched", with_config_fields(intermediate_size=128))
    result = run_script(mismatched, "--output-prefix", tmp_path / "out" / "curve")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not match the weights" in result.stderr
    assert not (tmp_path / "out").exists()
    # Issue 18, item 1: --overwrite replaces an earlier sweep's files only, never a file of the same name.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "curve.md").write_text("my notes")
    for extra in ([], ["--overwrite"]):
        result = run_script(model_dir, "--output-prefix", tmp_path / "out" / "curve", *extra)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "curve.md" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert "not an earlier output" in result.stderr
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["curve.md"]


def calibration_text_tokens(model_dir):
    from conversion.measure import read_eval_tokens
    from transformers import AutoTokenizer

    return read_eval_tokens(AutoTokenizer.from_pretrained(model_dir), TINYSTORIES_VALID, 1024)


def test_calibrated_threshold_is_the_lowest_within_the_layer_budget(random_capacity_run):
    """`calibrate_router_threshold` against `layer_fraction` measured independently at its answer and just below it
    (a lower threshold sends tokens deeper: it must overspend), and a budget no threshold reaches is refused."""
    import math

    from transformers import AutoModelForCausalLM

    from conversion.flops import layer_applications
    from conversion.measure import calibrate_router_threshold, layer_fraction, mean_depth, perplexity_and_depths

    model_dir, _ = random_capacity_run
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    tokens = calibration_text_tokens(model_dir)
    # The rule it counts by: 2 end layers and the block's one layer per recursion step, of 5 unrolled layers.
    _, depths = perplexity_and_depths(model, tokens, 64)
    assert layer_applications(model, mean_depth(depths)) == pytest.approx(2 + mean_depth(depths))
    for budget in (0.9, 0.75):
        threshold, spent = calibrate_router_threshold(model, tokens, budget, 64)
        assert model.config.router_threshold == 0.5  # the caller sets it
        model.config.router_threshold = threshold
        assert spent == pytest.approx(layer_fraction(model, tokens, 64)) and spent <= budget
        logit = math.log(threshold / (1 - threshold))
        model.config.router_threshold = 1 / (1 + math.exp(-(logit - 0.004)))
        assert layer_fraction(model, tokens, 64) > budget
        model.config.router_threshold = 0.5
    with pytest.raises(ValueError, match="no router threshold brings the model within 0.55"):
        calibrate_router_threshold(model, tokens, 0.55, 64)  # every token takes step 1: (2 + 1) / 5 = 0.6 at least


def test_layer_budget_saves_the_calibrated_threshold(tmp_path, capsys):
    """--layer-budget (mor-pretrain here; mor-uptrain runs the same `run_training`): the saved config's threshold
    keeps the training text within the budget, the summary records it, and budgets the model cannot follow are
    refused before any work, with nothing written."""
    from transformers import AutoModelForCausalLM

    from conversion.measure import layer_fraction
    from conversion.training.data import TokenBlocks
    from conversion.training.run import calibration_tokens

    config_file = tmp_path / "config.json"
    tiny_config().to_json_file(config_file)
    output = tmp_path / "model"
    assert pretrain.main(pretrain_argv(config_file, output, "--max-steps", 20, "--random-capacity", 0.1,
                                       "--layer-budget", 0.8)) == 0
    summary = json.loads((output / "training_summary.json").read_text())["router_calibration"]
    threshold = json.loads((output / "config.json").read_text())["router_threshold"]
    assert summary["layer_budget"] == 0.8 and summary["router_threshold"] == pytest.approx(threshold, abs=1e-6)
    assert threshold != 0.5 and summary["layer_fraction"] <= 0.8
    # Measured again on the training blocks, from the saved model.
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    from transformers import AutoTokenizer

    from conversion.training.data import load_training_texts, tokenize_texts

    class Args:
        dataset, train_file, max_train_documents = None, [str(TINYSTORIES_TRAIN)], 200

    tokens = tokenize_texts(AutoTokenizer.from_pretrained(output), load_training_texts(Args))
    measured = layer_fraction(model, calibration_tokens(TokenBlocks(tokens, 64)), 64)
    assert measured == pytest.approx(summary["layer_fraction"], abs=1e-3)

    for config, budget, message in (
        (tiny_config(), "0", "--layer-budget 0.0 is not valid"),
        (tiny_config(), "0.5", "is below what this model can spend"),
        (tiny_config(routing="none"), "0.8", "sets the eval-mode router threshold"),
    ):
        config.to_json_file(config_file)
        refused = tmp_path / "refused"
        capsys.readouterr()
        assert pretrain.main(pretrain_argv(config_file, refused, "--max-steps", 2, "--layer-budget", budget)) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: ") and message in error[0], error
        assert not refused.exists() and not any(path.name.startswith(".refused") for path in tmp_path.iterdir())

"""FSDP2 through accelerate: `python -m conversion.uptrain` on 2 CPU processes (gloo) with
examples/accelerate/fsdp2.yaml, against the same run on one process.

The runs go through tests/fsdp_worker.py, which is the uptraining command line plus two things: it keeps
accelerate's FSDP plugin on CPU processes (accelerate 1.15 falls back to DDP there) and it reports the `fully_shard`
units accelerate made. Same global batch in both runs (2 processes x 2 blocks = 1 process x 4 blocks) and the same
data order (accelerate's seeded sampler, split across the processes), so the losses agree up to the order of the
gradient reductions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conversion.convert_llama_to_mor import main as convert_main
from conversion.uptrain import main as uptrain_main

from conftest import STORIES_DIR, TINYSTORIES_TRAIN, TINYSTORIES_VALID, free_port, last_log_history, skip_without_gloo


PROJECT_ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = PROJECT_ROOT / "examples" / "accelerate" / "fsdp2.yaml"
WORKER = Path(__file__).with_name("fsdp_worker.py")
WORLD_SIZE = 2
STEPS = 4
BATCH = 4  # global: blocks per optimizer step


def _training_options(train_text, per_device_batch):
    return ["--train-file", str(train_text), "--block-size", "64",
            "--per-device-train-batch-size", str(per_device_batch), "--learning-rate", "3e-3", "--warmup-steps", "0",
            "--logging-steps", "1", "--max-steps", str(STEPS), "--save-steps", "2", "--save-total-limit", "2",
            "--disable-tqdm"]


def _launch_fsdp(report_dir, model_dir, output_dir, *options, timeout=300):
    report_dir.mkdir()
    port = free_port()  # for the rendezvous
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", str(WORLD_SIZE), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               str(WORKER), str(report_dir), str(model_dir), str(output_dir), *map(str, options)]
    # On this checkout's code: the worker's folder, not the working directory, is on its path, so it would import an
    # installed copy of the package otherwise.
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    reports = [report_dir / f"rank{rank}.json" for rank in range(WORLD_SIZE)]
    assert all(report.is_file() for report in reports), "accelerate did not shard the model: it trained without FSDP"
    (report_dir / "stdout.txt").write_text(result.stdout)
    return [json.loads(report.read_text()) for report in reports]


def _train_logs(folder):
    return [entry for entry in last_log_history(folder) if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stories260K converted (middle_cycle, 3 recursions: 3 unique decoder layers, 5 unrolled), uptrained 4 steps on
    one process, with FSDP on 2 processes, and with FSDP again resumed from the FSDP run's checkpoint-2."""
    skip_without_gloo()
    folder = tmp_path_factory.mktemp("fsdp")
    converted = folder / "stories-mor"
    # Tied layers (the scenario this compares was written for; mor-convert's default is now full rank).
    assert convert_main([str(STORIES_DIR), str(converted), "--num-recursions", "3", "--relaxation-rank", "0"]) == 0
    train_text = folder / "train.txt"
    train_text.write_text(TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:60000],
                          encoding="utf-8")

    one_process = folder / "one-process"
    # The router fit, on by default, runs on one process only (the FSDP runs say so and go on without): off here too.
    assert uptrain_main([str(converted), str(one_process), *_training_options(train_text, BATCH),
                         "--router-fit-tokens", "0"]) == 0
    fsdp_options = _training_options(train_text, BATCH // WORLD_SIZE)
    fsdp = folder / "fsdp"
    reports = _launch_fsdp(folder / "fsdp-report", converted, fsdp, *fsdp_options)
    resumed = folder / "fsdp-resumed"
    _launch_fsdp(folder / "resumed-report", converted, resumed, *fsdp_options,
                 "--resume-from-checkpoint", fsdp / "checkpoint-2")
    return dict(converted=converted, train_text=train_text, one_process=one_process, fsdp=fsdp, resumed=resumed,
                reports=reports, fsdp_stdout=(folder / "fsdp-report" / "stdout.txt").read_text())


def test_fsdp_shards_each_unique_layer_once(runs):
    from transformers import AutoModelForCausalLM

    from modeling_mor.modeling_mor import MoRDecoderLayer

    model = AutoModelForCausalLM.from_pretrained(runs["converted"])
    unique_layers = [name for name, module in model.named_modules() if isinstance(module, MoRDecoderLayer)]
    assert unique_layers == ["model.first_layer", "model.recursion_block.layers.0", "model.last_layer"]
    assert model.config.num_hidden_layers == 5  # the unrolled depth: first + 3 recursions of the block + last
    for report in runs["reports"]:
        assert report["distributed_type"] == "DistributedType.FSDP" and report["is_fsdp2"]
        assert report["world_size"] == WORLD_SIZE and report["backend"] == "gloo"
        # One unit per decoder-layer module: the shared layer is one unit, not one per recursion step.
        layer_units = [unit["names"] for unit in report["units"] if unit["class"] == "MoRDecoderLayer"]
        assert layer_units == [[name] for name in unique_layers]
        # ... which runs (all-gathers its parameters) once per recursion step.
        calls = report["calls_in_first_training_forward"]
        assert [calls[name] for name in unique_layers] == [1, model.config.num_recursions, 1]
        # Every parameter is managed by exactly one parameter group, and sharded across the processes.
        groups = {}
        for unit in report["units"]:
            for group in unit["groups"]:
                groups.setdefault(group, set()).update(unit["managed"])
        managed = [name for names in groups.values() for name in names]
        assert sorted(managed) == sorted(name for name, _ in model.named_parameters())
        for name, parameter in report["parameters"].items():
            assert parameter["dtensor"] and parameter["placements"] == ["S(0)"], name
    # Each process holds its rows of every parameter (dim 0 split in order, the last shards may be empty).
    for name, parameter in runs["reports"][0]["parameters"].items():
        local_rows = [report["parameters"][name]["local_shape"][0] for report in runs["reports"]]
        assert local_rows[0] == -(-parameter["global_shape"][0] // WORLD_SIZE), name
        assert sum(local_rows) == parameter["global_shape"][0], name


def test_fsdp_losses_match_one_process(runs):
    # Said once (by the main process), not refused: the default router fit is off on several processes.
    assert runs["fsdp_stdout"].count("Router fit: off, it runs on one process and this run has 2") == 1
    one_process, fsdp = _train_logs(runs["one_process"]), _train_logs(runs["fsdp"])
    assert [entry["step"] for entry in fsdp] == [entry["step"] for entry in one_process] == list(range(1, STEPS + 1))
    loss_difference = max(abs(a["loss"] - b["loss"]) for a, b in zip(one_process, fsdp))
    assert loss_difference < 1e-5, loss_difference
    for a, b in zip(one_process, fsdp):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["num_input_tokens_seen"] == a["num_input_tokens_seen"]
    assert fsdp[-1]["loss"] < fsdp[0]["loss"]


def test_fsdp_resume_continues_the_run(runs):
    straight, resumed = _train_logs(runs["fsdp"]), _train_logs(runs["resumed"])
    assert [entry["step"] for entry in resumed] == list(range(1, STEPS + 1))  # checkpoint-2's history, then 3..4
    for a, b in zip(straight[2:], resumed[2:]):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    assert (runs["fsdp"] / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # what resuming read
    straight_weights = load_file(runs["fsdp"] / "model.safetensors")
    resumed_weights = load_file(runs["resumed"] / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_fsdp_saves_a_model_that_loads_in_one_process(runs):
    from transformers import AutoModelForCausalLM

    # Full tensors gathered on rank 0 into one model.safetensors, equal to the one-process run's.
    fsdp_weights = load_file(runs["fsdp"] / "model.safetensors")
    one_process_weights = load_file(runs["one_process"] / "model.safetensors")
    for name, tensor in one_process_weights.items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for run in ("one_process", "fsdp"):
        model = AutoModelForCausalLM.from_pretrained(runs[run]).eval()
        with torch.no_grad():
            logits[run] = model(input_ids).logits
    torch.testing.assert_close(logits["fsdp"], logits["one_process"], atol=1e-4, rtol=1e-4)
    assert json.loads((runs["fsdp"] / "config.json").read_text())["use_cache"] is True


def test_fsdp_saved_folder_is_what_one_process_saves(runs):
    one_process = runs["one_process"]
    expected_auto_map = json.loads((one_process / "config.json").read_text())["auto_map"]
    for folder in (runs["fsdp"], runs["fsdp"] / "checkpoint-4"):
        # The model's own code (modeling_mor.py and its imports), not torch's _fsdp_*.py files.
        assert json.loads((folder / "config.json").read_text())["auto_map"] == expected_auto_map, folder
        assert sorted(p.name for p in folder.glob("*.py")) == sorted(p.name for p in one_process.glob("*.py"))
        # The tied head is the embeddings' matrix, saved once.
        assert load_file(folder / "model.safetensors").keys() == load_file(one_process / "model.safetensors").keys()


def test_fsdp_logs_the_loss_terms_of_the_whole_batch(runs):
    for a, b in zip(_train_logs(runs["one_process"]), _train_logs(runs["fsdp"])):
        for name in ("lm_loss", "router_aux_loss"):
            assert abs(a[name] - b[name]) <= 2e-4, (name, a[name], b[name])  # logged to 4 decimals


def test_fsdp_measures_the_perplexity_after_training(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.measure import perplexity_and_depths, read_eval_tokens

    output = tmp_path / "fsdp-eval"
    eval_file = TINYSTORIES_VALID
    options = _training_options(runs["train_text"], BATCH // WORLD_SIZE)
    options[options.index("--max-steps") + 1] = "1"
    options[options.index("--save-steps") + 1] = "1"
    _launch_fsdp(tmp_path / "report", runs["converted"], output, *options, "--eval-file", eval_file,
                 "--eval-max-tokens", "256", "--eval-block-size", "64", timeout=120)
    measured = json.loads((output / "training_summary.json").read_text())["eval"]
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    tokens = read_eval_tokens(AutoTokenizer.from_pretrained(output), eval_file, 256)
    perplexity, _ = perplexity_and_depths(model, tokens, 64)
    assert measured["perplexity"] == pytest.approx(perplexity, rel=1e-5)

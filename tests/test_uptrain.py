"""Uptraining with Trainer: the loss falls, resuming continues the same run, and a 2-process DDP run works."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conversion.convert_llama_to_mor import main as convert_main
from conversion.uptrain import main as uptrain_main


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not (SHARED / "stories260K").is_dir():
        pytest.skip(f"the real checkpoint is not available at {SHARED / 'stories260K'} (a clone without ../shared)")
    output = tmp_path_factory.mktemp("uptrain") / "stories-mor"
    assert convert_main([str(SHARED / "stories260K"), str(output), "--num-recursions", "3"]) == 0
    return output


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    # A slice of the real training text keeps the tests fast.
    path.write_text((SHARED / "tinystories" / "train.txt").read_text(encoding="utf-8")[:60000], encoding="utf-8")
    return path


def _uptrain(model_dir, output_dir, train_text, *extra):
    arguments = [str(model_dir), str(output_dir), "--train-file", str(train_text), "--block-size", "64",
                 "--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps", "0",
                 "--logging-steps", "1", "--disable-tqdm", *map(str, extra)]
    assert uptrain_main(arguments) == 0


def _log_history(folder):
    checkpoints = sorted(Path(folder).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def test_uptraining_lowers_the_loss_and_updates_the_card(converted, train_text, tmp_path):
    output = tmp_path / "up"
    _uptrain(converted, output, train_text, "--max-steps", "12", "--save-steps", "12",
             "--eval-file", SHARED / "tinystories" / "valid.txt", "--eval-max-tokens", "1024",
             "--teacher", SHARED / "stories260K", "--capacity-warmup-steps", "4")
    losses = [entry["lm_loss"] for entry in _log_history(output) if "lm_loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("distill_loss" in entry for entry in _log_history(output))
    card = (output / "README.md").read_text()
    assert "**Uptrained** for 12 steps" in card and "MoR after uptraining" in card and "${" not in card
    assert (output / "loss_curve.png").stat().st_size > 0
    config = json.loads((output / "config.json").read_text())
    assert config["capacity"] == pytest.approx([1.0, 2 / 3, 1 / 3])  # warm-up leaves the target capacities


def test_resume_from_checkpoint_continues_the_same_run(converted, train_text, tmp_path):
    straight = tmp_path / "straight"
    _uptrain(converted, straight, train_text, "--max-steps", "6", "--save-steps", "3", "--save-total-limit", "3")
    resumed = tmp_path / "resumed"
    _uptrain(converted, resumed, train_text, "--max-steps", "6", "--save-steps", "3",
             "--resume-from-checkpoint", straight / "checkpoint-3")
    resumed_steps = [entry["step"] for entry in _log_history(resumed) if "loss" in entry]
    assert resumed_steps == [1, 2, 3, 4, 5, 6]  # the history of checkpoint-3, then steps 4..6 of this run
    assert not (resumed / "checkpoint-3").exists() and (resumed / "checkpoint-6").exists()
    # Same weights and the same optimizer state as the uninterrupted run.
    straight_weights = load_file(straight / "model.safetensors")
    resumed_weights = load_file(resumed / "model.safetensors")
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), name
    straight_optimizer = torch.load(straight / "checkpoint-6" / "optimizer.pt", weights_only=False)
    resumed_optimizer = torch.load(resumed / "checkpoint-6" / "optimizer.pt", weights_only=False)
    for key, state in straight_optimizer["state"].items():
        assert torch.allclose(state["exp_avg"], resumed_optimizer["state"][key]["exp_avg"], atol=1e-6)
        assert int(state["step"]) == int(resumed_optimizer["state"][key]["step"]) == 6


def test_existing_output_dir_is_refused(converted, train_text, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    assert uptrain_main([str(converted), str(output), "--train-file", str(train_text), "--max-steps", "1"]) == 2
    assert "--resume-from-checkpoint" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_two_process_ddp_run_saves_a_loadable_model(converted, train_text, tmp_path):
    output = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port for the rendezvous (port 0 is not accepted by torchrun)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port),
         "-m", "conversion.uptrain", str(converted), str(output), "--train-file", str(train_text),
         "--max-steps", "3", "--block-size", "64", "--per-device-train-batch-size", "2", "--logging-steps", "1",
         "--save-steps", "3", "--disable-tqdm"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in (output / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 8))).logits).all()


def test_uptraining_from_a_local_dataset_folder(converted, train_text, tmp_path):
    """--dataset takes what `datasets.load_dataset` takes: a Hub id, or (tested here) a local dataset folder."""
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    stories = [story.strip() for story in train_text.read_text(encoding="utf-8").split("<|endoftext|>") if story.strip()]
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in stories), encoding="utf-8")
    output = tmp_path / "from-dataset"
    assert uptrain_main([str(converted), str(output), "--dataset", str(dataset_dir), "--text-column", "story",
                         "--max-steps", "2", "--block-size", "64", "--per-device-train-batch-size", "2",
                         "--save-steps", "2", "--disable-tqdm"]) == 0
    assert (output / "model.safetensors").exists()
    assert "dataset" in json.loads((output / "mor_card.json").read_text())["uptraining"]["train_data"]

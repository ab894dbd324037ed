"""Uptraining with Trainer: the loss falls, resuming continues the same run, an interrupted run leaves nothing or
resumable checkpoints, the saved folders and the card are right, and a 2-process DDP run works."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conversion.convert_llama_to_mor import main as convert_main
from conversion.model_card import render_model_card
from conversion.training.router_fit import DEFAULT_ROUTER_FIT_TOKENS
from conversion.training.trainer import UptrainTrainer
from conversion.uptrain import main as uptrain_main

from conftest import free_port, last_log_history, one_error_line


PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The real checkpoint and text the repository ships, so that these tests run in a plain clone.
ASSETS = PROJECT_ROOT / "examples" / "assets"
STORIES = ASSETS / "stories260K"
VALID_TEXT = ASSETS / "tinystories_valid_sample.txt"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """stories260K converted with tied layers (`--relaxation-rank 0`: what uptraining must repair, unlike the default
    exact conversion) and the conversion's own perplexity figures (2,048 tokens in blocks of 256)."""
    output = tmp_path_factory.mktemp("uptrain") / "stories-mor"
    assert convert_main([str(STORIES), str(output), "--num-recursions", "3", "--relaxation-rank", "0",
                         "--eval-file", str(VALID_TEXT),
                         "--eval-max-tokens", "2048", "--eval-block-size", "256"]) == 0
    return output


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    # A slice of the real training text keeps the tests fast.
    text = (ASSETS / "tinystories_train_sample.txt").read_text(encoding="utf-8")
    path.write_text(text[:60000], encoding="utf-8")
    return path


def _uptrain(model_dir, output_dir, train_text, *extra):
    arguments = [str(model_dir), str(output_dir), "--train-file", str(train_text), "--block-size", "64",
                 "--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps", "0",
                 "--logging-steps", "1", "--disable-tqdm", *map(str, extra)]
    assert uptrain_main(arguments) == 0


def test_uptraining_lowers_the_loss_and_updates_the_card(converted, train_text, tmp_path):
    output = tmp_path / "up"
    _uptrain(converted, output, train_text, "--max-steps", "12", "--save-steps", "12",
             "--eval-file", VALID_TEXT, "--eval-max-tokens", "1024",
             "--teacher", STORIES, "--capacity-warmup-steps", "4")
    losses = [entry["lm_loss"] for entry in last_log_history(output) if "lm_loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("distill_loss" in entry for entry in last_log_history(output))
    card = (output / "README.md").read_text()
    assert "**Uptrained** for 12 steps" in card and "MoR after uptraining" in card and "${" not in card
    assert (output / "loss_curve.png").stat().st_size > 0
    config = json.loads((output / "config.json").read_text())
    assert config["capacity"] == pytest.approx([1.0, 2 / 3, 1 / 3])  # warm-up leaves the target capacities


def test_hidden_state_distillation_matches_the_recursion_boundaries(converted, train_text, tmp_path, capsys):
    """--hidden-distill-weight compares the hidden states where the recursion steps end with the teacher's at the
    same depth: zero for a conversion that is the source itself (full-rank relaxation, every token at full depth),
    positive for the tied model; refused without a teacher."""
    exact = tmp_path / "exact"
    assert convert_main([str(STORIES), str(exact), "--num-recursions", "3", "--routing", "none",
                         "--relaxation-rank", "full"]) == 0
    for model_dir, name in ((exact, "exact-up"), (converted, "tied-up")):
        _uptrain(model_dir, tmp_path / name, train_text, "--max-steps", "1", "--teacher", STORIES,
                 "--hidden-distill-weight", "1.0")
    # The first logged step's loss terms are measured before its update.
    first = {name: next(entry for entry in last_log_history(tmp_path / name) if "hidden_distill_loss" in entry)
             for name in ("exact-up", "tied-up")}
    assert first["exact-up"]["hidden_distill_loss"] < 1e-6
    assert first["tied-up"]["hidden_distill_loss"] > 1e-2
    arguments = [str(converted), str(tmp_path / "refused"), "--train-file", str(train_text), "--max-steps", "1",
                 "--hidden-distill-weight", "1.0"]
    assert uptrain_main(arguments) == 2
    assert "--hidden-distill-weight 1.0 needs a --teacher" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_block_wise_stage_trains_the_shared_layers_on_the_teachers_states(converted, train_text, tmp_path, capsys):
    """--block-wise-fraction: the first share of the run feeds every shared layer, at every recursion step, the
    teacher's hidden states and trains it toward the teacher's next ones. Its loss is zero for a conversion that is the
    source (full rank), positive and falling for the tied one; the stage touches the shared layers only (embeddings,
    unshared end layers and routers keep their weights); then training goes on end to end. Refused without a
    teacher and for the shared KV policy, before anything is written."""
    exact = tmp_path / "exact"
    assert convert_main([str(STORIES), str(exact), "--num-recursions", "3", "--relaxation-rank", "full"]) == 0
    _uptrain(exact, tmp_path / "exact-up", train_text, "--max-steps", "1", "--teacher", STORIES,
             "--block-wise-fraction", "0.5")
    first = next(entry for entry in last_log_history(tmp_path / "exact-up") if "block_wise_loss" in entry)
    assert first["block_wise_loss"] < 1e-6

    staged = tmp_path / "staged"
    capsys.readouterr()
    _uptrain(converted, staged, train_text, "--max-steps", "4", "--teacher", STORIES, "--block-wise-fraction", "0.99")
    # The default router fit (at 0.5) would fall inside the stage, where nothing routes: off, and said.
    assert "Router fit: off, it would run at 0.5 of the budget, inside the block-wise stage" in capsys.readouterr().out
    losses = [entry["block_wise_loss"] for entry in last_log_history(staged) if "block_wise_loss" in entry]
    assert len(losses) == 4 and losses[0] > 1e-2 and losses[-1] < losses[0]
    assert not any("lm_loss" in entry for entry in last_log_history(staged))
    before, after = load_file(converted / "model.safetensors"), load_file(staged / "model.safetensors")
    changed = {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}
    assert changed and all(name.startswith("model.recursion_block.layers.") for name in changed), changed
    # Counted as the stage's steps: every shared layer at every step for each of the 4 x 64 tokens, nothing else.
    from conversion.flops import FlopCounter
    from transformers import AutoModelForCausalLM

    counter = FlopCounter(AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True))
    stage_step = counter.block_wise_flops(torch.ones(4, 64, dtype=torch.bool))
    full_step = counter.batch_flops(torch.ones(4, 64, dtype=torch.bool), torch.full((4, 64), 3))
    summary = json.loads((staged / "training_summary.json").read_text())
    assert summary["train_flops"] == pytest.approx(4 * stage_step) and 0 < stage_step < full_step

    mixed = tmp_path / "mixed"
    _uptrain(converted, mixed, train_text, "--max-steps", "4", "--teacher", STORIES, "--block-wise-fraction", "0.5")
    steps = [("block_wise_loss" in entry, "lm_loss" in entry) for entry in last_log_history(mixed) if "loss" in entry]
    assert steps == [(True, False)] * 2 + [(False, True)] * 2

    from transformers import LlamaConfig, LlamaForCausalLM

    shallow = tmp_path / "shallow"  # the tokenizer and width of stories260K, 3 layers instead of 5
    LlamaForCausalLM(LlamaConfig.from_pretrained(STORIES, num_hidden_layers=3)).save_pretrained(shallow)
    shared = tmp_path / "shared-kv"
    assert convert_main([str(STORIES), str(shared), "--num-recursions", "3", "--relaxation-rank", "0",
                         "--kv-cache-policy", "shared"]) == 0
    for model_dir, extra, message in (
        (converted, [], "--block-wise-fraction 0.5 trains the shared layers on the teacher's hidden states and needs "
                        "a --teacher"),
        (shared, ["--teacher", STORIES], "under --kv-cache-policy shared a deeper step reads step 1's"),
        (converted, ["--teacher", shallow], "has 3 layers of width 64 and INPUT_DIR"),
    ):
        arguments = [str(model_dir), str(tmp_path / "refused"), "--train-file", str(train_text), "--max-steps", "1",
                     "--block-wise-fraction", "0.5", *map(str, extra)]
        assert uptrain_main(arguments) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_gradient_accumulation_equals_one_larger_batch(converted, train_text, tmp_path):
    """Two accumulated micro-batches of 4 blocks train and log as one batch of 8: the loss Trainer logs and the
    gradient norm it clips are the same (UptrainTrainer's loss is a micro-batch mean, which Trainer must divide by the
    accumulation steps)."""
    _uptrain(converted, tmp_path / "batch8", train_text, "--max-steps", "1", "--per-device-train-batch-size", "8")
    _uptrain(converted, tmp_path / "accumulated", train_text, "--max-steps", "1", "--gradient-accumulation-steps", "2")
    logged = [next(entry for entry in last_log_history(tmp_path / name) if "loss" in entry)
              for name in ("batch8", "accumulated")]
    assert logged[1]["loss"] == pytest.approx(logged[0]["loss"], rel=1e-3)
    assert logged[1]["grad_norm"] == pytest.approx(logged[0]["grad_norm"], rel=1e-3)


def test_resume_from_checkpoint_continues_the_same_run(converted, train_text, tmp_path):
    straight = tmp_path / "straight"
    _uptrain(converted, straight, train_text, "--max-steps", "6", "--save-steps", "3", "--save-total-limit", "3")
    resumed = tmp_path / "resumed"
    _uptrain(converted, resumed, train_text, "--max-steps", "6", "--save-steps", "3",
             "--resume-from-checkpoint", straight / "checkpoint-3")
    resumed_steps = [entry["step"] for entry in last_log_history(resumed) if "loss" in entry]
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
        assert int(state["step"]) == int(resumed_optimizer["state"][key]["step"])
    # Every parameter trained each step, but the auxiliary routers after the default router fit (at step 3), which
    # then choose and learn nothing more.
    steps = {int(state["step"]) for state in straight_optimizer["state"].values()}
    assert steps == {3, 6} and (straight / "checkpoint-3" / "router_fit.json").is_file()


def test_existing_output_dir_is_refused(converted, train_text, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    assert uptrain_main([str(converted), str(output), "--train-file", str(train_text), "--max-steps", "1"]) == 2
    assert "--resume-from-checkpoint" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_an_earlier_run_once_the_first_checkpoint_is_saved(converted, train_text, tmp_path):
    output = tmp_path / "busy"
    _uptrain(converted, output, train_text, "--max-steps", "1")
    (output / "checkpoint-99").mkdir()  # a later checkpoint of that run (the folder's record allows them)
    _uptrain(converted, output, train_text, "--max-steps", "1", "--overwrite")
    assert (output / "model.safetensors").is_file() and [p.name for p in _checkpoints(output)] == ["checkpoint-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


def test_two_process_ddp_run_saves_a_loadable_model(converted, train_text, tmp_path):
    output = tmp_path / "ddp"
    port = free_port()  # for the rendezvous (port 0 is not accepted by torchrun)
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
    # Both processes wrote their part of the checkpoint into the same (staged, then moved) folder.
    rng_states = sorted(p.name for p in (output / "checkpoint-3").glob("rng_state*"))
    assert rng_states == ["rng_state_0.pth", "rng_state_1.pth"]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 8))).logits).all()


def test_two_process_run_refuses_the_block_wise_stage_before_training(converted, train_text, tmp_path):
    """The block-wise stage calls layers outside DDP's forward, so a multi-process run refuses it (one line, the fix:
    the stage on one process first) before any step, and writes nothing."""
    output = tmp_path / "ddp-stage"
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port),
         "-m", "conversion.uptrain", str(converted), str(output), "--train-file", str(train_text),
         "--teacher", str(STORIES), "--block-wise-fraction", "0.5",
         "--max-steps", "2", "--block-size", "64", "--per-device-train-batch-size", "2", "--disable-tqdm"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert "error: --block-wise-fraction runs on one process, and this run has 2" in result.stderr
    assert "--block-wise-fraction 1" in result.stderr and "'loss'" not in result.stdout
    assert list(tmp_path.iterdir()) == []


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


def _checkpoints(folder):
    return sorted((p for p in Path(folder).glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))


@pytest.fixture(scope="module")
def uptrained(converted, train_text, tmp_path_factory):
    """3 steps with checkpoints at steps 2 and 3, perplexity measured on 512 tokens in blocks of 64."""
    output = tmp_path_factory.mktemp("uptrained") / "up"
    _uptrain(converted, output, train_text, "--max-steps", "3", "--save-steps", "2", "--save-total-limit", "3",
             "--eval-file", VALID_TEXT, "--eval-max-tokens", "512", "--eval-block-size", "64")
    return output


def test_saved_model_and_checkpoints_keep_use_cache_and_carry_the_tokenizer(uptrained):
    from transformers import AutoTokenizer

    folders = [uptrained, *_checkpoints(uptrained)]
    assert [folder.name for folder in folders] == ["up", "checkpoint-2", "checkpoint-3"]
    for folder in folders:
        # Trainer turns the cache off for training; a saved model must generate with it as the source did.
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder
        assert (folder / "tokenizer.json").is_file(), folder
        assert AutoTokenizer.from_pretrained(folder)("Once upon a time").input_ids


def test_every_perplexity_on_the_card_names_how_it_was_measured(uptrained, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.measure import perplexity_and_depths, read_eval_tokens

    rows = json.loads((uptrained / "mor_card.json").read_text())["perplexity"]
    conversion = {"tokens": 2048, "block_size": 256, "file": VALID_TEXT.name}
    uptraining = {"tokens": 512, "block_size": 64, "file": VALID_TEXT.name}
    assert list(rows)[0].startswith("source")
    assert list(rows)[1:] == ["recursive (tied) model, every token at full depth",
                              "MoR as converted (untrained routers)", "MoR before uptraining", "MoR after uptraining"]
    for label, row in rows.items():
        expected = uptraining if "uptraining" in label else conversion
        assert {key: row[key] for key in expected} == expected, label

    # "before" is measured as "after" is: same tokens, same blocks, on the model uptraining started from.
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokens = read_eval_tokens(AutoTokenizer.from_pretrained(converted), VALID_TEXT, 512)
    before, _ = perplexity_and_depths(model, tokens, 64)
    assert rows["MoR before uptraining"]["perplexity"] == pytest.approx(before, rel=1e-5)

    card = (uptrained / "README.md").read_text()
    lines = {label: next(line for line in card.splitlines() if line.startswith(f"| {label} |")) for label in rows}
    for label, line in lines.items():
        assert f"| {rows[label]['perplexity']:.2f} |" in line
        if "uptraining" in label:
            assert "first 512 tokens" in line and "blocks of 64" in line, line
        else:
            assert "first 2,048 tokens" in line and "blocks of 256" in line, line
        assert f"`{VALID_TEXT.name}`" in line
    depth_caption = next(line for line in card.splitlines() if line.startswith("Recursion steps taken per token"))
    assert "after uptraining" in depth_caption
    assert "first 512 tokens" in depth_caption and "blocks of 64" in depth_caption


def test_card_without_a_hub_base_model_leaves_the_field_out_and_says_why(converted, train_text, tmp_path):
    figures = json.loads((converted / "mor_card.json").read_text())
    with_hub_id = render_model_card({**figures, "base_model": "karpathy/stories260K"})
    assert "\nbase_model: karpathy/stories260K\n" in with_hub_id and "`karpathy/stories260K`" in with_hub_id

    local = render_model_card({**figures, "base_model": None})
    front_matter = local.split("\n---\n", 1)[0]
    assert "base_model:" not in front_matter.replace("# base_model", "")
    assert "local folder" in front_matter and "local folder" in local.split("\n---\n", 1)[1]
    assert "None" not in local and "${" not in local

    # Uptraining a model converted from a local folder still writes its card.
    source = tmp_path / "local-mor"
    shutil.copytree(converted, source)
    (source / "mor_card.json").write_text(json.dumps({**figures, "base_model": None}))
    _uptrain(source, tmp_path / "up", train_text, "--max-steps", "1")
    card = (tmp_path / "up" / "README.md").read_text()
    assert "**Uptrained** for 1 steps" in card and "base_model:" not in card.replace("# base_model", "")


def test_default_blocks_are_capped_at_the_model_context(train_text, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    # A Llama with a 32-token context and the stories260K tokenizer (vocabulary 512).
    torch.manual_seed(0)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=5, max_position_embeddings=32)).save_pretrained(llama)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(STORIES / name, llama / name)
    assert convert_main([str(llama), str(tmp_path / "mor"), "--num-recursions", "3"]) == 0

    assert uptrain_main([str(tmp_path / "mor"), str(tmp_path / "up"), "--train-file", str(train_text),
                         "--max-steps", "1", "--per-device-train-batch-size", "2", "--eval-file", str(VALID_TEXT),
                         "--eval-max-tokens", "256", "--disable-tqdm"]) == 0
    figures = json.loads((tmp_path / "up" / "mor_card.json").read_text())
    assert figures["uptraining"]["tokens"] == 1 * 2 * 32
    assert figures["perplexity"]["MoR after uptraining"]["block_size"] == 32
    assert figures["perplexity"]["MoR before uptraining"]["block_size"] == 32
    capsys.readouterr()

    # A longer block than the model's context is refused before loading it.
    assert uptrain_main([str(tmp_path / "mor"), str(tmp_path / "up2"), "--train-file", str(train_text),
                         "--max-steps", "1", "--block-size", "64"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "max_position_embeddings" in error and "32" in error
    assert not (tmp_path / "up2").exists()


def _interrupt_at_step(monkeypatch, step):
    """Ctrl-C (KeyboardInterrupt, which is also what SIGTERM becomes) when training reaches `step`."""
    training_step = UptrainTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(UptrainTrainer, "training_step", interrupted)


def test_an_uptraining_interrupted_before_its_first_checkpoint_leaves_nothing(converted, train_text, tmp_path,
                                                                              monkeypatch, capsys):
    output = tmp_path / "up"
    _interrupt_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _uptrain(converted, output, train_text, "--max-steps", "6", "--save-steps", "3")
    assert list(tmp_path.iterdir()) == []  # no OUTPUT_DIR, no hidden staging folder
    capsys.readouterr()

    assert uptrain_main([str(converted), str(output), "--train-file", str(train_text), "--max-steps", "6",
                         "--resume-from-checkpoint", "latest"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "no checkpoint" in error
    assert list(tmp_path.iterdir()) == []


def test_an_uptraining_interrupted_after_a_checkpoint_resumes_from_latest(converted, train_text, tmp_path,
                                                                          monkeypatch):
    output = tmp_path / "up"
    _interrupt_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _uptrain(converted, output, train_text, "--max-steps", "6", "--save-steps", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["up"]
    assert [p.name for p in _checkpoints(output)] == ["checkpoint-2"]
    monkeypatch.undo()

    _uptrain(converted, output, train_text, "--max-steps", "4", "--save-steps", "2", "--resume-from-checkpoint",
             "latest")
    assert [entry["step"] for entry in last_log_history(output) if "loss" in entry] == [1, 2, 3, 4]
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["up"]


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_terminated_uptraining_leaves_no_partial_folder(converted, train_text, tmp_path, kill_signal):
    output = tmp_path / "terminated"
    process = subprocess.Popen(
        [sys.executable, "-m", "conversion.uptrain", str(converted), str(output), "--train-file", str(train_text),
         "--max-steps", "100000", "--save-steps", "100000", "--block-size", "64", "--disable-tqdm"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C's default action, which a shell running the tests in the background would hand down ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".terminated.incomplete-*")):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # training, well before the first checkpoint
    process.send_signal(kill_signal)
    printed, _ = process.communicate(timeout=60)
    # Issue 18, item 6: one line and the shell's status for the signal (130 for Ctrl-C), no traceback.
    assert process.returncode == 128 + kill_signal, printed[-3000:]
    assert printed.strip().splitlines()[-1].startswith("error: interrupted by "), printed[-3000:]
    assert "Traceback" not in printed
    assert list(tmp_path.iterdir()) == []


def test_uptraining_with_a_router_fit_records_it_and_calibrates_after_it(converted, train_text, tmp_path, capsys):
    output = tmp_path / "fit"
    _uptrain(converted, output, train_text, "--max-steps", "4", "--save-steps", "4", "--router-fit-tokens", "512",
             "--router-fit-at", "1", "--layer-budget", "0.8")
    printed = capsys.readouterr().out
    assert "router fit after training: step 2's router tells the costliest tokens from the rest" in printed
    summary = json.loads((output / "training_summary.json").read_text())
    assert set(summary["router_fit"]) == {"1", "2"} and summary["router_fit"]["1"]["tokens"] == 512
    assert summary["router_calibration"]["layer_fraction"] <= 0.8
    assert "measured on 512 training tokens) after training." in (output / "README.md").read_text()


def test_router_fit_within_a_time_budget_reserves_its_time(converted, train_text, tmp_path, capsys):
    _uptrain(converted, tmp_path / "timed", train_text, "--max-minutes", "0.2", "--router-fit-tokens", "256",
             "--router-fit-at", "1")
    assert "training stops" in capsys.readouterr().out


@pytest.mark.parametrize("convert_options, expected", [
    (["--router-inference", "threshold"], "Fix: convert with --router-inference auxiliary"),
    (["--routing", "none"], "this model has none"),
])
def test_router_fit_refuses_a_model_without_auxiliary_deciding_routers(train_text, tmp_path, capsys,
                                                                      convert_options, expected):
    model = tmp_path / "converted"
    assert convert_main([str(STORIES), str(model), "--num-recursions", "3", *convert_options]) == 0
    error = one_error_line(uptrain_main, capsys, [model, tmp_path / "out", "--train-file", train_text,
                                                  "--max-steps", "1", "--router-fit-tokens", "256"])
    assert "--router-fit-tokens" in error and expected in error
    assert not (tmp_path / "out").exists()


def test_a_router_fit_inside_training_lets_the_fitted_routers_choose_from_there(converted, train_text, tmp_path,
                                                                                capsys):
    output = tmp_path / "fit-at"
    _uptrain(converted, output, train_text, "--max-steps", "6", "--save-steps", "6", "--router-fit-tokens", "512",
             "--router-fit-at", "0.5")
    assert "router fit at step 3: step 2's router tells the costliest tokens" in capsys.readouterr().out
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["router_fit"]["at_step"] == 3 and summary["router_fit"]["1"]["tokens"] == 512
    assert json.loads((output / "config.json").read_text())["router_selection"] == "auxiliary"
    assert "tokens) at step 3, and chose who takes each recursion step" in (output / "README.md").read_text()


def test_router_fit_at_without_a_fit_is_refused(converted, train_text, tmp_path, capsys):
    error = one_error_line(uptrain_main, capsys, [converted, tmp_path / "out", "--train-file", train_text,
                                                  "--max-steps", "1", "--router-fit-tokens", "0", "--router-fit-at", "0.5"])
    assert "--router-fit-tokens 0 turns it off. Fix: leave one of them out." in error
    assert not (tmp_path / "out").exists()


def test_uptraining_fits_the_routers_halfway_by_default(converted, train_text, tmp_path, capsys):
    """mor-uptrain's default is the recipe's: the fit on up to DEFAULT_ROUTER_FIT_TOKENS training tokens (all of this
    small text's blocks), once half the budget is spent."""
    output = tmp_path / "default"
    _uptrain(converted, output, train_text, "--max-steps", "4", "--save-steps", "4")
    assert "router fit at step 2: " in capsys.readouterr().out
    summary = json.loads((output / "training_summary.json").read_text())
    tokens = summary["router_fit"]["1"]["tokens"]
    assert summary["router_fit"]["at_step"] == 2 and 0 < tokens <= DEFAULT_ROUTER_FIT_TOKENS and tokens % 64 == 0
    assert json.loads((output / "config.json").read_text())["router_selection"] == "auxiliary"


def test_a_run_begun_without_the_router_fit_resumes_without_it(converted, train_text, tmp_path, capsys):
    """The default follows the run it resumes: a checkpoint saved before a pending fit says so (and the resumed run
    fits), one saved by a run without a fit has no record, and the default then stays off."""
    with_fit, without_fit = tmp_path / "with", tmp_path / "without"
    _uptrain(converted, with_fit, train_text, "--max-steps", "4", "--save-steps", "1", "--save-total-limit", "4")
    assert json.loads((with_fit / "checkpoint-1" / "router_fit.json").read_text()) == {"pending_at": 0.5}
    _uptrain(converted, without_fit, train_text, "--max-steps", "4", "--save-steps", "2", "--router-fit-tokens", "0")
    capsys.readouterr()
    _uptrain(converted, tmp_path / "resumed", train_text, "--max-steps", "4", "--resume-from-checkpoint",
             with_fit / "checkpoint-1")
    assert "router fit at step 2: " in capsys.readouterr().out
    _uptrain(converted, tmp_path / "resumed-off", train_text, "--max-steps", "4", "--resume-from-checkpoint",
             without_fit / "checkpoint-2")
    printed = capsys.readouterr().out
    assert f"Router fit: off, {without_fit / 'checkpoint-2'} was saved by a run without one" in printed
    assert "router fit at step" not in printed


def test_a_router_fit_asked_for_inside_the_block_wise_stage_is_refused(converted, train_text, tmp_path, capsys):
    error = one_error_line(uptrain_main, capsys, [converted, tmp_path / "out", "--train-file", train_text,
                                                  "--max-steps", "1", "--teacher", STORIES, "--block-wise-fraction",
                                                  "0.5", "--router-fit-tokens", "256"])
    assert "inside the block-wise stage (--block-wise-fraction 0.5)" in error
    assert "Fix: give --router-fit-at above 0.5, or leave the router fit options out." in error
    assert not (tmp_path / "out").exists()


def test_uptraining_a_model_without_deciding_routers_says_the_default_fit_is_off(train_text, tmp_path, capsys):
    model = tmp_path / "converted"
    assert convert_main([str(STORIES), str(model), "--num-recursions", "3", "--routing", "none"]) == 0
    capsys.readouterr()
    _uptrain(model, tmp_path / "out", train_text, "--max-steps", "1")
    printed = capsys.readouterr().out
    assert "Router fit: off, it fits the routers that decide who takes an expert-choice recursion step, and this " \
           "model has none" in printed
    assert "router_fit" not in json.loads((tmp_path / "out" / "training_summary.json").read_text())


def test_a_run_resumed_after_the_router_fit_goes_on_with_the_fitted_routers(converted, train_text, tmp_path, capsys):
    """A resume from a checkpoint saved after the fit neither fits again nor goes back to the gating routers' choice:
    its weights and optimizer state equal the uninterrupted run's."""
    options = ["--max-steps", "6", "--save-steps", "4", "--router-fit-tokens", "512", "--router-fit-at", "0.5"]
    straight = tmp_path / "straight"
    _uptrain(converted, straight, train_text, *options, "--save-total-limit", "2")
    assert (straight / "checkpoint-4" / "router_fit.json").is_file()
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    _uptrain(converted, resumed, train_text, *options, "--resume-from-checkpoint", straight / "checkpoint-4")
    assert "router fit at step" not in capsys.readouterr().out
    assert json.loads((resumed / "config.json").read_text())["router_selection"] == "auxiliary"
    assert json.loads((resumed / "training_summary.json").read_text())["router_fit"]["at_step"] == 3
    straight_weights = load_file(straight / "model.safetensors")
    resumed_weights = load_file(resumed / "model.safetensors")
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), name

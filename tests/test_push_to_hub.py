"""`python -m conversion.push_to_hub` pushes what a model repo needs and nothing else, and fails in one line.

The pushes go to the Hub-compatible server of tests/hub_server.py on 127.0.0.1, through the real `huggingface_hub`
client, in a fresh process (it reads HF_ENDPOINT at import time).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import STORIES_DIR, free_port, tiny_mor_config
from hub_server import DEFAULT_TOKEN, DEFAULT_USER, hub_environment, run_hub_client, running_hub_server
from modeling_mor import MoRForCausalLM


PROJECT_ROOT = Path(__file__).resolve().parents[1]

# What `Trainer` leaves in an uptraining OUTPUT_DIR besides the model: pickled optimizer, scheduler and RNG state,
# pickled training arguments, a second copy of the weights in every checkpoint, logs.
TRAINING_STATE = {
    "training_args.bin": b"pickled TrainingArguments",
    "trainer_state.json": b"{}",
    "all_results.json": b"{}",
    "notes.txt": b"my notes",
    "train_helper.py": b"print('a script of mine, not model code')\n",
    "checkpoint-2/model.safetensors": b"second copy of the weights",
    "checkpoint-2/config.json": b"{}",
    "checkpoint-2/optimizer.pt": b"pickled optimizer state",
    "checkpoint-2/scheduler.pt": b"pickled scheduler state",
    "checkpoint-2/rng_state.pth": b"pickled RNG state",
    "checkpoint-2/training_args.bin": b"pickled TrainingArguments",
    "checkpoint-2/trainer_state.json": b"{}",
    "runs/events.out.tfevents.1": b"tensorboard log",
    "pytorch_model.bin": b"pickled weights",
}


def run_push(*arguments, env):
    return subprocess.run(
        [sys.executable, "-m", "conversion.push_to_hub", *map(str, arguments)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def folder_digest(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


@pytest.fixture
def uptrained_folder(tmp_path):
    """A folder laid out as `conversion.uptrain` leaves it: the model, its tokenizer, card and loss curve at the top,
    and Trainer's state (checkpoint-N/ with optimizer.pt etc., training_args.bin, logs) around it."""
    folder = tmp_path / "uptrained"
    MoRForCausalLM(tiny_mor_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# An MoR model\n")
    (folder / "mor_card.json").write_text("{}\n")
    (folder / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    model_files = {path.name for path in folder.iterdir()}
    for name, data in TRAINING_STATE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, model_files


def test_model_files_are_the_model_and_nothing_else(uptrained_folder):
    from conversion.push_to_hub import model_repo_files

    folder, model_files = uptrained_folder
    pushed, left_out = model_repo_files(folder)
    assert set(pushed) == model_files
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_mor.py", "configuration_mor.py",
            "cache_mor.py", "routing_mor.py", "relaxation_mor.py", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss_curve.png"} <= set(pushed)
    assert set(left_out) == {"checkpoint-2/", "runs/", "training_args.bin", "trainer_state.json", "all_results.json",
                             "notes.txt", "train_helper.py", "pytorch_model.bin"}


def test_push_leaves_the_training_state_out_of_the_repo(uptrained_folder, tmp_path):
    folder, model_files = uptrained_folder
    before = folder_digest(folder)
    with running_hub_server(tmp_path / "hub") as url:
        env = hub_environment(url, DEFAULT_TOKEN, tmp_path / "home")
        result = run_push(folder, f"{DEFAULT_USER}/uptrained", env=env)
        assert result.returncode == 0, result.stderr
        listed = run_hub_client(
            f"""
            import json
            from huggingface_hub import HfApi
            print(json.dumps(HfApi().list_repo_files({f"{DEFAULT_USER}/uptrained"!r})))
            """,
            env,
        )
    repo_files = set(json.loads(listed.strip().splitlines()[-1]))
    assert repo_files == model_files | {".gitattributes"}
    assert not [name for name in repo_files if name.endswith((".pt", ".pth", ".bin")) or "/" in name]
    assert "left out" in result.stdout and "checkpoint-2/" in result.stdout
    assert folder_digest(folder) == before  # nothing written into the folder (no upload cache either)


def test_unreachable_hub_is_one_error_line(uptrained_folder, tmp_path):
    folder, _ = uptrained_folder
    before = folder_digest(folder)
    env = hub_environment(f"http://127.0.0.1:{free_port()}", DEFAULT_TOKEN, tmp_path / "home")
    result = run_push(folder, f"{DEFAULT_USER}/model", env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not reach the Hub endpoint http://127.0.0.1:"), lines
    assert "HF_ENDPOINT" in lines[0] and "network" in lines[0] and "token" in lines[0]
    assert folder_digest(folder) == before


@pytest.mark.parametrize("layout", ["missing", "no_config", "no_weights"])
def test_a_folder_that_is_not_a_model_is_refused_before_any_request(layout, tmp_path):
    folder = tmp_path / "folder"
    if layout != "missing":
        folder.mkdir()
        (folder / "notes.txt").write_text("notes")
    if layout == "no_weights":
        (folder / "config.json").write_text(json.dumps(tiny_mor_config().to_dict()))
    # No server at all: the folder is refused before the Hub is contacted.
    env = hub_environment(f"http://127.0.0.1:{free_port()}", DEFAULT_TOKEN, tmp_path / "home")
    result = run_push(folder, f"{DEFAULT_USER}/model", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "could not reach" not in lines[0], lines
    expected = {"missing": "does not exist", "no_config": "no config.json", "no_weights": "no *.safetensors"}[layout]
    assert expected in lines[0]


def test_offline_mode_is_named(uptrained_folder, tmp_path):
    folder, _ = uptrained_folder
    env = {**hub_environment(f"http://127.0.0.1:{free_port()}", DEFAULT_TOKEN, tmp_path / "home"),
           "HF_HUB_OFFLINE": "1"}
    result = run_push(folder, f"{DEFAULT_USER}/model", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], lines
    # Issue 23, item 4: refused before it says what it would push.
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize("damage", ["truncated", "header only"])
def test_corrupt_weights_are_refused_before_any_request(uptrained_folder, tmp_path, damage):
    """Issue 23, item 4: a truncated model.safetensors was uploaded (exit 0, "Pushed"), while every other tool
    refuses the folder."""
    folder, _ = uptrained_folder
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:100])
    before = folder_digest(folder)
    # No server at all: the folder is refused before the Hub is contacted.
    env = hub_environment(f"http://127.0.0.1:{free_port()}", DEFAULT_TOKEN, tmp_path / "home")
    result = run_push(folder, f"{DEFAULT_USER}/model", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights} is not a readable safetensors file"), lines
    assert "corrupt or truncated; nothing was pushed. Fix: download or copy the checkpoint again." in lines[0]
    assert result.stdout == ""
    assert folder_digest(folder) == before


def test_a_repeated_push_says_that_nothing_changed(uptrained_folder, tmp_path):
    """Issue 23, item 4: pushing an unchanged folder again printed "Pushed ..." and then huggingface_hub's "No files
    have been modified ... Skipping"; now one line says what happened, and a changed file is pushed alone."""
    folder, model_files = uptrained_folder
    repo = f"{DEFAULT_USER}/again"
    with running_hub_server(tmp_path / "hub") as url:
        env = hub_environment(url, DEFAULT_TOKEN, tmp_path / "home")
        first = run_push(folder, repo, env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[-1].startswith(f"Pushed {len(model_files)} files of {folder} to {url}")
        second = run_push(folder, repo, env=env)
        assert second.returncode == 0, second.stderr
        assert second.stderr == ""
        assert second.stdout.splitlines()[-1] == (
            f"Nothing to push: {repo} already holds the {len(model_files)} files of {folder} unchanged, so no commit "
            f"was made ({first.stdout.splitlines()[-1].split(' to ')[1].rstrip('.')})."
        ), second.stdout
        assert "Pushed" not in second.stdout
        (folder / "README.md").write_text("---\nlicense: mit\n---\n# An MoR model, described better\n")
        third = run_push(folder, repo, env=env)
    assert third.returncode == 0 and third.stderr == "", third.stderr
    assert third.stdout.splitlines()[-1].endswith(
        f"; {len(model_files) - 1} of them were already there unchanged."), third.stdout


def test_an_invalid_repo_id_is_refused_before_any_request(uptrained_folder, tmp_path):
    folder, _ = uptrained_folder
    env = hub_environment(f"http://127.0.0.1:{free_port()}", DEFAULT_TOKEN, tmp_path / "home")
    result = run_push(folder, "someone/two/slashes", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 'someone/two/slashes' is not a valid repo id"), lines

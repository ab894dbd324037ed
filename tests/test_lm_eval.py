"""An MoR folder runs as an lm-evaluation-harness `hf` model on the local task evaluation/lm_eval_tasks/mor_tiny_mc,
and lm-eval's log-likelihoods and accuracy agree with evaluation/core.py on the same questions.

Equivalent command line (from the repository root):

    lm_eval run --model hf --model_args pretrained=FOLDER,trust_remote_code=True,add_bos_token=True \
        --tasks mor_tiny_mc --include_path evaluation/lm_eval_tasks --num_fewshot 3 --device cpu --batch_size 8
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from evaluation import choice_loglikelihoods, load_model_and_tokenizer, load_multiple_choice_items
from modeling_mor import MoRForCausalLM

from conftest import STORIES_DIR, import_or_missing, mixed_routing_model, tiny_mor_config


lm_eval = import_or_missing("lm_eval", "lm-eval is not installed (pip install -e '.[lm-eval]'; the dev extra has it)")

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO_ROOT / "evaluation" / "lm_eval_tasks"
MC_FILE = REPO_ROOT / "examples" / "data" / "tiny_stories_mc.jsonl"


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The model is tiny: a second thread buys nothing, and on a shared machine its synchronisation is costly."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mixed_mor_dir(tmp_path_factory):
    """A tiny random MoR whose routers send tokens to every depth, saved with the stories260K tokenizer."""
    torch.manual_seed(0)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(vocab_size=512, max_position_embeddings=512))).eval()
    folder = tmp_path_factory.mktemp("mixed_mor_lm_eval")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


def test_mor_folder_as_lm_eval_hf_model(mixed_mor_dir, monkeypatch, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # The task's data_files path is relative to the repository root, as when lm_eval runs from there.
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    limit, num_fewshot = 4, 2
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={mixed_mor_dir},trust_remote_code=True,add_bos_token=True",
        tasks=["mor_tiny_mc"],
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=4,
        device="cpu",
        # Only the project's tasks: indexing the hundreds of built-in ones takes most of the time otherwise.
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    task_results = results["results"]["mor_tiny_mc"]
    samples = sorted(results["samples"]["mor_tiny_mc"], key=lambda sample: sample["doc_id"])
    assert len(samples) == limit

    # The same questions through evaluation/core.py: the prompts are built the same way (the first items other than
    # the one asked as examples), so the log-likelihood of every choice must agree.
    items = load_multiple_choice_items(MC_FILE)[:limit]
    model, tokenizer = load_model_and_tokenizer(str(mixed_mor_dir))
    expected = choice_loglikelihoods(model, tokenizer, items, num_fewshot=num_fewshot, show_progress=False)
    lm_eval_loglikelihoods = [[float(response[0][0]) for response in sample["resps"]] for sample in samples]
    for ours, theirs in zip(expected, lm_eval_loglikelihoods):
        assert theirs == pytest.approx(ours, abs=1e-4), json.dumps({"ours": ours, "lm_eval": theirs})

    correct = [max(range(4), key=scores.__getitem__) == item["answer"] for scores, item in zip(expected, items)]
    assert task_results["acc,none"] == pytest.approx(sum(correct) / limit)
    assert 0.0 <= task_results["acc_norm,none"] <= 1.0

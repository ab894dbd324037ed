"""transformers pipelines on tiny random MoR checkpoints that the tests build offline (with the stories260K
tokenizer the repository ships): `text-generation` from an MoRForCausalLM folder and `text-classification` from an
MoRForSequenceClassification folder, in this process and as remote code in a fresh one."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from modeling_mor import MoRForCausalLM, MoRForSequenceClassification

from conftest import STORIES_DIR, mixed_routing_model, tiny_mor_config
from test_save_load import run_isolated


PROMPT = "Once upon a time"
TEXTS = ["Once upon a time", "The little dog was happy."]
ID2LABEL = {0: "sad", 1: "happy", 2: "neutral"}
MAX_NEW_TOKENS = 12


def tiny_stories_config(**overrides):
    """The tiny test dimensions with the stories260K tokenizer's vocabulary and special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES_DIR)
    fields = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        routing="expert_choice",
    )
    fields.update(overrides)
    return tiny_mor_config(**fields)


@pytest.fixture(scope="module")
def generation_checkpoint(tmp_path_factory):
    """A random expert-choice MoRForCausalLM (N_r = 3, mixed routing) saved with its tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipelines") / "mor-tiny-causal-lm"
    model = mixed_routing_model(MoRForCausalLM(tiny_stories_config()))
    with torch.no_grad():
        # Sharper next-token distributions than std-0.02 logits, so that the greedy choice is far from ties.
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classification_checkpoint(tmp_path_factory):
    """A random expert-choice MoRForSequenceClassification with named labels, saved with its tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipelines") / "mor-tiny-classifier"
    config = tiny_stories_config(id2label=ID2LABEL, label2id={label: i for i, label in ID2LABEL.items()})
    model = mixed_routing_model(MoRForSequenceClassification(config))
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # distinct label scores
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_DIR).save_pretrained(folder)
    return folder


def greedy_reference(folder) -> str:
    """The greedy continuation of PROMPT through model.generate, decoded as the pipeline decodes it."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    sequences = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + MAX_NEW_TOKENS  # no early end of sequence
    return tokenizer.decode(sequences[0], skip_special_tokens=True)


def classification_reference(folder) -> list[dict]:
    """Every label's probability for each of TEXTS, straight from the model's logits."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    results = []
    for text in TEXTS:
        with torch.no_grad():
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        results.append({model.config.id2label[i]: p.item() for i, p in enumerate(probabilities)})
    return results


def test_text_generation_pipeline_from_a_saved_folder(generation_checkpoint):
    generator = pipeline(
        "text-generation", model=str(generation_checkpoint), tokenizer=str(generation_checkpoint),
        trust_remote_code=True,
    )
    assert isinstance(generator.model, MoRForCausalLM)  # the installed package: its classes are registered
    text = generator(PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text == greedy_reference(generation_checkpoint)
    # return_full_text=False gives the continuation only.
    continuation = generator(PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_full_text=False)
    assert PROMPT + continuation[0]["generated_text"] == text


def test_text_classification_pipeline_uses_the_config_labels(classification_checkpoint):
    classifier = pipeline(
        "text-classification", model=str(classification_checkpoint), tokenizer=str(classification_checkpoint),
        trust_remote_code=True,
    )
    assert isinstance(classifier.model, MoRForSequenceClassification)
    expected = classification_reference(classification_checkpoint)
    best = classifier(TEXTS)
    every_label = classifier(TEXTS, top_k=None)
    for row, probabilities in enumerate(expected):
        label, probability = max(probabilities.items(), key=lambda item: item[1])
        assert best[row]["label"] == label and abs(best[row]["score"] - probability) <= 1e-6
        assert {entry["label"] for entry in every_label[row]} == set(ID2LABEL.values())
        for entry in every_label[row]:
            assert abs(entry["score"] - probabilities[entry["label"]]) <= 1e-6


def test_pipelines_run_the_checkpoints_remote_code_in_a_fresh_process(
    tmp_path, generation_checkpoint, classification_checkpoint
):
    stdout = run_isolated(
        f"""
        import builtins, json
        from transformers import pipeline

        def no_question(*args, **kwargs):
            raise AssertionError(f"asked a question: {{args}}")

        builtins.input = no_question
        results = {{}}
        generator = pipeline("text-generation", model={str(generation_checkpoint)!r}, trust_remote_code=True)
        classifier = pipeline("text-classification", model={str(classification_checkpoint)!r}, trust_remote_code=True)
        for task_pipeline in (generator, classifier):
            assert type(task_pipeline.model).__module__.startswith("transformers_modules"), type(task_pipeline.model)
        results["text"] = generator({PROMPT!r}, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)[0]["generated_text"]
        results["labels"] = classifier({TEXTS!r}, top_k=None)
        print(json.dumps(results))
        """,
        cwd=tmp_path,
    )
    results = json.loads(stdout.strip().splitlines()[-1])
    assert results["text"] == greedy_reference(generation_checkpoint)
    for row, probabilities in enumerate(classification_reference(classification_checkpoint)):
        assert {entry["label"] for entry in results["labels"][row]} == set(ID2LABEL.values())
        for entry in results["labels"][row]:
            assert abs(entry["score"] - probabilities[entry["label"]]) <= 1e-6

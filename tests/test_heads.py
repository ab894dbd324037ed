"""Task heads: MoRForSequenceClassification, MoRForTokenClassification and MoRForQuestionAnswering, built on
transformers' generic heads. Checked against Llama's own heads, through the Auto classes (installed package and
remote code in a fresh process), with Trainer and with PEFT's SEQ_CLS task."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    Trainer,
    TrainingArguments,
)

from conversion import convert_llama_to_mor
from modeling_mor import (
    MoRForCausalLM,
    MoRForQuestionAnswering,
    MoRForSequenceClassification,
    MoRForTokenClassification,
    MoRModel,
)
from modeling_mor.peft_mor import router_linear_names

from conftest import mixed_routing_model, tiny_llama, tiny_mor_config
from test_save_load import run_isolated


# task -> (MoR head, Llama head, Auto class)
HEADS = {
    "sequence_classification": (
        MoRForSequenceClassification, LlamaForSequenceClassification, AutoModelForSequenceClassification
    ),
    "token_classification": (MoRForTokenClassification, LlamaForTokenClassification, AutoModelForTokenClassification),
    "question_answering": (MoRForQuestionAnswering, LlamaForQuestionAnswering, AutoModelForQuestionAnswering),
}
NUM_LABELS = 3
PAD = 0


def padded_batch(vocab_size, seq_len=10):
    """Three rows: full, right-padded and left-padded, with PAD only where the attention mask is 0."""
    input_ids = torch.randint(PAD + 1, vocab_size, (3, seq_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    attention_mask[2, :4] = 0
    input_ids[attention_mask == 0] = PAD
    return input_ids, attention_mask


def task_labels(task, input_ids, attention_mask) -> dict:
    """Labels in the form each head takes; padding is ignored (-100) for token classification."""
    generator = torch.Generator().manual_seed(1)
    batch_size, seq_len = input_ids.shape
    if task == "sequence_classification":
        return {"labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)}
    if task == "token_classification":
        labels = torch.randint(0, NUM_LABELS, (batch_size, seq_len), generator=generator)
        return {"labels": labels.masked_fill(attention_mask == 0, -100)}
    # Answer spans inside each row's real tokens.
    first_real = attention_mask.argmax(-1)
    return {"start_positions": first_real + 1, "end_positions": first_real + 4}


def head_outputs(outputs, task, attention_mask) -> dict[str, torch.Tensor]:
    """The head's outputs that carry meaning: per-token outputs at real tokens only (what a padded position holds
    is not specified by either model)."""
    real = attention_mask.bool()
    if task == "sequence_classification":
        return {"logits": outputs.logits}
    if task == "token_classification":
        return {"logits": outputs.logits[real]}
    return {"start_logits": outputs.start_logits[real], "end_logits": outputs.end_logits[real]}


def head_config(config, **overrides):
    config = copy.deepcopy(config)
    config.num_labels = NUM_LABELS
    config.pad_token_id = PAD
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def llama_and_mor_heads(task, attn_implementation):
    """A Llama head and the MoR head (routing "none", N_r = 1, converted with the public conversion function) with
    the same weights: the converted base model, and the Llama head's own randomly initialized output layer."""
    mor_class, llama_class, _ = HEADS[task]
    llama_lm = tiny_llama(num_hidden_layers=6, attn_implementation=attn_implementation)
    mor_lm = convert_llama_to_mor(llama_lm, num_recursions=1, sharing_strategy="cycle", routing="none")
    llama_head = llama_class(head_config(llama_lm.config))
    # Llama's QA head calls its base model `transformer`, the others (and every MoR head) `model`.
    getattr(llama_head, llama_head.base_model_prefix).load_state_dict(llama_lm.model.state_dict())
    mor_head = mor_class(head_config(mor_lm.config))
    mor_head.model.load_state_dict(mor_lm.model.state_dict())
    with torch.no_grad():
        for name, module in llama_head.named_children():
            if name != llama_head.base_model_prefix:
                # A random head of std 0.02 gives logits near 0: scale it so that the comparison means something.
                for parameter in module.parameters():
                    parameter.mul_(20.0)
                getattr(mor_head, name).load_state_dict(module.state_dict())
    assert mor_head.config._attn_implementation == attn_implementation
    return llama_head.eval(), mor_head.eval()


def routed_head(task, **overrides):
    """An expert-choice head, N_r = 3, whose random routers make mixed decisions."""
    mor_class = HEADS[task][0]
    fields = dict(routing="expert_choice", num_labels=NUM_LABELS, pad_token_id=PAD)
    fields.update(overrides)
    return mixed_routing_model(mor_class(tiny_mor_config(**fields)))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("task", list(HEADS))
def test_single_recursion_head_equals_llama_head(task, attn_implementation):
    llama_head, mor_head = llama_and_mor_heads(task, attn_implementation)
    vocab_size = llama_head.config.vocab_size
    unpadded_ids = torch.randint(PAD + 1, vocab_size, (3, 10))
    for input_ids, attention_mask in [padded_batch(vocab_size), (unpadded_ids, torch.ones_like(unpadded_ids))]:
        labels = task_labels(task, input_ids, attention_mask)
        with torch.no_grad():
            expected = llama_head(input_ids, attention_mask=attention_mask, **labels)
            actual = mor_head(input_ids, attention_mask=attention_mask, **labels)
        expected_outputs = head_outputs(expected, task, attention_mask)
        actual_outputs = head_outputs(actual, task, attention_mask)
        for name, tensor in expected_outputs.items():
            assert tensor.abs().max().item() > 0.1, name  # not trivially near zero
            assert (actual_outputs[name] - tensor).abs().max().item() <= 1e-5, name
        # The QA loss is a softmax over every position, padding included, whose hidden states neither model specifies.
        if attention_mask.all() or task != "question_answering":
            assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5


def test_sequence_classification_pools_each_rows_last_real_token():
    _, mor_head = llama_and_mor_heads("sequence_classification", "eager")
    input_ids, attention_mask = padded_batch(mor_head.config.vocab_size)
    with torch.no_grad():
        batched = mor_head(input_ids, attention_mask=attention_mask).logits
        for row in range(input_ids.shape[0]):
            alone = mor_head(input_ids[row : row + 1][attention_mask[row : row + 1].bool()].unsqueeze(0)).logits
            assert (batched[row] - alone[0]).abs().max().item() <= 1e-5, row


@pytest.mark.parametrize("task", list(HEADS))
def test_installed_package_registers_the_heads_with_the_auto_classes(tmp_path, task):
    mor_class, _, auto_class = HEADS[task]
    config = tiny_mor_config(num_labels=NUM_LABELS, pad_token_id=PAD)
    head = auto_class.from_config(config)
    assert type(head) is mor_class and type(head.model) is MoRModel
    head.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [mor_class.__name__]
    assert saved["auto_map"][auto_class.__name__] == f"modeling_mor.{mor_class.__name__}"
    # The remote code travels with a head checkpoint as with a causal LM one.
    assert {"modeling_mor.py", "configuration_mor.py", "routing_mor.py"} <= {path.name for path in tmp_path.iterdir()}
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is mor_class
    input_ids, attention_mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = head_outputs(head.eval()(input_ids, attention_mask=attention_mask), task, attention_mask)
        actual = head_outputs(loaded.eval()(input_ids, attention_mask=attention_mask), task, attention_mask)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("task", list(HEADS))
def test_routed_head_trains(task):
    head = routed_head(task).train()
    input_ids, attention_mask = padded_batch(head.config.vocab_size)
    with torch.no_grad():
        depth = head.model(input_ids, attention_mask=attention_mask).recursion_depth
    assert 0 < depth[attention_mask.bool()].float().mean() < 3  # the routing really is mixed
    outputs = head(input_ids, attention_mask=attention_mask, **task_labels(task, input_ids, attention_mask))
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    output_layer = head.qa_outputs if task == "question_answering" else head.score
    assert output_layer.weight.grad.abs().sum() > 0
    shared_layer = head.model.recursion_block.layers[0]
    assert shared_layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    # The gating routers get gradients from the task loss through the gates.
    router_gradients = [p.grad for p in head.model.recursion_block.routing.parameters() if p.grad is not None]
    assert router_gradients and all(torch.isfinite(g).all() for g in router_gradients)
    assert sum(g.abs().sum() for g in router_gradients) > 0


def test_routed_heads_load_as_remote_code_in_a_fresh_process(tmp_path):
    """AutoModelFor*.from_pretrained(trust_remote_code=True) where the project cannot be imported: the head's
    generic `AutoModel.from_config` finds the checkpoint's own MoRModel (no question asked), same outputs."""
    input_ids, attention_mask = padded_batch(tiny_mor_config().vocab_size, seq_len=12)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    expected = {}
    for task in HEADS:
        head = routed_head(task).eval()
        head.save_pretrained(tmp_path / f"mor-{task}")
        with torch.no_grad():
            expected[task] = head_outputs(head(input_ids, attention_mask=attention_mask), task, attention_mask)
    run_isolated(
        f"""
        import builtins, torch
        from transformers import (
            AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification,
        )

        def no_question(*args, **kwargs):
            raise AssertionError(f"asked a question: {{args}}")

        builtins.input = no_question
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        outputs = {{}}
        for task, auto_class in [
            ("sequence_classification", AutoModelForSequenceClassification),
            ("token_classification", AutoModelForTokenClassification),
            ("question_answering", AutoModelForQuestionAnswering),
        ]:
            head = auto_class.from_pretrained({str(tmp_path)!r} + f"/mor-{{task}}", trust_remote_code=True).eval()
            for module in (head, head.model):
                assert type(module).__module__.startswith("transformers_modules"), type(module).__module__
            with torch.no_grad():
                # Only the tensors: a sequence-classification output also holds the remote code's cache.
                outputs[task] = {{k: v for k, v in head(**inputs).items() if k.endswith("logits")}}
        torch.save(outputs, {str(tmp_path / "outputs.pt")!r})
        """,
        cwd=tmp_path,
    )
    actual = torch.load(tmp_path / "outputs.pt")
    for task in HEADS:
        outputs = SimpleNamespace(**actual[task])
        for name, tensor in head_outputs(outputs, task, attention_mask).items():
            # Identical up to float rounding between processes (as in test_save_load).
            assert (tensor - expected[task][name]).abs().max().item() <= 1e-6, (task, name)


class LastTokenClasses(Dataset):
    """A learnable toy classification set: the label is the last token's id modulo NUM_LABELS."""

    def __init__(self, vocab_size, num_examples=64, seq_len=8):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(PAD + 1, vocab_size, (num_examples, seq_len), generator=generator)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index, -1] % NUM_LABELS}


def training_arguments(output_dir, max_steps):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_lowers_the_sequence_classification_loss(tmp_path):
    head = routed_head("sequence_classification")
    trainer = Trainer(
        model=head, args=training_arguments(tmp_path, 20), train_dataset=LastTokenClasses(head.config.vocab_size)
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4


def test_peft_seq_cls_trains_saves_and_reloads_the_score_head(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    head = routed_head("sequence_classification")
    head.save_pretrained(tmp_path / "base")
    base_state = {name: tensor.clone() for name, tensor in head.state_dict().items()}
    # No target_modules: the default PEFT takes for model_type "mor" (registered by the package).
    peft_model = get_peft_model(head, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("score.modules_to_save" in name for name in trainable)
    assert trainable and all("lora_" in name or "score.modules_to_save" in name for name in trainable)

    trainer = Trainer(
        model=peft_model, args=training_arguments(tmp_path / "run", 6),
        train_dataset=LastTokenClasses(head.config.vocab_size),
    )
    trainer.train()
    assert all(map(torch.isfinite, torch.tensor(logged_losses(trainer))))
    trained_score = peft_model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(trained_score, base_state["score.weight"])

    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    adapter_keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any(key.endswith("score.weight") for key in adapter_keys)
    assert any("lora_A" in key for key in adapter_keys)

    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    input_ids, attention_mask = padded_batch(head.config.vocab_size)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids, attention_mask=attention_mask).logits
        actual = reloaded(input_ids, attention_mask=attention_mask).logits
    # Equal up to float rounding (seen: 3e-8): the reloaded model computes the same sums in another order.
    assert (actual - expected).abs().max().item() <= 1e-6


def test_head_loss_adds_the_router_losses():
    """As MoRForCausalLM's loss does: without them, fine-tuning a head never trains the eval-mode routing rule (the
    routers' BCE auxiliary loss), so eval routing drifts from what training routed."""
    head = routed_head("sequence_classification", router_aux_loss_coef=0.5).train()
    input_ids, attention_mask = padded_batch(head.config.vocab_size)
    labels = task_labels("sequence_classification", input_ids, attention_mask)["labels"]
    with torch.no_grad():
        outputs = head(input_ids, attention_mask=attention_mask, labels=labels)
        router_losses = head.model(input_ids, attention_mask=attention_mask).router_losses
    expected = torch.nn.functional.cross_entropy(outputs.logits, labels) + 0.5 * router_losses["router_aux_loss"]
    assert router_losses["router_aux_loss"] > 0
    assert torch.allclose(outputs.loss, expected)


def test_heads_expose_their_routers():
    """peft_mor.router_linear_names(head) is silently empty when the head has no `routers()`."""
    config = tiny_mor_config(num_labels=NUM_LABELS, pad_token_id=PAD)
    causal_names = router_linear_names(MoRForCausalLM(config))
    head_names = router_linear_names(MoRForSequenceClassification(config))
    assert causal_names and head_names == causal_names

"""Training: Trainer lowers the loss; gradient checkpointing (both modes) gives the same loss and gradients."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config
from test_heads import HEADS, NUM_LABELS, PAD, padded_batch, task_labels


class RepeatingTokens(Dataset):
    """A learnable toy corpus: short repeating patterns."""

    def __init__(self, vocab_size, num_examples=64, seq_len=16):
        generator = torch.Generator().manual_seed(0)
        patterns = torch.randint(0, vocab_size, (8, 4), generator=generator)
        self.examples = [patterns[i % 8].repeat(seq_len // 4) for i in range(num_examples)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return {"input_ids": self.examples[index], "labels": self.examples[index]}


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_trainer_steps_lower_the_loss(tmp_path, routing):
    model = MoRForCausalLM(tiny_mor_config(routing=routing))
    dataset = RepeatingTokens(model.config.vocab_size)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


# Every (sharing strategy, routing) a config accepts; num_recursions fits 8 layers.
STRATEGY_ROUTINGS = [
    dict(sharing_strategy="middle_cycle", num_recursions=3, routing="expert_choice"),
    dict(sharing_strategy="middle_cycle", num_recursions=3, routing="token_choice"),
    dict(sharing_strategy="cycle", num_recursions=2, routing="expert_choice"),
    dict(sharing_strategy="cycle", num_recursions=2, routing="token_choice"),
    dict(sharing_strategy="sequence", num_recursions=2, routing="none"),
    dict(sharing_strategy="middle_sequence", num_recursions=3, routing="none"),
]
HEAD_CLASSES = {"causal_lm": MoRForCausalLM, **{task: classes[0] for task, classes in HEADS.items()}}


@pytest.mark.parametrize("head", HEAD_CLASSES)
@pytest.mark.parametrize("kv_cache_policy", ["recursion_wise", "shared"])
@pytest.mark.parametrize("overrides", STRATEGY_ROUTINGS, ids=lambda o: f"{o['sharing_strategy']}-{o['routing']}")
def test_gradient_checkpointing_matches_plain_backward(overrides, kv_cache_policy, head):
    """Both checkpointing modes give the plain backward's loss and gradients. Reentrant checkpointing returns a
    layer's outputs as a plain tuple and backpropagates only into the layer's positional tensors (under the shared
    policy a deeper step reads step 1's keys)."""
    config = tiny_mor_config(**overrides, kv_cache_policy=kv_cache_policy, num_labels=NUM_LABELS, pad_token_id=PAD)
    config.classifier_dropout = 0.0  # the token-classification head's dropout would draw other masks in each pass
    model = mixed_routing_model(HEAD_CLASSES[head](config)).train()
    input_ids, attention_mask = padded_batch(config.vocab_size, seq_len=12)
    task = "token_classification" if head == "causal_lm" else head  # causal LM labels: the tokens, padding ignored
    targets = task_labels(task, input_ids, attention_mask)
    if head == "causal_lm":
        targets = {"labels": input_ids.masked_fill(attention_mask == 0, -100)}

    def loss_and_gradients():
        model.zero_grad()
        loss = model(input_ids, attention_mask=attention_mask, **targets).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    for use_reentrant in (False, True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        assert model.is_gradient_checkpointing
        checkpointed_loss, checkpointed_gradients = loss_and_gradients()
        model.gradient_checkpointing_disable()
        assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6), use_reentrant
        assert plain_gradients.keys() == checkpointed_gradients.keys(), use_reentrant
        for name, gradient in plain_gradients.items():
            assert torch.allclose(gradient, checkpointed_gradients[name], atol=1e-5), (use_reentrant, name)

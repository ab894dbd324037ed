"""Training: Trainer lowers the loss; gradient checkpointing gives the same loss and gradients."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config


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


@pytest.mark.parametrize("overrides", [dict(routing="expert_choice"), dict(routing="token_choice", kv_cache_policy="shared")])
def test_gradient_checkpointing_matches_plain_backward(overrides):
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(**overrides))).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def loss_and_gradients():
        model.zero_grad()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6)
    assert plain_gradients.keys() == checkpointed_gradients.keys()
    for name, gradient in plain_gradients.items():
        assert torch.allclose(gradient, checkpointed_gradients[name], atol=1e-5), name

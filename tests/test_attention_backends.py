"""Attention backends and padding-free packed batches (issue 10, item 4).

References: a padded batch of the same documents (packed == padded, per document), the sdpa/eager forward for other
backends.
"""

import pytest
import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config


DOCUMENT_LENGTHS = (7, 4, 9)


def _documents(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (length,), generator=generator).tolist() for length in DOCUMENT_LENGTHS]


def _padded(documents):
    width = max(map(len, documents))
    input_ids = torch.zeros(len(documents), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, document in enumerate(documents):
        input_ids[row, : len(document)] = torch.tensor(document)
        attention_mask[row, : len(document)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(routing="none"),
        dict(routing="expert_choice"),
        dict(routing="expert_choice", kv_cache_policy="shared"),
        dict(routing="token_choice", balancing="loss"),
        dict(routing="none", sharing_strategy="cycle", num_hidden_layers=6),
    ],
    ids=lambda overrides: "-".join(str(value) for value in overrides.values()),
)
def test_padding_free_packed_batch_equals_padded_batch(overrides, training):
    torch.manual_seed(0)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(pad_token_id=0, **overrides)))
    model.train(training)
    model.config.router_aux_loss_coef = model.config.balance_loss_coef = 0.1
    documents = _documents(model.config.vocab_size)
    packed = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": document} for document in documents])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    padded = _padded(documents)

    with torch.no_grad():  # dropout is 0: train mode differs only by the training-time top-k and the losses
        packed_outputs = model(**packed, output_recursion_depth=True)
        padded_outputs = model(**padded, output_recursion_depth=True)
    real = padded["attention_mask"].bool()
    # Per document: the same logits and the same recursion depths (the training top-k picks per document).
    assert (packed_outputs.logits[0] - padded_outputs.logits[real]).abs().max().item() <= 1e-5
    assert torch.equal(packed_outputs.recursion_depth[0], padded_outputs.recursion_depth[real])
    assert torch.allclose(packed_outputs.lm_loss, padded_outputs.lm_loss, atol=1e-6)
    assert torch.allclose(packed_outputs.loss, padded_outputs.loss, atol=1e-6)
    if training and overrides["routing"] != "none":
        assert packed_outputs.loss > packed_outputs.lm_loss  # the router losses are part of both


def test_packed_documents_do_not_see_each_other():
    model = MoRForCausalLM(tiny_mor_config(routing="expert_choice", pad_token_id=0)).eval()
    model.set_attn_implementation("eager")
    documents = _documents(model.config.vocab_size)
    packed = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": document} for document in documents])
    with torch.no_grad():
        outputs = model(**packed, output_attentions=True)
    starts = torch.tensor([0, *torch.tensor(DOCUMENT_LENGTHS).cumsum(0).tolist()])
    for weights in outputs.attentions:
        for first, end in zip(starts[:-1], starts[1:]):
            # Queries of one document put no weight on an earlier document.
            assert torch.count_nonzero(weights[0, :, first:end, :first]) == 0


def test_attention_interface_registration_is_used():
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(routing="expert_choice", pad_token_id=0))).eval()
    input_ids = torch.randint(1, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("counting_sdpa")
        actual = model(input_ids, attention_mask=attention_mask).logits
        generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        assert torch.equal(generated, model.generate(input_ids[:1], max_new_tokens=4, do_sample=False))
    assert len(calls) >= model.config.num_hidden_layers  # every unrolled layer that ran went through it
    real = attention_mask.bool()
    assert (actual - expected)[real].abs().max().item() <= 1e-5


def test_flex_attention_on_cpu_equals_eager():
    """flex_attention runs forward-only on CPU with torch 2.13 (its CPU backward is not implemented by torch)."""
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(routing="expert_choice", pad_token_id=0))).eval()
    model.set_attn_implementation("eager")
    input_ids = torch.randint(1, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        greedy = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False)
        model.set_attn_implementation("flex_attention")
        actual = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        assert torch.equal(model.generate(input_ids[:1], max_new_tokens=3, do_sample=False), greedy)
    assert (actual - expected)[attention_mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"])
def test_flash_attention_is_refused_with_the_reason(implementation):
    model = MoRForCausalLM(tiny_mor_config())
    with pytest.raises(ValueError, match="not supported by MoR models.*Use 'sdpa'"):
        model.set_attn_implementation(implementation)
    with pytest.raises(ValueError, match="not supported by MoR models"):
        MoRForCausalLM(tiny_mor_config(attn_implementation=implementation))
    assert model.config._attn_implementation == "sdpa"

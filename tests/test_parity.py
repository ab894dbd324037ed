"""Parity with transformers' own LlamaForCausalLM (MOR_SPEC section 1, consistency anchors)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from conversion import convert_llama_to_mor
from modeling_mor import MoRForCausalLM

from conftest import tiny_llama


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_single_recursion_equals_llama(attn_implementation, strategy):
    llama = tiny_llama(num_hidden_layers=6, attn_implementation=attn_implementation)
    mor = convert_llama_to_mor(llama, num_recursions=1, sharing_strategy=strategy, routing="none").eval()
    assert mor.config._attn_implementation == attn_implementation
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = llama(input_ids).logits
        actual = mor(input_ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5


def _unrolled_llama(mor: MoRForCausalLM, attn_implementation: str, with_cache: bool = False) -> LlamaForCausalLM:
    """An independent reference: transformers' Llama whose layer list holds MoR's shared layers in unrolled order.
    `with_cache=True` gives every unrolled layer its own copy (its own layer index, hence its own cache layer)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    fields = {k: v for k, v in mor.config.to_dict().items() if k in LlamaConfig().to_dict()}
    fields.pop("model_type", None)
    config = LlamaConfig(**fields)
    config._attn_implementation = attn_implementation
    llama = LlamaForCausalLM(config).eval()
    copies = {}
    layers = []
    for position, module in enumerate(mor.model.unrolled_layers()):
        if with_cache or id(module) not in copies:
            copy = LlamaDecoderLayer(config, position)
            copy.load_state_dict(module.state_dict())
            copies[id(module)] = copy
        layers.append(copies[id(module)])
    llama.model.layers = torch.nn.ModuleList(layers)
    llama.model.embed_tokens.load_state_dict(mor.model.embed_tokens.state_dict())
    llama.model.norm.load_state_dict(mor.model.norm.state_dict())
    llama.lm_head.load_state_dict(mor.lm_head.state_dict())
    return llama.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "strategy,num_layers,num_recursions",
    [("cycle", 6, 2), ("cycle", 6, 3), ("sequence", 6, 3), ("middle_cycle", 8, 3), ("middle_sequence", 8, 2)],
)
def test_recursive_model_equals_unrolled_llama(attn_implementation, strategy, num_layers, num_recursions):
    llama = tiny_llama(num_hidden_layers=num_layers, attn_implementation=attn_implementation)
    mor = convert_llama_to_mor(llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none")
    mor.eval()
    reference = _unrolled_llama(mor, attn_implementation)
    assert len(reference.model.layers) == num_layers
    assert len({id(layer) for layer in reference.model.layers}) == mor.config.num_unique_layers
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = reference(input_ids, use_cache=False).logits
        actual = mor(input_ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5
    # The shared layers really are shared: the recursive model differs from the untied source.
    with torch.no_grad():
        assert (llama(input_ids).logits - actual).abs().max().item() > 1e-3


def test_converted_full_depth_expert_choice_equals_tied_llama():
    """MOR_SPEC section 5: with every token routed to full depth, a fresh conversion is the tied recursive Llama."""
    llama = tiny_llama(num_hidden_layers=8)
    mor = convert_llama_to_mor(
        llama, num_recursions=3, sharing_strategy="middle_cycle", routing="expert_choice", capacity=[1.0, 1.0, 1.0]
    ).eval()
    reference = _unrolled_llama(mor, "eager")
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 9))
    with torch.no_grad():
        outputs = mor(input_ids, output_recursion_depth=True)
        assert (outputs.logits - reference(input_ids, use_cache=False).logits).abs().max().item() <= 1e-5
    assert (outputs.recursion_depth == 3).all()


@pytest.mark.parametrize("strategy,num_recursions", [("middle_cycle", 3), ("cycle", 2)])
def test_fresh_default_conversion_starts_as_the_tied_model(strategy, num_recursions):
    """Default conversion (expert-choice, auxiliary routers, update gating): eval mode sends every token to full
    depth with neutral gates, so the converted model is the tied recursive Llama until uptraining."""
    llama = tiny_llama(num_hidden_layers=8)
    mor = convert_llama_to_mor(llama, num_recursions=num_recursions, sharing_strategy=strategy).eval()
    assert mor.config.router_inference == "auxiliary" and mor.config.capacity[-1] < 1
    reference = _unrolled_llama(mor, "eager")
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 9))
    with torch.no_grad():
        outputs = mor(input_ids, output_recursion_depth=True)
        assert (outputs.logits - reference(input_ids, use_cache=False).logits).abs().max().item() <= 1e-5
    assert (outputs.recursion_depth == num_recursions).all()


def test_eager_and_sdpa_agree_with_routing():
    llama = tiny_llama(num_hidden_layers=8)
    mor = convert_llama_to_mor(
        llama, num_recursions=3, sharing_strategy="middle_cycle", routing="expert_choice", router_inference="threshold"
    )
    with torch.no_grad():
        for router in mor.routers():
            torch.nn.init.normal_(router.scorer.weight, std=2.0)
    mor.eval()
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        mor.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = mor(input_ids, attention_mask=attention_mask, output_recursion_depth=True)
    assert torch.equal(outputs["eager"].recursion_depth, outputs["sdpa"].recursion_depth)
    assert 0 < outputs["eager"].recursion_depth[attention_mask.bool()].float().mean() < 3
    real = attention_mask.bool()
    assert (outputs["eager"].logits[real] - outputs["sdpa"].logits[real]).abs().max().item() <= 1e-5


def test_real_checkpoint_single_recursion_reproduces_logits(stories_dir):
    llama = LlamaForCausalLM.from_pretrained(stories_dir).eval()
    mor = convert_llama_to_mor(llama, num_recursions=1, sharing_strategy="cycle", routing="none").eval()
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert (mor(input_ids).logits - llama(input_ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("strategy,num_recursions", [("middle_cycle", 3), ("cycle", 2), ("sequence", 2)])
def test_full_rank_relaxation_reproduces_the_source(strategy, num_recursions):
    llama = tiny_llama(num_hidden_layers=8)
    full_rank = llama.config.hidden_size
    mor = convert_llama_to_mor(
        llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none", relaxation_rank=full_rank
    ).eval()
    low_rank = convert_llama_to_mor(
        llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none", relaxation_rank=full_rank // 2
    ).eval()
    tied = convert_llama_to_mor(llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none").eval()
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 10))
    with torch.no_grad():
        source = llama(input_ids).logits
        errors = [(m(input_ids).logits - source).abs().max().item() for m in (tied, low_rank, mor)]
        mean_errors = [(m(input_ids).logits - source).abs().mean().item() for m in (tied, low_rank, mor)]
    assert errors[2] <= 1e-4
    # A partial rank lies in between: the relaxation really closes the gap that tying opened.
    assert mean_errors[0] > mean_errors[1] > mean_errors[2]


# Custom 4-D attention masks, as transformers' tests build them: additive floats, 0 = attend, the minimum = masked.
def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _shared_prefix_inputs(vocab_size):
    """Three sequences sharing a 3-token prefix, packed into one row: each last token attends to the prefix and to
    itself only, at position 3 (transformers' `_get_custom_4d_mask_test_data`)."""
    tokens = torch.randint(1, vocab_size, (6,))
    separate = torch.stack([torch.cat([tokens[:3], tokens[3 + n : 4 + n]]) for n in range(3)])
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[4:, 3:] = torch.eye(3, dtype=torch.bool)[1:]
    return separate, tokens.unsqueeze(0), allowed[None, None], torch.tensor([[0, 1, 2, 3, 3, 3]])


def _padded_4d(batch, seq_len, padding_side):
    """A padded batch's 2-D mask and the 4-D mask that says the same: causal, real keys only."""
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row, padding in ((1, 3), (2, 5)):
        attention_mask[row, slice(None, padding) if padding_side == "left" else slice(-padding, None)] = 0
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    return attention_mask, (causal & attention_mask.bool()[:, None, :])[:, None]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy,num_recursions", [("cycle", 2), ("middle_cycle", 3)])
def test_custom_4d_mask_equals_llama_with_routing_none(attn_implementation, strategy, num_recursions):
    """A step attends with the rows and columns of the given mask for its tokens: with routing "none", shared-prefix
    and padded-batch 4-D masks give Llama's logits (with the same unrolled layers and the same mask)."""
    llama = tiny_llama(num_hidden_layers=8, attn_implementation=attn_implementation)
    mor = convert_llama_to_mor(llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none").eval()
    reference = _unrolled_llama(mor, attn_implementation)
    separate, packed, allowed, position_ids = _shared_prefix_inputs(mor.config.vocab_size)
    with torch.no_grad():
        expected = reference(packed, attention_mask=_additive(allowed), position_ids=position_ids, use_cache=False)
        actual = mor(packed, attention_mask=_additive(allowed), position_ids=position_ids)
        assert (actual.logits - expected.logits).abs().max().item() <= 1e-5
        # The packed row's last tokens are the three sequences' last tokens.
        alone = mor(separate).logits[:, -1]
        assert (actual.logits[0, 3:] - alone).abs().max().item() <= 1e-5

        input_ids = torch.randint(1, mor.config.vocab_size, (3, 9))
        for padding_side in ("left", "right"):
            attention_mask, padded = _padded_4d(3, 9, padding_side)
            real = attention_mask.bool()
            expected = reference(input_ids, attention_mask=_additive(padded), use_cache=False).logits
            actual = mor(input_ids, attention_mask=_additive(padded)).logits
            assert (actual[real] - expected[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", ["recursion_wise", "shared"])
@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_custom_4d_mask_equals_the_2d_path_with_routing(routing, policy):
    """With routing, a 4-D mask that says what a 2-D padding mask says gives the same logits and depths, also in a
    cached decode step; a shared-prefix mask gives each sequence what it gets alone (eval routing is causal)."""
    from conftest import mixed_routing_model, tiny_mor_config

    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(routing=routing, kv_cache_policy=policy))).eval()
    input_ids = torch.randint(1, model.config.vocab_size, (3, 9))
    next_ids = torch.randint(1, model.config.vocab_size, (3, 1))
    with torch.no_grad():
        for padding_side in ("left", "right"):
            attention_mask, padded = _padded_4d(3, 9, padding_side)
            real = attention_mask.bool()
            two_d = model(input_ids, attention_mask=attention_mask, output_recursion_depth=True)
            four_d = model(input_ids, attention_mask=_additive(padded), output_recursion_depth=True)
            assert torch.equal(two_d.recursion_depth, four_d.recursion_depth)
            assert two_d.recursion_depth[real].min() < two_d.recursion_depth[real].max()
            assert (two_d.logits[real] - four_d.logits[real]).abs().max().item() <= 1e-5
            # One cached decode step after the prompt: the new token sees every real token and itself.
            decode_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            two_d_step = model(next_ids, attention_mask=decode_mask, cache=two_d.cache, output_recursion_depth=True)
            four_d_step = model(next_ids, attention_mask=_additive(decode_mask.bool()[:, None, None, :]),
                                cache=four_d.cache, output_recursion_depth=True)
            assert torch.equal(two_d_step.recursion_depth, four_d_step.recursion_depth)
            assert (two_d_step.logits - four_d_step.logits).abs().max().item() <= 1e-5

        separate, packed, allowed, position_ids = _shared_prefix_inputs(model.config.vocab_size)
        for mask in (allowed, _additive(allowed)):  # boolean and additive
            packed_outputs = model(packed, attention_mask=mask, position_ids=position_ids, output_recursion_depth=True)
            alone = model(separate, output_recursion_depth=True)
            assert (packed_outputs.logits[0, 3:] - alone.logits[:, -1]).abs().max().item() <= 1e-5
            assert torch.equal(packed_outputs.recursion_depth[0, 3:], alone.recursion_depth[:, -1])


def test_custom_4d_masks_mor_cannot_read_are_refused():
    model = convert_llama_to_mor(tiny_llama(num_hidden_layers=6), num_recursions=2, sharing_strategy="cycle",
                                 routing="none").eval()
    input_ids = torch.randint(1, model.config.vocab_size, (1, 4))
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    with pytest.raises(ValueError, match=r"\[batch, 1, queries, past \+ queries\]"):
        model(input_ids, attention_mask=allowed[:, :, :3])
    with pytest.raises(ValueError, match="additive biases"):
        model(input_ids, attention_mask=_additive(allowed) - 1.0)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        model(input_ids, attention_mask=allowed.long())

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


def _unrolled_llama(mor: MoRForCausalLM, attn_implementation: str) -> LlamaForCausalLM:
    """An independent reference: transformers' Llama whose layer list holds MoR's shared layers in unrolled order."""
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
        if id(module) not in copies:
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

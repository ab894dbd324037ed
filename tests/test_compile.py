"""torch.compile (issue 10, item 5): the uncached forward compiles as one graph and gives the eager logits.

Under compilation without a cache, recursion steps keep every token in place (ActiveTokens.in_place) instead of
packing the active ones, so no shape depends on the routing. Cached decoding keeps its data-dependent packing (the
cache stores only the tokens that take each step): it runs compiled, with graph breaks.
"""

import pytest
import torch
from transformers import CompileConfig

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config


def _model(**overrides):
    fields = dict(routing="expert_choice", pad_token_id=0)
    fields.update(overrides)
    return mixed_routing_model(MoRForCausalLM(tiny_mor_config(**fields))).eval()


def _padded_batch(vocab_size):
    input_ids = torch.randint(1, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(routing="token_choice"), dict(kv_cache_policy="shared"), dict(routing="none", sharing_strategy="sequence", num_recursions=2, num_hidden_layers=6)],
    ids=["expert_choice", "token_choice", "expert_choice-shared", "none-sequence"],
)
def test_uncached_eval_forward_compiles_without_graph_breaks(overrides):
    model = _model(**overrides)
    input_ids, attention_mask = _padded_batch(model.config.vocab_size)

    def forward(input_ids, attention_mask):
        return model(input_ids, attention_mask=attention_mask, use_cache=False).logits

    with torch.no_grad():
        explanation = torch._dynamo.explain(forward)(input_ids, attention_mask)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_model_gives_the_eager_logits_and_depths():
    torch._dynamo.reset()
    model = _model()
    input_ids, attention_mask = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, use_cache=False, output_recursion_depth=True)
        compiled = torch.compile(model)
        actual = compiled(input_ids, attention_mask=attention_mask, use_cache=False, output_recursion_depth=True)
    real = attention_mask.bool()
    assert set(expected.recursion_depth[real].unique().tolist()) > {1}, "the test needs mixed depths"
    assert torch.equal(actual.recursion_depth, expected.recursion_depth)
    assert (actual.logits - expected.logits)[real].abs().max().item() <= 1e-5


def test_generate_refuses_compile_config_clearly():
    model = _model()
    input_ids = torch.randint(1, model.config.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="compile_config is not supported by MoR models"):
        model.generate(input_ids, max_new_tokens=2, compile_config=CompileConfig())
    # Without it, generate does not try to compile (MoRCache is not a static cache).
    assert model.generate(input_ids, max_new_tokens=2, do_sample=False).shape == (1, 7)


def test_cached_generation_under_torch_compile_gives_the_eager_tokens():
    """A compiled forward in generate(): cached decode steps run through dynamo with graph breaks (the cache stores
    a data-dependent number of tokens per step). The "eager" backend traces exactly as inductor's does, without its
    code generation, which would take minutes here."""
    torch._dynamo.reset()
    model = _model()
    prompt = torch.randint(1, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        actual = model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        del model.forward
    assert torch.equal(actual, expected)

"""Hidden states, attentions and tuple outputs, as transformers' models give them (issue 10, items 1 and 2).

The reference is transformers' own Llama: with the same weights, routing "none" and one recursion (or the unrolled
layers of a recursive model), MoR must give the same `hidden_states` and `attentions`, tensor for tensor. Cached
decoding is checked against the uncached forward over the generated sequence.
"""

import pytest
import torch

from conversion import convert_llama_to_mor
from modeling_mor import MoRForCausalLM, MoRModel

from conftest import mixed_routing_model, tiny_llama, tiny_mor_config
from test_parity import _unrolled_llama


def _max_difference(actual, expected):
    assert len(actual) == len(expected)
    return max((a - e).abs().max().item() for a, e in zip(actual, expected))


@pytest.mark.parametrize("strategy,num_layers,num_recursions", [("cycle", 6, 1), ("middle_cycle", 6, 1), ("middle_cycle", 8, 3), ("sequence", 6, 3)])
def test_hidden_states_and_attentions_equal_llama(strategy, num_layers, num_recursions):
    llama = tiny_llama(num_hidden_layers=num_layers, attn_implementation="eager")
    mor = convert_llama_to_mor(llama, num_recursions=num_recursions, sharing_strategy=strategy, routing="none").eval()
    reference = llama if num_recursions == 1 else _unrolled_llama(mor, "eager")
    input_ids = torch.randint(0, llama.config.vocab_size, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = reference(
            input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True, use_cache=False
        )
        actual = mor(input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    assert len(actual.hidden_states) == num_layers + 1 and len(actual.attentions) == num_layers
    assert actual.attentions[0].shape == (2, llama.config.num_attention_heads, 11, 11)
    # Padding queries see nothing meaningful in either model; compare the real tokens.
    real = attention_mask.bool()
    assert _max_difference([h[real] for h in actual.hidden_states], [h[real] for h in expected.hidden_states]) <= 1e-5
    actual_rows = [a.transpose(1, 2)[real] for a in actual.attentions]
    expected_rows = [a.transpose(1, 2)[real] for a in expected.attentions]
    assert _max_difference(actual_rows, expected_rows) <= 1e-5


def _routed_model(**overrides):
    fields = dict(routing="expert_choice", pad_token_id=0, eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(**fields))).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_routed_outputs_follow_each_tokens_depth(routing):
    model = _routed_model(routing=routing)  # middle_cycle, L = 8, N_r = 3: first, 3 x 2 shared, last
    input_ids = torch.randint(1, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True, output_attentions=True, output_recursion_depth=True)
    depth = outputs.recursion_depth
    assert set(depth.unique().tolist()) > {1}, "the test needs tokens that exit early"
    hidden_states, attentions = outputs.hidden_states, outputs.attentions
    assert len(hidden_states) == 9 and len(attentions) == 8
    block_size = model.config.block_size
    for step in range(model.config.num_recursions):
        for position in range(block_size):
            entry = 1 + step * block_size + position  # attentions[entry] is the layer producing hidden_states[entry + 1]
            took_step = depth > step
            weights = attentions[entry]
            # A token that takes the step attends (rows sum to 1); one that does not attends nowhere.
            row_sums = weights.sum(-1)  # [batch, heads, queries]
            assert torch.allclose(row_sums.permute(0, 2, 1)[took_step], torch.ones(()), atol=1e-5)
            assert torch.count_nonzero(row_sums.permute(0, 2, 1)[~took_step]) == 0
            # Its keys are the tokens that took the step as well (recursion-wise KV), never a later token.
            key_took_step = took_step.unsqueeze(1).unsqueeze(2)
            assert torch.count_nonzero(weights.masked_select(~key_took_step.expand_as(weights))) == 0
            assert torch.count_nonzero(weights.triu(diagonal=1)) == 0
            # A token that has exited keeps its state in later entries (token-choice gates only at the end).
            if routing == "expert_choice":
                exited = ~took_step
                assert torch.equal(hidden_states[entry + 1][exited], hidden_states[entry][exited])


def test_return_dict_false_gives_tuples():
    model = _routed_model()
    input_ids = torch.randint(1, model.config.vocab_size, (2, 7))
    labels = input_ids.clone()
    with torch.no_grad():
        as_dict = model(input_ids, labels=labels, output_hidden_states=True)
        as_tuple = model(input_ids, labels=labels, output_hidden_states=True, return_dict=False)
        base_dict = model.model(input_ids)
        base_tuple = model.model(input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())
    assert torch.equal(base_tuple[0], base_dict.last_hidden_state)
    # The config's return_dict=False as well (transformers 5.24's Llama fails there: its causal LM reads the tuple).
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(input_ids), tuple) and isinstance(model.model(input_ids), tuple)
    model.config.return_dict = True
    assert isinstance(MoRModel(model.config).eval()(input_ids), dict)


def test_sdpa_gives_hidden_states_but_no_attentions_as_llama():
    model = MoRForCausalLM(tiny_mor_config(routing="expert_choice")).eval()
    assert model.config._attn_implementation == "sdpa"
    input_ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    assert outputs.attentions == ()  # what Llama under sdpa gives (with its warning to use eager)
    with torch.no_grad():
        outputs = model(input_ids)
    assert outputs.hidden_states is None and outputs.attentions is None


def _check_steps_against_uncached_forward(model, sequences, prompt_length, attentions, hidden_states):
    """Every decoding step's attentions and hidden states equal the uncached forward's rows for the same tokens."""
    with torch.no_grad():
        reference = model(sequences[:, :-1], output_attentions=True, output_hidden_states=True)
    position = 0
    for step_attentions, step_hidden in zip(attentions, hidden_states):
        queries = step_attentions[0].shape[2]
        keys = position + queries
        assert step_attentions[0].shape[-1] == keys
        rows = slice(position, position + queries)
        assert _max_difference(step_attentions, [a[:, :, rows, :keys] for a in reference.attentions]) <= 1e-5
        # The last entry is the normed output, as in transformers; every entry is compared.
        assert _max_difference(step_hidden, [h[:, rows] for h in reference.hidden_states]) <= 1e-4
        position = keys
    assert position == sequences.shape[1] - 1
    assert attentions[0][0].shape[2] == prompt_length


@pytest.mark.parametrize("mode", ["greedy", "sampling", "assisted"])
@pytest.mark.parametrize("kv_cache_policy", ["recursion_wise", "shared"])
def test_generate_returns_the_uncached_attentions_and_hidden_states(mode, kv_cache_policy):
    model = _routed_model(kv_cache_policy=kv_cache_policy)
    prompt = torch.randint(1, 20, (1, 8))
    prompt[0, 4:] = prompt[0, :4]
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True)
    if mode == "sampling":
        kwargs.update(do_sample=True, top_k=0)
        torch.manual_seed(0)
    else:
        kwargs.update(do_sample=False)
    if mode == "assisted":
        kwargs.update(assistant_model=_routed_model(routing="token_choice"))
    outputs = model.generate(prompt, **kwargs)
    _check_steps_against_uncached_forward(
        model, outputs.sequences, prompt.shape[1], outputs.attentions, outputs.hidden_states
    )


def test_beam_search_returns_attentions_and_hidden_states_per_step():
    model = _routed_model()
    prompt = torch.randint(1, model.config.vocab_size, (2, 6))
    outputs = model.generate(
        prompt, max_new_tokens=4, num_beams=3, do_sample=False, return_dict_in_generate=True,
        output_attentions=True, output_hidden_states=True,
    )
    assert len(outputs.attentions) == len(outputs.hidden_states) == 4
    heads = model.config.num_attention_heads
    for step, (step_attentions, step_hidden) in enumerate(zip(outputs.attentions, outputs.hidden_states)):
        queries = 6 if step == 0 else 1
        assert len(step_attentions) == model.config.num_hidden_layers
        assert len(step_hidden) == model.config.num_hidden_layers + 1
        for weights in step_attentions:
            assert weights.shape == (6, heads, queries, 6 + step)
            sums = weights.sum(-1)
            assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))

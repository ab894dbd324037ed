"""Routing semantics (MOR_SPEC section 2): eval causality, hierarchical top-k, router losses, padding."""

import math

import pytest
import torch

from modeling_mor import MoRForCausalLM

from conftest import mixed_routing_model, tiny_mor_config


ROUTED = [
    dict(routing="expert_choice"),
    dict(routing="expert_choice", router_inference="auxiliary", router_type="mlp"),
    dict(routing="expert_choice", router_activation="tanh", gating="update"),
    dict(routing="token_choice"),
    dict(routing="token_choice", balancing="loss_free", router_z_loss_coef=1e-3),
]


def _model(**overrides):
    return mixed_routing_model(MoRForCausalLM(tiny_mor_config(**overrides)))


@pytest.mark.parametrize("overrides", ROUTED + [dict(routing="expert_choice", kv_cache_policy="shared")])
def test_eval_routing_is_causal(overrides):
    model = _model(**overrides).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(input_ids, output_recursion_depth=True)
        prefix = model(input_ids[:, :13], output_recursion_depth=True)
    assert torch.equal(full.recursion_depth[:, :13], prefix.recursion_depth)
    assert (full.logits[:, :13] - prefix.logits).abs().max().item() <= 1e-5
    depth = full.recursion_depth
    # The routers make mixed decisions, so this really tests routing rather than a full-depth model.
    assert depth.min() < depth.max()


@pytest.mark.parametrize("capacity", [None, [1.0, 0.5, 0.25], [0.75, 0.75, 0.5]])
def test_training_top_k_is_hierarchical_and_respects_capacity(capacity):
    model = _model(routing="expert_choice", capacity=capacity).train()
    seq_len = 12
    input_ids = torch.randint(0, model.config.vocab_size, (3, seq_len))
    depth = model(input_ids, output_recursion_depth=True).recursion_depth
    for step, fraction in enumerate(model.config.capacity):
        # depth >= r + 1 means "selected at step r" because a dropped token never returns (hierarchy).
        taken = (depth >= step + 1).sum(-1)
        expected = math.ceil(fraction * seq_len - 1e-6)
        assert taken.tolist() == [expected] * 3, (step, taken, expected)


def test_training_top_k_with_padding_counts_only_real_tokens():
    model = _model(routing="expert_choice").train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    depth = model(input_ids, attention_mask=attention_mask, output_recursion_depth=True).recursion_depth
    assert (depth[1, :3] == 0).all()
    assert (depth[1] >= 3).sum().item() == math.ceil(6 / 3)
    assert (depth[0] >= 3).sum().item() == math.ceil(9 / 3)


@pytest.mark.parametrize("overrides", ROUTED)
def test_training_loss_is_finite_and_gradients_reach_routers(overrides):
    model = _model(**overrides).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    outputs = model(input_ids, labels=input_ids)
    assert torch.isfinite(outputs.loss)
    assert torch.isfinite(outputs.lm_loss)
    expected_total = outputs.lm_loss
    for name, coefficient in [
        ("router_aux_loss", model.config.router_aux_loss_coef),
        ("balance_loss", model.config.balance_loss_coef),
        ("router_z_loss", model.config.router_z_loss_coef),
    ]:
        value = getattr(outputs, name)
        if value is not None:
            expected_total = expected_total + coefficient * value
    assert torch.allclose(outputs.loss, expected_total)
    outputs.loss.backward()
    for router in model.routers():
        gradients = [p.grad for p in router.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in gradients), router


@pytest.mark.parametrize(
    "overrides,loss_name",
    [
        (dict(routing="expert_choice"), "router_aux_loss"),
        (dict(routing="expert_choice", router_inference="auxiliary"), "router_aux_loss"),
        (dict(routing="token_choice", balance_loss_coef=1.0), "balance_loss"),
    ],
)
def test_auxiliary_losses_fall_with_training(overrides, loss_name):
    torch.manual_seed(0)
    # Scaled routers start far from balance and from the top-k targets, so there is something to learn.
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(router_aux_loss_coef=1.0, **overrides))).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 16))
    values = []
    for _ in range(30):
        outputs = model(input_ids, labels=input_ids)
        values.append(getattr(outputs, loss_name).item())
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5


def test_loss_free_balancing_moves_the_selection_bias():
    model = _model(routing="token_choice", balancing="loss_free", balance_update_rate=0.1).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    before = model.model.recursion_block.routing.selection_bias.clone()
    model(input_ids, labels=input_ids)
    after = model.model.recursion_block.routing.selection_bias
    assert not torch.equal(before, after)
    model.eval()
    with torch.no_grad():
        model(input_ids)  # eval never updates the bias
    assert torch.equal(after, model.model.recursion_block.routing.selection_bias)


@pytest.mark.parametrize(
    "overrides",
    ROUTED + [dict(routing="none"), dict(routing="none", sharing_strategy="middle_sequence"), dict(routing="expert_choice", kv_cache_policy="shared")],
)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padded_batch_matches_rows_alone(overrides, attn_implementation):
    model = _model(**overrides).eval()
    model.set_attn_implementation(attn_implementation)
    long_row = torch.randint(0, model.config.vocab_size, (14,))
    short_row = torch.randint(0, model.config.vocab_size, (9,))
    pad = 5
    input_ids = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad] = 0
    with torch.no_grad():
        batch = model(input_ids, attention_mask=attention_mask, output_recursion_depth=True)
        alone_long = model(long_row[None], output_recursion_depth=True)
        alone_short = model(short_row[None], output_recursion_depth=True)
    assert (batch.logits[0] - alone_long.logits[0]).abs().max().item() <= 1e-4
    assert (batch.logits[1, pad:] - alone_short.logits[0]).abs().max().item() <= 1e-4
    assert torch.equal(batch.recursion_depth[1, pad:], alone_short.recursion_depth[0])
    assert (batch.recursion_depth[1, :pad] == 0).all()


@pytest.mark.parametrize("overrides", ROUTED + [dict(routing="expert_choice", kv_cache_policy="shared")])
@pytest.mark.parametrize("use_cache", [False, True])
def test_recursion_steps_compute_only_the_tokens_routed_to_them(overrides, use_cache):
    # Rows hold different numbers of active tokens at a step; the block's matmuls must not pay for padding them to the
    # busiest row's count (what a per-row packed layout costs), nor for the batch's padding tokens.
    model = _model(**overrides).eval()
    input_ids = torch.randint(1, model.config.vocab_size, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :6] = 0
    tokens_seen = []
    gate_proj = model.model.recursion_block.layers[0].mlp.gate_proj
    handle = gate_proj.register_forward_pre_hook(
        lambda module, args: tokens_seen.append(args[0].numel() // args[0].shape[-1])
    )
    try:
        with torch.no_grad():
            outputs = model(input_ids, attention_mask=attention_mask, use_cache=use_cache, output_recursion_depth=True)
            depth = outputs.recursion_depth
    finally:
        handle.remove()
    routed = [int((depth > step).sum()) for step in range(model.config.num_recursions)]
    assert tokens_seen == [count for count in routed if count > 0]
    counts_per_row = (depth > 1).sum(-1)
    assert counts_per_row.min() < counts_per_row.max()  # the rows really differ, so padding would show


@pytest.mark.parametrize(
    "overrides", [dict(routing="none"), dict(routing="expert_choice"), dict(routing="token_choice")]
)
def test_position_ids_shared_by_the_batch_are_accepted(overrides):
    # Llama accepts position_ids of shape [1, seq] for a whole batch; every step gathers positions row by row.
    model = _model(**overrides).eval()
    input_ids = torch.randint(1, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        implicit = model(input_ids).logits
        broadcast = model(input_ids, position_ids=torch.arange(11)[None]).logits
    assert (implicit - broadcast).abs().max().item() <= 1e-6


def test_auxiliary_selection_ranks_by_the_auxiliary_routers_and_leaves_them_untrained():
    """router_selection="auxiliary": training top-k keeps each row's tokens the auxiliary router scores highest (a
    ranking recomputed here from the scores it was given), and the auxiliary routers get no gradient (they are
    fitted elsewhere) while the gating routers still do."""
    model = _model(routing="expert_choice", router_inference="auxiliary", router_selection="auxiliary",
                   capacity=[1.0, 0.5, 0.25]).train()
    auxiliary = model.decision_routers()[1]
    scores = []
    auxiliary.register_forward_hook(lambda module, inputs, output: scores.append(output.squeeze(-1).detach()))
    seq_len = 16
    input_ids = torch.randint(0, model.config.vocab_size, (3, seq_len))
    outputs = model(input_ids, labels=input_ids, output_recursion_depth=True)
    k = math.ceil(0.5 * seq_len - 1e-6)
    expected = torch.zeros_like(input_ids, dtype=torch.bool).scatter(-1, scores[0].topk(k, dim=-1).indices, True)
    assert torch.equal(outputs.recursion_depth >= 2, expected)
    outputs.loss.backward()
    assert all(parameter.grad is None for router in model.decision_routers().values()
               for parameter in router.parameters())
    assert model.model.recursion_block.routing.routers[1].scorer.weight.grad.abs().sum() > 0


def test_auxiliary_selection_needs_auxiliary_routers():
    with pytest.raises(ValueError, match="router_selection='auxiliary'.*Set router_inference='auxiliary'"):
        tiny_mor_config(routing="expert_choice", router_selection="auxiliary")

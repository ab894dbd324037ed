"""MoRConfig validation: every invalid value raises a ValueError naming the field, the value and what is valid."""

import pytest

from modeling_mor import MoRConfig, valid_recursion_layouts

from conftest import TINY_DIMS


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_recursions=0), "num_recursions=0"),
        (dict(num_recursions=-2), "must be an int >= 1"),
        (dict(num_hidden_layers=9), "Valid (sharing_strategy, num_recursions) pairs"),
        (dict(num_hidden_layers=8, sharing_strategy="cycle", num_recursions=3), "L must be a positive multiple"),
        (dict(num_hidden_layers=3, num_recursions=2), "L - 2 must be a positive multiple"),
        (dict(capacity=[1.0, 0.3, 0.6]), "increases"),
        (dict(capacity=[1.0, 0.5]), "needs one per recursion step"),
        (dict(capacity=[1.0, 0.5, 0.0]), "(0, 1]"),
        (dict(capacity=[1.5, 1.0, 0.5]), "(0, 1]"),
        (dict(routing="expert_choice", sharing_strategy="sequence", num_hidden_layers=9), "needs sharing_strategy"),
        (dict(routing="token_choice", sharing_strategy="middle_sequence"), "routing='none'"),
        (dict(routing="mixture"), "'expert_choice', 'token_choice', 'none'"),
        (dict(sharing_strategy="zigzag"), "sharing_strategy='zigzag'"),
        (dict(router_type="transformer"), "router_type"),
        (dict(router_activation="relu"), "router_activation"),
        (dict(router_inference="top_k"), "router_inference"),
        (dict(balancing="none"), "balancing"),
        (dict(gating="residual"), "gating"),
        (dict(kv_cache_policy="paged"), "'recursion_wise', 'shared'"),
        (dict(router_threshold=1.5), "router_threshold"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
    ],
)
def test_invalid_config_raises_clear_value_error(overrides, message):
    fields = dict(TINY_DIMS, num_hidden_layers=8, num_recursions=3)
    fields.update(overrides)
    with pytest.raises(ValueError) as error:
        MoRConfig(**fields)
    assert message in str(error.value)
    assert "MoRConfig." in str(error.value)


def test_defaults_follow_the_spec():
    config = MoRConfig(**TINY_DIMS, num_hidden_layers=11, num_recursions=3)
    assert config.sharing_strategy == "middle_cycle" and config.routing == "expert_choice"
    assert config.capacity == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert config.router_alpha == 0.1 and config.router_threshold == 0.5 and config.router_aux_loss_coef == 1e-3
    assert config.block_size == 3 and config.num_unique_layers == 5
    assert MoRConfig(**TINY_DIMS, num_hidden_layers=8, routing="token_choice").router_alpha == 1.0
    assert MoRConfig(**TINY_DIMS, num_hidden_layers=8, routing="token_choice").balance_loss_coef == 0.1


def test_valid_layouts_and_round_trip():
    assert ("middle_cycle", 3) in valid_recursion_layouts(5)
    assert ("cycle", 3) not in valid_recursion_layouts(5)
    config = MoRConfig(**TINY_DIMS, num_hidden_layers=8, capacity=(1, 0.5, 0.5), kv_cache_policy="shared")
    again = MoRConfig.from_dict(config.to_dict())
    assert again.capacity == [1.0, 0.5, 0.5] and again.kv_cache_policy == "shared"


def test_tensor_parallel_plan_is_derived_and_accepts_transformers_tied_embedding_assignment():
    """transformers before 5.24 (vLLM's pin) assigns `base_model_tp_plan` with the embeddings sharded on the vocabulary
    when they are tied: the derived plan already says so, and that assignment is accepted; any other plan is refused,
    since the plan follows the sharing strategy and the relaxation."""
    config = MoRConfig(tie_word_embeddings=True)
    derived = config.base_model_tp_plan
    config.base_model_tp_plan = {**derived, "embed_tokens": "embedding_rowwise"}
    assert config.base_model_tp_plan == derived
    with pytest.raises(ValueError, match="derived from the sharing strategy and the relaxation"):
        config.base_model_tp_plan = {"embed_tokens": "colwise"}


def test_full_rank_relaxation_is_told_by_the_rank_reaching_every_projection():
    """`has_full_rank_relaxation`: every per-step delta is stored whole (the rank reaches each projection's smaller
    side), as `--relaxation-rank full` (hidden_size) asks; the vLLM plugin then loads per-step weights."""
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert MoRConfig(**dims, relaxation_rank=64).has_full_rank_relaxation
    assert not MoRConfig(**dims, relaxation_rank=32).has_full_rank_relaxation  # k/v (width 32) dense, q/MLP not
    assert not MoRConfig(**dims, relaxation_rank=0).has_full_rank_relaxation
    assert MoRConfig(**dims, relaxation_rank=0).full_relaxation_rank == 64  # the q and MLP projections' smaller side
    from modeling_mor import MoRForCausalLM

    model = MoRForCausalLM(MoRConfig(**dims, vocab_size=64, num_hidden_layers=5, num_recursions=3, relaxation_rank=64))
    relaxed = [module.is_dense for module in model.modules() if hasattr(module, "is_dense")]
    assert len(relaxed) == 7 and all(relaxed)  # the shared layer's seven projections

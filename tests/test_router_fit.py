"""The router fit of `mor-uptrain --router-fit-tokens`: what stopping before a recursion step computes and the fit of
the deciding routers to the skip cost (the command line around it: tests/test_uptrain.py)."""

import copy
import pytest
import torch
from torch import nn

from conftest import TINY_DIMS, mixed_routing_model, tiny_llama
from conversion.convert_llama_to_mor import convert_llama_to_mor
from conversion.measure import full_depth, stopped_before
from conversion.training.router_fit import fit_decision_routers, measure_skip_costs
from modeling_mor.routing_mor import hierarchical_top_k


def _tokens(rows=4, seq_len=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_DIMS["vocab_size"], (rows, seq_len), generator=generator)


def test_stopping_before_step_two_is_the_source_without_that_steps_layers():
    """Independent reference: a fresh full-rank conversion (neutral gates) stopped before its second recursion step
    computes the source Llama with the layers of that step removed (first layer, step 1's block, last layer)."""
    llama = tiny_llama(num_hidden_layers=10)
    mor = convert_llama_to_mor(llama, num_recursions=2, sharing_strategy="middle_cycle",
                               relaxation_rank=TINY_DIMS["hidden_size"], capacity=[1.0, 0.5]).eval()
    block = mor.config.block_size
    truncated = copy.deepcopy(llama)
    truncated.model.layers = nn.ModuleList([llama.model.layers[0], *llama.model.layers[1:1 + block],
                                            llama.model.layers[-1]])
    truncated.config.num_hidden_layers = len(truncated.model.layers)
    tokens = _tokens()
    with torch.no_grad(), stopped_before(mor, 1):
        outputs = mor(tokens, use_cache=False, output_recursion_depth=True)
    assert (outputs.recursion_depth == 1).all()
    with torch.no_grad():
        expected = truncated(tokens, use_cache=False).logits
        full = mor(tokens, use_cache=False).logits
    torch.testing.assert_close(outputs.logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full, expected, atol=1e-2)  # the removed layers matter
    assert mor.config.capacity == [1.0, 0.5] and mor.config.router_threshold == 0.5  # restored


def test_stopped_before_sets_every_depth_and_refuses_a_step_every_token_takes():
    mor = mixed_routing_model(convert_llama_to_mor(tiny_llama(), num_recursions=3, sharing_strategy="middle_cycle")).eval()
    tokens = _tokens()
    for step in (1, 2):
        with torch.no_grad(), stopped_before(mor, step):
            assert (mor(tokens, output_recursion_depth=True).recursion_depth == step).all()
    with torch.no_grad(), full_depth(mor):
        assert (mor(tokens, output_recursion_depth=True).recursion_depth == 3).all()
    with pytest.raises(ValueError, match="capacity 1"), stopped_before(mor, 0):
        pass


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_fit_teaches_the_deciding_routers_the_costliest_tokens_and_changes_nothing_else(router_type):
    """After the fit, each deciding router (logit > 0) names the tokens whose skip cost is in their sequence's top
    capacity-fraction better than before and than any constant answer (recomputed here for the first deciding step,
    which every token reaches); every other weight is unchanged, so a token at full depth predicts exactly what it
    did. The MLP router's first layer has no bias: the fit's channel scaling must fold back into it all the same."""
    torch.manual_seed(0)
    mor = convert_llama_to_mor(tiny_llama(), num_recursions=3, sharing_strategy="middle_cycle",
                               router_type=router_type).eval()
    with torch.no_grad():  # layers that differ, so that stopping costs some tokens more than others
        for parameter in mor.model.recursion_block.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    tokens = _tokens(rows=16, seq_len=64)
    before = {name: value.clone() for name, value in mor.state_dict().items()}
    with torch.no_grad(), full_depth(mor):
        logits_before = mor(tokens).logits
    report = fit_decision_routers(mor, tokens, batch_size=4, epochs=200, learning_rate=1e-2)
    assert set(report) == {"1", "2"}
    for fit in report.values():
        assert fit["accuracy_after"] > max(fit["accuracy_before"], fit["constant_accuracy"]) + 0.03
    assert report["1"]["tokens"] == tokens.numel() > report["2"]["tokens"]  # step 3 decides among step 2's tokens
    features, costs = measure_skip_costs(mor, tokens)
    everyone = torch.ones_like(costs[1], dtype=torch.bool)
    costliest = hierarchical_top_k(costs[1], everyone, everyone, mor.config, 1).flatten()
    with torch.no_grad():
        picks = mor.decision_routers()[1](features[1]).squeeze(-1) > 0
    assert (picks == costliest).float().mean().item() == pytest.approx(report["1"]["accuracy_after"], abs=1e-3)
    fitted = {f"model.recursion_block.routing.auxiliary_routers.{step}." for step in report}
    for name, value in mor.state_dict().items():
        if not any(name.startswith(prefix) for prefix in fitted):
            assert torch.equal(value, before[name]), name
    with torch.no_grad(), full_depth(mor):
        torch.testing.assert_close(mor(tokens).logits, logits_before)

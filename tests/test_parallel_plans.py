"""Parallelism plans: `base_model_tp_plan` / `_tp_plan` / `base_model_pp_plan` name MoR's real modules, and tensor
parallelism through transformers (`from_pretrained(distributed_config=DistributedConfig(tp_plan="auto"))`, 2 CPU
processes with gloo) gives the logits of one process."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.distributed.parallel_utils import (
    ALL_PARALLEL_STYLES,
    _get_parameter_plan,
    replace_layer_number_by_wildcard,
)

from modeling_mor import MoRForCausalLM, MoRModel

from conftest import TINY_DIMS, mixed_routing_model, skip_without_gloo, tiny_mor_config


PLAN_CONFIGS = {
    "middle_cycle": dict(),
    "cycle": dict(sharing_strategy="cycle", num_hidden_layers=6),
    "middle_sequence_no_routing": dict(sharing_strategy="middle_sequence", routing="none", num_recursions=2),
    "token_choice_mlp_router": dict(routing="token_choice", balancing="loss_free", router_type="mlp"),
    "auxiliary_routers": dict(router_inference="auxiliary"),
    "relaxed_middle_cycle": dict(relaxation_rank=2, attention_bias=True),
    "relaxed_cycle": dict(relaxation_rank=2, sharing_strategy="cycle", num_hidden_layers=6),
}

# The decoder layers' projections that tensor parallelism must shard (those of Llama's plan).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _wildcard_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Module and parameter names as the plans spell them (layer numbers replaced by `*`), as transformers matches."""
    modules = {replace_layer_number_by_wildcard(name) for name, _ in model.named_modules()}
    parameters = {replace_layer_number_by_wildcard(name) for name, _ in model.named_parameters()}
    return modules, parameters


def _decoder_layers(model: MoRForCausalLM) -> dict[str, nn.Module]:
    layers = {f"model.recursion_block.layers.{i}": layer for i, layer in enumerate(model.model.recursion_block.layers)}
    if model.model.first_layer is not None:
        layers["model.first_layer"] = model.model.first_layer
        layers["model.last_layer"] = model.model.last_layer
    return layers


@pytest.mark.parametrize("name", list(PLAN_CONFIGS))
def test_tp_plan_names_existing_modules_and_covers_every_projection(name):
    config = tiny_mor_config(**PLAN_CONFIGS[name])
    model = MoRForCausalLM(config)
    plan = model.tp_plan
    modules, parameters = _wildcard_names(model)

    # Every rule names something (transformers would skip it with a warning otherwise), with a known style.
    assert set(plan) - modules - parameters == set()
    assert all(style in ALL_PARALLEL_STYLES for style in plan.values())

    for layer_name, layer in _decoder_layers(model).items():
        relaxed_shared_layer = config.relaxation_rank > 0 and layer_name.startswith("model.recursion_block.")
        for parent in ("self_attn", "mlp"):
            for projection in PROJECTIONS:
                if not hasattr(getattr(layer, parent), projection):
                    continue
                style = _get_parameter_plan(f"{layer_name}.{parent}.{projection}.weight", plan)
                if relaxed_shared_layer:
                    # Replicated: colwise/rowwise would split the low-rank deltas along their rank (see the plan).
                    assert style is None, f"{layer_name}.{parent}.{projection} is relaxed and must stay replicated"
                else:
                    expected = "rowwise" if projection in ("o_proj", "down_proj") else "colwise"
                    assert style == expected, f"{layer_name}.{parent}.{projection}.weight: {style}"

    # The tied embeddings and head are sharded on the vocabulary; the routers are replicated.
    assert _get_parameter_plan("model.embed_tokens.weight", plan) == "embedding_rowwise"
    assert _get_parameter_plan("lm_head.weight", plan) == "colwise_gather_output"
    for parameter_name, _ in model.named_parameters():
        if ".routing." in parameter_name or "norm" in parameter_name or "relaxation" in parameter_name:
            assert _get_parameter_plan(parameter_name, plan) is None, parameter_name


@pytest.mark.parametrize("name", list(PLAN_CONFIGS))
def test_pp_plan_names_existing_modules_with_their_inputs(name):
    model = MoRModel(tiny_mor_config(**PLAN_CONFIGS[name]))
    plan = model.pp_plan
    modules = dict(model.named_modules())
    # Every stage exists, in forward order: embeddings first, norm last, the recursion block between the end layers.
    assert all(stage in modules for stage in plan)
    stages = list(plan)
    assert stages[0] == "embed_tokens" and stages[-1] == "norm"
    middle = ["first_layer", "recursion_block", "last_layer"] if model.first_layer is not None else ["recursion_block"]
    assert stages[1:-1] == middle
    model_inputs = set(inspect.signature(MoRModel.forward).parameters)
    for stage, (inputs, outputs) in plan.items():
        stage_inputs = set(inspect.signature(modules[stage].forward).parameters)
        assert set(inputs) <= stage_inputs | model_inputs, (stage, inputs)
        assert outputs


# ----------------------------------------------------------------------------------------------------------------
# Real tensor parallelism: 2 CPU processes (torchrun, gloo), against one process.

TP_CHECKPOINTS = {
    # Tied: the embeddings (embedding_rowwise) and the head (colwise_gather_output) shard one matrix.
    "middle_cycle_expert_choice": dict(tie_word_embeddings=True),
    # The relaxed shared layers stay replicated while the unshared ends are sharded.
    "relaxed_token_choice": dict(relaxation_rank=2, routing="token_choice", balancing="loss_free"),
}
WORLD_SIZE = 2
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """Saves the checkpoints, computes one process's outputs, runs tests/tp_worker.py on 2 ranks once; returns
    {checkpoint name: (one-process outputs, [results of each rank])}."""
    skip_without_gloo()
    folder = tmp_path_factory.mktemp("tensor_parallel")
    input_ids = torch.randint(0, TINY_DIMS["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    torch.save(inputs, folder / "inputs.pt")

    references = {}
    for name, overrides in TP_CHECKPOINTS.items():
        torch.manual_seed(0)
        model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(**overrides)))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "relaxation" in parameter_name:
                    parameter.normal_(std=0.3)  # deltas that change the outputs, so replication is checked
        model.eval().save_pretrained(folder / name)
        with torch.no_grad():
            outputs = model(**inputs, use_cache=False, output_recursion_depth=True)
            generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        references[name] = {
            "logits": outputs.logits, "recursion_depth": outputs.recursion_depth, "generated": generated
        }

    results_dir = folder / "results"
    results_dir.mkdir()
    worker = Path(__file__).with_name("tp_worker.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        str(worker), str(folder / "inputs.pt"), str(results_dir), *(str(folder / name) for name in TP_CHECKPOINTS),
        f"--max_new_tokens={MAX_NEW_TOKENS}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return {
        name: (references[name], [torch.load(results_dir / f"{name}-rank{rank}.pt") for rank in range(WORLD_SIZE)])
        for name in TP_CHECKPOINTS
    }


@pytest.mark.parametrize("name", list(TP_CHECKPOINTS))
def test_tensor_parallel_shards_the_plan(tensor_parallel_run, name):
    config = tiny_mor_config(**TP_CHECKPOINTS[name])
    _, ranks = tensor_parallel_run[name]
    kv_width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    for results in ranks:
        assert results["world_size"] == WORLD_SIZE
        shapes = results["local_shapes"]
        hidden, intermediate = config.hidden_size, config.intermediate_size
        for layer in ("model.first_layer", "model.last_layer"):
            assert shapes[f"{layer}.self_attn.q_proj.weight"] == (hidden // WORLD_SIZE, hidden)
            assert shapes[f"{layer}.self_attn.k_proj.weight"] == (kv_width // WORLD_SIZE, hidden)
            assert shapes[f"{layer}.self_attn.o_proj.weight"] == (hidden, hidden // WORLD_SIZE)
            assert shapes[f"{layer}.mlp.down_proj.weight"] == (hidden, intermediate // WORLD_SIZE)
        shared = "model.recursion_block.layers.0.self_attn.q_proj.weight"
        assert (shared in shapes) == (config.relaxation_rank == 0)
        assert not any(".routing." in parameter for parameter in shapes)
    # The vocabulary (97, odd) is split 49 + 48 between the ranks, for the embeddings and the head alike; a tied head
    # stays the embeddings' (sharded) matrix.
    matrices = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    for matrix in matrices:
        assert sum(results["local_shapes"][matrix][0] for results in ranks) == config.vocab_size
    assert all(results["head_is_tied"] == config.tie_word_embeddings for results in ranks)


@pytest.mark.parametrize("name", list(TP_CHECKPOINTS))
def test_tensor_parallel_matches_one_process(tensor_parallel_run, name):
    reference, ranks = tensor_parallel_run[name]
    for results in ranks:
        forward = results["forward"]
        assert "error" not in forward, forward.get("error")
        # Only the order of the all-reduce sums differs from one process.
        torch.testing.assert_close(forward["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(forward["recursion_depth"], reference["recursion_depth"])
        generated = results["generate_uncached"]
        assert "error" not in generated, generated.get("error")
        assert torch.equal(generated["sequences"], reference["generated"])


# MoRCache's page pools take `num_key_value_heads` from the config, but a rank holds only its shard of the key/value
# heads of the layers the plan shards (cache_mor.py, PagedKVStorage): the cached passes fail where the shared block is
# sharded. The relaxed checkpoint keeps its shared block replicated, so its cache holds every head and works.


@pytest.mark.parametrize(
    "name", ["middle_cycle_expert_choice", "relaxed_token_choice"]
)
def test_tensor_parallel_cached_generation_matches_one_process(tensor_parallel_run, name):
    reference, ranks = tensor_parallel_run[name]
    for results in ranks:
        for check in ("cached_forward", "generate"):
            assert "error" not in results[check], f"{check}: {results[check].get('error')}"
        torch.testing.assert_close(results["cached_forward"]["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(results["generate"]["sequences"], reference["generated"])


def test_pipeline_parallelism_is_refused_before_loading(tmp_path):
    from transformers import DistributedConfig

    checkpoint = tmp_path / "checkpoint"
    MoRForCausalLM(tiny_mor_config()).save_pretrained(checkpoint)
    for distributed_config in (DistributedConfig(pp_size=2), {"pp_size": 2}):
        with pytest.raises(ValueError, match="pipeline parallelism is not supported by MoR models.*tp_plan='auto'"):
            MoRForCausalLM.prepare_distribute_model(distributed_config)
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        MoRForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(pp_size=2))

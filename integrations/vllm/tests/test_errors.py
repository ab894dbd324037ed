"""What vLLM cannot serve is refused when the checkpoint loads, with one message naming the reason and the
alternative; a config.json from another environment loads either way."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import KV_CACHE_BYTES, REFERENCE_PYTHON, REPOSITORY, python, serving

STORIES_DIR = REPOSITORY / "examples" / "assets" / "stories260K"
from mor_vllm.checks import UnsupportedMoRCheckpoint, check_servable
from mor_vllm.configuration_mor import MoRConfig


def copy_with_config(source, destination, **changes):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_unservable_settings_are_named():
    relaxed = MoRConfig(relaxation_rank=4)
    with pytest.raises(UnsupportedMoRCheckpoint, match="relaxation_rank=4 with tensor_parallel_size=2.*tensor_parallel_size=1"):
        check_servable(relaxed, tensor_parallel_size=2)
    with pytest.raises(UnsupportedMoRCheckpoint, match="pipeline_parallel_size=2.*Use tensor_parallel_size"):
        check_servable(MoRConfig(), pipeline_parallel_size=2)
    with pytest.raises(UnsupportedMoRCheckpoint, match="hidden_act='gelu'"):
        check_servable(MoRConfig(hidden_act="gelu"))
    check_servable(MoRConfig(routing="none", sharing_strategy="middle_sequence"), tensor_parallel_size=2)
    # Full-rank deltas load as per-step weights, which shard like any layer's.
    full_rank = MoRConfig(relaxation_rank=MoRConfig().hidden_size)
    assert full_rank.has_full_rank_relaxation and not relaxed.has_full_rank_relaxation
    check_servable(full_rank, tensor_parallel_size=2)
    with pytest.raises(UnsupportedMoRCheckpoint, match="head_dim=8: .* take head sizes 32, 64"):
        check_servable(MoRConfig(hidden_size=64, num_attention_heads=8), head_sizes=[32, 64, 128])


def test_tied_embeddings_config_builds_under_vllms_transformers():
    """vLLM's transformers (5.19) assigns `base_model_tp_plan` in its config's __post_init__ when the embeddings are
    tied, as every conversion of stories260K or SmolLM2 has them."""
    config = MoRConfig(tie_word_embeddings=True)
    assert config.base_model_tp_plan["embed_tokens"] == "embedding_rowwise"


def test_refused_before_the_engine_starts(references, tmp_path):
    """The plugin's configuration hook refuses in the loading process, before an engine starts, with its own exception
    (not wrapped in vLLM's pydantic ValidationError). An invalid config is refused by MoRConfig's own check, which
    vLLM's config validation wraps in its ValueError."""
    folder, _ = references
    from vllm import LLM

    gelu = copy_with_config(folder / "expert", tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(UnsupportedMoRCheckpoint, match=r"^hidden_act='gelu'.*transformers"):
        LLM(model=str(gelu), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256)
    invalid = copy_with_config(folder / "expert", tmp_path / "invalid", sharing_strategy="spiral")
    with pytest.raises(ValueError, match="MoRConfig.sharing_strategy='spiral' is not valid"):
        LLM(model=str(invalid), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256)


def test_head_size_the_cpu_kernels_cannot_run_is_refused_before_the_engine_starts(tmp_path):
    """The shipped stories260K (head_dim 8, tied embeddings) converted as a user would: refused for its head size when
    the engine's configuration is made, not by a dead engine at the first request."""
    from vllm import LLM

    folder = tmp_path / "stories-mor"
    convert = [str(REFERENCE_PYTHON), "-m", "conversion.convert_llama_to_mor", str(STORIES_DIR), str(folder),
               "--num-recursions", "3", "--sharing-strategy", "middle_cycle"]
    result = subprocess.run(convert, capture_output=True, text=True, timeout=600, cwd=REPOSITORY,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    with pytest.raises(UnsupportedMoRCheckpoint, match=r"^head_dim=8: vLLM's CPU attention kernels take head sizes 32"):
        LLM(model=str(folder), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256)


def test_weights_that_do_not_fit_the_model_are_named(references, tmp_path):
    """A tensor the model has no place for: the engine fails to start and its log names the tensor."""
    folder, _ = references
    odd = shutil.copytree(folder / "expert", tmp_path / "odd")
    weights = load_file(odd / "model.safetensors")
    weights["model.recursion_block.unknown.weight"] = torch.zeros(2)
    save_file(weights, odd / "model.safetensors", metadata={"format": "pt"})
    script = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(odd)!r}, dtype="float32", kv_cache_memory_bytes={KV_CACHE_BYTES}, max_model_len=256,
                enforce_eager=True)
    """)
    result = subprocess.run([python(), "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "'model.recursion_block.unknown.weight', which this MoR model has no place for" in result.stdout + result.stderr


def test_remote_code_config_loads_in_vllms_environment(references):
    """The folder's own configuration_mor.py (remote code) loads under vLLM's transformers: the MoR config's floor
    is vLLM's transformers, not the model's. In a process without the plugin, as transformers alone would read it;
    with the plugin registered, vLLM uses the plugin's (the same file) even under trust_remote_code=True."""
    folder, reference = references
    script = textwrap.dedent(f"""
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(folder / "expert")!r}, trust_remote_code=True)
        print(type(config).__module__.split(".")[0], config.routing, config.block_size)
    """)
    result = subprocess.run([python(), "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["transformers_modules", "expert_choice", "2"]
    from vllm import SamplingParams, TokensPrompt

    with serving(folder / "expert", trust_remote_code=True) as llm:
        prompt = reference["expert"]["prompts"][0]
        output = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0), use_tqdm=False)
    assert list(output[0].outputs[0].token_ids) == reference["expert"]["tokens"][0][:8]


def test_full_rank_layer_without_its_deltas_is_refused():
    """A full-rank relaxed checkpoint's block projection loads as W + D_r per step: the shared weight alone (a
    truncated or edited checkpoint) is named, not served as something else."""
    from mor_vllm.model import StepWeightMerger

    merger = StepWeightMerger(num_steps=2)
    name = "model.recursion_block.layers.0.self_attn.q_proj.weight"
    assert merger.takes(name) and not merger.takes("model.first_layer.self_attn.q_proj.weight")
    assert merger.add(name, torch.ones(2, 3)) == []
    with pytest.raises(UnsupportedMoRCheckpoint, match=r"q_proj.weight without its .*q_proj.relaxation_delta"):
        merger.check_complete()
    steps = merger.add(name.replace("weight", "relaxation_delta"), torch.eye(2, 3).unsqueeze(0))
    assert [step_name for step_name, _ in steps] == [name.replace("q_proj", "q_proj.0"), name.replace("q_proj", "q_proj.1")]
    # Merged per-step weights: the first step runs the shared weight, the second its sum with the one delta.
    assert torch.equal(steps[0][1], torch.ones(2, 3)) and torch.equal(steps[1][1], torch.ones(2, 3) + torch.eye(2, 3))
    merger.check_complete()


def test_full_rank_deltas_of_older_checkpoints_load_as_their_per_step_weights():
    """Checkpoints saved before the per-step weights were stored merged hold a delta for every step, from a shared
    weight between them: step r runs W + D_r. A delta count that fits neither layout is refused by name."""
    from mor_vllm.model import StepWeightMerger, per_step_deltas

    merger = StepWeightMerger(num_steps=2)
    name = "model.recursion_block.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([torch.eye(2, 3), 2 * torch.eye(2, 3)])
    assert merger.add(name.replace("weight", "relaxation_delta"), deltas) == []
    steps = merger.add(name, torch.ones(2, 3))
    assert [tensor.tolist() for _, tensor in steps] == [(torch.ones(2, 3) + deltas[step]).tolist() for step in (0, 1)]
    with pytest.raises(UnsupportedMoRCheckpoint, match=r"up_proj.relaxation_delta holds 3 per-step deltas, and "
                                                       r"num_recursions=2 needs 1 \(or 2"):
        per_step_deltas("up_proj.relaxation_delta", torch.zeros(3, 2, 3), num_steps=2)


@pytest.mark.parametrize("setting,message", [
    (dict(scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler"), r"^scheduler_cls=.*Leave scheduler_cls unset"),
    (dict(worker_cls="vllm.v1.worker.gpu_worker.Worker"), r"^worker_cls=.*Leave worker_cls unset"),
    (dict(disable_hybrid_kv_cache_manager=True), r"^disable_hybrid_kv_cache_manager=True: .*Leave it unset"),
])
def test_settings_that_bypass_routed_token_kv_are_refused(references, setting, message):
    """A recursion-wise checkpoint stores only routed tokens per step through the plugin's worker, scheduler and KV
    cache groups (routed_kv.py): settings that would replace them are refused before the engine starts."""
    folder, _ = references
    from vllm import LLM

    with pytest.raises(UnsupportedMoRCheckpoint, match=message):
        LLM(model=str(folder / "expert"), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256,
            **setting)


def test_kv_connectors_are_refused_for_routed_token_kv(references):
    folder, _ = references
    from vllm import LLM

    with pytest.raises(UnsupportedMoRCheckpoint, match=r"^a KV connector or KV offloading .*kv_offloading_size"):
        LLM(model=str(folder / "expert"), dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256,
            kv_offloading_size=1.0)

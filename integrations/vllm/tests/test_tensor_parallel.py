"""Tensor parallelism on CPU (issue 24, item 4): vLLM's multiprocessing executor runs the model on two ranks, each
with half of every layer's attention heads and MLP columns, and the greedy tokens, their log-probabilities and the
recursion depths equal generate()'s. Routing decides on the hidden states, which the row-parallel projections
all-reduce before any router reads them, so every rank must route every token alike: the depths each rank counted
are compared with each other and with the reference.

Each rank is bound to its own core (`VLLM_CPU_OMP_THREADS_BIND`, one list per rank: vLLM's automatic binding wants a
NUMA node per rank), so the test needs two cores.
"""

import os

import pytest

from mor_vllm.model import depth_counts_of

from conftest import serving
from reference_checkpoints import VARIANTS
from test_parity import assert_equals_generate, greedy, prefix_cached_tokens


TENSOR_PARALLEL = 2


@pytest.fixture
def one_core_per_rank(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))  # the cores this process may run on, which binding must use
    if len(cores) < TENSOR_PARALLEL:
        pytest.skip(f"tensor parallelism over {TENSOR_PARALLEL} ranks binds one core to each")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in cores[:TENSOR_PARALLEL]))


@pytest.mark.parametrize("variant", ["expert", "expert_shared", "expert_relaxed_full_rank"])
def test_tensor_parallel_greedy_tokens_and_depths_equal_generate(references, variant, one_core_per_rank):
    assert variant in VARIANTS
    folder, reference = references
    expected = reference[variant]
    new_tokens = len(expected["tokens"][0])
    with serving(folder / variant, tensor_parallel_size=TENSOR_PARALLEL, distributed_executor_backend="mp") as llm:
        before = llm.apply_model(depth_counts_of)
        tokens, logprobs = greedy(llm, expected["prompts"][:-1], new_tokens)
        last_tokens, last_logprobs = greedy(llm, expected["prompts"][-1:], new_tokens)
        after = llm.apply_model(depth_counts_of)
        cached = prefix_cached_tokens(llm)
    assert len(after) == TENSOR_PARALLEL  # one count per rank
    for rank, (start, end) in enumerate(zip(before, after)):
        depth_counts = [later - earlier for earlier, later in zip(start, end)]
        assert_equals_generate(tokens + last_tokens, logprobs + last_logprobs, depth_counts, expected, cached, f"rank {rank}: ")

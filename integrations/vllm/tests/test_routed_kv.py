"""Recursion-wise KV that stores only the tokens routed to each step (mor_vllm/routed_kv.py), inside vLLM's KV budget.

- What the scheduler's managers hold, read inside the engine while requests run: after every pass, each routed step
  stores exactly the tokens generate() sent to it (its depths), in as many blocks as those tokens fill, where a step
  every token takes holds every token; the worker's block tables are trimmed alike (else the outputs, compared with
  generate()'s, would read other requests' keys); a request aborted after its first pass and the finished ones leave
  no blocks and no counts behind, and the cache is empty.
- Under a KV budget small enough that vLLM must preempt and recompute requests while 64 run, every output is still
  generate()'s, and once all finished the cache is empty again (finished, preempted and aborted requests give their
  blocks back): the same load run again preempts as often and ends as empty.
- Prefill chunks splitting a prompt across a step's storage are exercised by every parity test (chunks of 64 tokens).
"""

import pytest
from vllm import SamplingParams, TokensPrompt
from vllm.utils.math_utils import cdiv

from conftest import serving
from reference_checkpoints import VARIANTS


BLOCK_SIZE = 32  # small blocks (the smallest vLLM's CPU attention takes), so that decoding crosses block boundaries and a tight budget must preempt


def metric(llm, name: str) -> float:
    """A metric summed over its samples: engines this process ran before (the other tests') keep theirs, unchanged."""
    return sum(sample.value for sample in llm.get_metrics() if sample.name == name)


def greedy_params(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)


@pytest.mark.parametrize("variant", ["expert", "token"])
def test_routed_steps_hold_only_the_routed_tokens(references, variant, monkeypatch):
    from mor_vllm.routed_kv import RoutedStepManager

    assert variant in VARIANTS
    folder, reference = references
    expected = reference[variant]
    new_tokens = len(expected["tokens"][0])
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, to read its scheduler
    with serving(folder / variant, block_size=BLOCK_SIZE) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        routed = [manager for manager in managers if isinstance(manager, RoutedStepManager) and manager.routed]
        every_token = [manager for manager in managers if not (isinstance(manager, RoutedStepManager) and manager.routed)]
        assert routed and every_token
        for index, prompt in enumerate(expected["prompts"]):
            llm.llm_engine.add_request(f"prompt-{index}", TokensPrompt(prompt_token_ids=prompt), greedy_params(new_tokens))
        # One more request, aborted after its first pass: its blocks must go back too.
        llm.llm_engine.add_request("aborted", TokensPrompt(prompt_token_ids=expected["prompts"][-1]), greedy_params(new_tokens))
        checked = saved = 0
        outputs, aborted_at = {}, None
        while llm.llm_engine.has_unfinished_requests():
            for output in llm.llm_engine.step():
                tokens = list(output.outputs[0].token_ids)
                if output.request_id != "aborted":
                    outputs[output.request_id] = tokens
                elif aborted_at is None:
                    aborted_at = len(tokens)
                    llm.llm_engine.abort_request(["aborted"])
            for request in scheduler.running:
                if request.request_id.startswith("aborted"):
                    continue
                index = expected["prompts"].index(list(request.prompt_token_ids))
                depths = expected["depths"][index][: request.num_computed_tokens]
                for manager in routed:
                    stored = sum(depth > manager.recursion_step for depth in depths)
                    assert manager.stored_tokens[request.request_id] == stored
                    held = len(manager.req_to_blocks[request.request_id])
                    # After a pass, a block for every BLOCK_SIZE stored tokens, none more: what was reserved for
                    # tokens the routers did not send went back to the pool.
                    assert held == cdiv(stored, BLOCK_SIZE)
                    saved += len(every_token[0].req_to_blocks[request.request_id]) - held
                for manager in every_token:
                    assert len(manager.req_to_blocks[request.request_id]) >= cdiv(request.num_computed_tokens, BLOCK_SIZE)
                checked += 1
        assert checked > 0 and saved > 0
        assert aborted_at is not None and aborted_at < new_tokens
        # Finished and aborted requests left nothing behind: no blocks, no counts.
        assert not scheduler.requests
        for manager in managers:
            assert not manager.req_to_blocks or not any(manager.req_to_blocks.values())
        for manager in routed:
            assert not manager.stored_tokens and not manager.reported_tokens
        assert [outputs[f"prompt-{index}"] for index in range(len(expected["prompts"]))] == expected["tokens"]
        assert scheduler.kv_cache_manager.usage == 0.0


def test_preemption_under_a_small_kv_budget_keeps_generate_outputs(references):
    folder, reference = references
    expected = reference["expert"]
    new_tokens = len(expected["tokens"][0])
    count = len(expected["prompts"])
    prompts = [expected["prompts"][index % count] for index in range(64)]
    # 48 blocks of 32 tokens across the KV cache groups: a few requests' worth, so that 64 at once must preempt.
    with serving(folder / "expert", block_size=BLOCK_SIZE, num_gpu_blocks_override=48, max_num_seqs=64,
                 disable_log_stats=False) as llm:
        preemptions = []
        for _ in range(2):
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy_params(new_tokens), use_tqdm=False)
            for index, output in enumerate(outputs):
                assert list(output.outputs[0].token_ids) == expected["tokens"][index % count], f"request {index}"
            preemptions.append(metric(llm, "vllm:num_preemptions") - sum(preemptions))
            assert metric(llm, "vllm:kv_cache_usage_perc") == 0.0
    assert preemptions[0] > 0, "the budget did not force preemption"
    assert preemptions[1] == preemptions[0], "the second run of the same load preempted differently"

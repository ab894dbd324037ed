"""Continuous depth-wise batching (serving_mor.py) through transformers' continuous-batching API: every request's
tokens equal generate() on its prompt alone, whatever else is in flight; the paged KV holds exactly the routed
tokens; bad requests and faults fail alone or stop the engine cleanly."""

import threading

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from modeling_mor import MoRForCausalLM
from modeling_mor.cache_mor import END_LAYERS
from modeling_mor.serving_mor import DEFAULT_PAGE_SIZE, MoRContinuousBatchingManager

from conftest import mixed_routing_model, tiny_mor_config


VARIANTS = [
    dict(routing="expert_choice"),
    dict(routing="expert_choice", kv_cache_policy="shared"),
    dict(routing="expert_choice", router_inference="auxiliary", capacity=[1.0, 0.6, 0.3]),
    dict(routing="token_choice"),
    dict(routing="token_choice", kv_cache_policy="shared"),
    dict(routing="none"),
    dict(routing="expert_choice", relaxation_rank=4),
    dict(routing="expert_choice", sharing_strategy="cycle", num_hidden_layers=6),
]


def _model(**overrides):
    fields = dict(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config(**fields))).eval()
    if overrides.get("router_inference") == "auxiliary":
        with torch.no_grad():
            for router in model.model.recursion_block.routing.auxiliary_routers.values():
                router.output_layer.weight.normal_(0, 2.0)
    return model


def _prompts(count=22, seed=1, low=2, high=20):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [torch.randint(1, 97, (int(n),), generator=generator).tolist() for n in lengths]


def _greedy(max_new_tokens=9, **fields):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **fields)


# Fewer slots than requests (requests join and leave mid-flight), prompts split into prefill chunks of 8 tokens that
# mix with decode tokens, pages of 4 tokens.
SMALL_ENGINE = dict(max_requests_per_batch=5, max_batch_tokens=8, page_size=4)


def _reference(model, prompt, generation_config):
    return model.generate(torch.tensor([prompt]), generation_config=generation_config)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_generate_batch_equals_generate_alone(overrides):
    model = _model(**overrides)
    prompts = _prompts()
    config = _greedy()
    outputs = model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    )
    assert len(outputs) == len(prompts)
    for output, prompt in zip(outputs.values(), prompts):
        assert output.error is None and output.status == RequestStatus.FINISHED
        assert output.prompt_ids == prompt
        assert output.generated_tokens == _reference(model, prompt, config)
    if model.config.routing != "none":
        depth = model.recursion_depth_of(torch.tensor([prompts[0] + outputs["req_0"].generated_tokens]))
        assert depth.min() < depth.max(), "the routers should make mixed decisions"


def test_engine_equals_left_padded_batched_generate():
    model = _model(routing="expert_choice")
    prompts = _prompts(count=6)
    config = _greedy()
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(-1)).long()
    padded = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    outputs = model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    )
    assert [output.generated_tokens for output in outputs.values()] == padded[:, width:].tolist()


def test_every_recursion_step_drops_some_tokens():
    """The routers of the exactness tests make mixed decisions: tokens leave the recursion at every depth."""
    model = _model(routing="expert_choice")
    with model.continuous_batching_context_manager(
        generation_config=_greedy(), continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    ) as manager:
        request_ids = manager.add_requests(_prompts())
        for _ in request_ids:
            assert manager.get_result(timeout=60) is not None
        histogram = manager.engine_stats()["depth_histogram"]
    assert set(histogram) == {1, 2, 3} and min(histogram.values()) > 10, histogram


def test_manager_streams_the_same_tokens_and_honours_per_request_limits():
    model = _model(routing="expert_choice")
    prompts = _prompts(count=6)
    config = _greedy(max_new_tokens=8)
    expected = [_reference(model, prompt, config) for prompt in prompts]
    eos = expected[2][3]  # request 2 stops at its 4th token (or earlier, where the same token appears before)
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    ) as manager:
        assert isinstance(manager, MoRContinuousBatchingManager)
        streamed = manager.add_request(prompts[0], request_id="streamed", streaming=True)
        short = manager.add_request(prompts[1], request_id="short", max_new_tokens=3)
        stops = manager.add_request(prompts[2], request_id="stops", eos_token_id=eos)
        others = [manager.add_request(prompt) for prompt in prompts[3:]]
        partial = [output.generated_tokens for output in manager.request_id_iter(streamed)]
        results = {}
        while len(results) < 2 + len(others):
            result = manager.get_result(timeout=60)
            results[result.request_id] = result
    assert partial == [expected[0][: n + 1] for n in range(8)], "one streamed output per token, then the final one"
    assert results[short].generated_tokens == expected[1][:3]
    stop_at = expected[2].index(eos)
    assert results[stops].generated_tokens == expected[2][: stop_at + 1]
    assert [results[request_id].generated_tokens for request_id in others] == expected[3:]


def test_sampling_with_a_seed_is_reproducible_and_independent_of_the_batch():
    model = _model(routing="expert_choice")
    prompts = _prompts(count=8)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0)

    def run(seed, requests, slots):
        engine = ContinuousBatchingConfig(seed=seed, max_requests_per_batch=slots, max_batch_tokens=8, page_size=4)
        outputs = model.generate_batch(requests, generation_config=config, continuous_batching_config=engine)
        return [output.generated_tokens for output in outputs.values()]

    first = run(seed=3, requests=prompts, slots=5)
    assert run(seed=3, requests=prompts, slots=5) == first
    # A request's generator is seeded from its id: the same tokens with other slots and other neighbours in flight.
    assert run(seed=3, requests=prompts[:2], slots=1) == first[:2]
    assert run(seed=4, requests=prompts, slots=5) != first


@pytest.mark.parametrize("policy", ["recursion_wise", "shared"])
def test_pages_hold_exactly_the_routed_tokens_and_return_to_the_pool(policy):
    model = _model(routing="expert_choice", kv_cache_policy=policy)
    prompts = _prompts()
    page_size = SMALL_ENGINE["page_size"]
    with model.continuous_batching_context_manager(
        generation_config=_greedy(), continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    ) as manager:
        request_ids = manager.add_requests(prompts)
        outputs = {}
        while len(outputs) < len(request_ids):
            result = manager.get_result(timeout=60)
            outputs[result.request_id] = result
        processor = manager.batch_processor
        accounting = dict(processor.accounting)
        storage = processor.storage
        assert all(len(pool.free_pages) == pool.num_pages for pool in storage.unique_pools()), "pages returned"
        assert all((pool.slot_token_index == -1).all() for pool in storage.unique_pools())
    for request_id, prompt in zip(request_ids, prompts):
        # Every token the model ran (the last sampled token never runs): the uncached forward gives their depths.
        sequence = prompt + outputs[request_id].generated_tokens[:-1]
        depth = model.recursion_depth_of(torch.tensor([sequence]))[0]
        expected = {END_LAYERS: len(sequence)}
        for step in range(1 if policy == "shared" else model.config.num_recursions):
            expected[step] = int((depth > step).sum())
        assert accounting[request_id]["tokens"] == expected
        assert accounting[request_id]["pages"] == {key: -(-count // page_size) for key, count in expected.items()}


def test_requests_wait_for_pages_and_none_is_dropped():
    """A pool with room for about two requests: the others wait (or give their pages back and are recomputed)."""
    model = _model(routing="expert_choice")
    prompts = _prompts(count=10, low=10, high=20)
    config = _greedy(max_new_tokens=12)
    engine = ContinuousBatchingConfig(max_requests_per_batch=6, max_batch_tokens=8, page_size=4, num_blocks=16)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=engine)
    for output, prompt in zip(outputs.values(), prompts):
        assert output.error is None
        assert output.generated_tokens == _reference(model, prompt, config)


def test_bad_requests_fail_alone_with_a_clear_error():
    model = _model(routing="expert_choice")
    prompts = _prompts(count=4)
    too_long = list(range(1, 100))  # 99 tokens + 9 new: 27 pages of 4, the pool has 20
    engine = ContinuousBatchingConfig(num_blocks=20, **SMALL_ENGINE)
    outputs = model.generate_batch([prompts[0], [], too_long, *prompts[1:]], generation_config=_greedy(),
                                   continuous_batching_config=engine)
    results = list(outputs.values())
    assert "empty prompt" in results[1].error and results[1].status == RequestStatus.FAILED
    assert "more than the pool" in results[2].error and "num_blocks" in results[2].error
    for result, prompt in zip([results[0], *results[3:]], prompts):
        assert result.error is None and result.generated_tokens == _reference(model, prompt, _greedy())


def test_generate_batch_fills_unset_fields_from_the_model_generation_config():
    """The snippet of docs/serving.md, `GenerationConfig(max_new_tokens=..., do_sample=False)`, leaves `eos_token_id`
    unset: like generate(), generate_batch takes it from `model.generation_config` and stops there."""
    model = _model(routing="expert_choice")
    prompts = _prompts(count=4)
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    unstopped = [_reference(model, prompt, config) for prompt in prompts]
    model.generation_config.eos_token_id = unstopped[1][4]  # request 1 stops at its 5th token or earlier
    model.generation_config.pad_token_id = 0
    outputs = list(model.generate_batch(prompts, generation_config=config).values())
    for output, prompt, tokens in zip(outputs, prompts, unstopped):
        expected = _reference(model, prompt, config)
        if model.generation_config.eos_token_id in tokens:
            expected = tokens[: tokens.index(model.generation_config.eos_token_id) + 1]
            assert len(expected) < 12
        assert output.error is None and output.generated_tokens == expected
    assert len(outputs[1].generated_tokens) <= 5
    assert config.eos_token_id is None, "the caller's config is left as it is"


def test_generate_batch_takes_the_length_rule_of_generate():
    """One rule for both: generate()'s (transformers' `_prepare_generated_length` and `_validate_generated_length`).
    With max_new_tokens set, a prompt longer than the model's positions is served (as generate() serves it); without
    it, the default length is capped at the model's positions, so a prompt that fills them is refused by both with the
    same message and one just under them gets the few tokens left."""
    model = _model(routing="expert_choice", max_position_embeddings=32)
    long_prompt, near_limit, short = _prompts(count=1, low=40, high=41)[0], _prompts(count=1, low=30, high=31)[0], [5, 6, 7]
    with_limit = _greedy(max_new_tokens=4)
    outputs = list(model.generate_batch([long_prompt, short], generation_config=with_limit).values())
    assert [output.generated_tokens for output in outputs] == [_reference(model, p, with_limit) for p in (long_prompt, short)]
    assert len(outputs[0].generated_tokens) == 4

    default_length = GenerationConfig(do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError) as refused_by_generate:
        _reference(model, long_prompt, default_length)
    outputs = list(model.generate_batch([long_prompt, near_limit, short], generation_config=default_length).values())
    assert outputs[0].status == RequestStatus.FAILED and outputs[0].error == str(refused_by_generate.value)
    for output, prompt in zip(outputs[1:], (near_limit, short)):
        assert output.error is None and output.generated_tokens == _reference(model, prompt, default_length)
    assert len(outputs[1].generated_tokens) == 2 and len(outputs[2].generated_tokens) == 20


def test_beam_search_is_refused_per_request():
    model = _model(routing="expert_choice")
    outputs = model.generate_batch(_prompts(count=2), generation_config=_greedy(num_beams=2),
                                   continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE))
    assert all("beam search" in output.error and "not supported" in output.error for output in outputs.values())


def _generation_threads():
    return [thread for thread in threading.enumerate() if "_run_generation_loop" in repr(getattr(thread, "_target", ""))]


def test_stop_and_cancellation_leave_no_thread():
    model = _model(routing="expert_choice")
    manager = model.init_continuous_batching(generation_config=_greedy(max_new_tokens=40),
                                             continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE))
    manager.start()
    kept = manager.add_request(_prompts(count=1)[0], max_new_tokens=5)
    cancelled = manager.add_request(_prompts(count=2)[1])
    manager.cancel_request(cancelled)
    result = manager.get_result(request_id=kept, timeout=60)
    while result is not None and result.request_id != kept:
        result = manager.get_result(request_id=kept, timeout=60)
    assert result is not None and len(result.generated_tokens) == 5
    manager.stop(block=True, timeout=30)
    assert not manager.is_running() and not _generation_threads()


def test_a_fault_in_the_batch_processor_marks_the_manager_dead(monkeypatch):
    from modeling_mor.serving_mor import DepthwiseBatchProcessor

    model = _model(routing="expert_choice")

    def broken_step(self, model):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(DepthwiseBatchProcessor, "_generation_step", broken_step)
    manager = model.init_continuous_batching(generation_config=_greedy(),
                                             continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE))
    manager.start()
    request_id = manager.add_request(_prompts(count=1)[0])
    result = manager.get_result(timeout=60)
    assert result.request_id == request_id and "simulated kernel failure" in result.error
    manager.join(stop_trigger_time=0, timeout=30)
    assert isinstance(manager.background_thread_status.fatal_error, RuntimeError)
    assert manager.get_result(timeout=1) is None, "a dead manager answers at once instead of hanging"
    assert not manager.is_running()
    manager.stop()


def test_sequence_strategies_are_refused_clearly():
    model = _model(routing="none", sharing_strategy="sequence", num_hidden_layers=6, num_recursions=2)
    with pytest.raises(ValueError, match="cycle strategies"):
        model.init_continuous_batching(generation_config=_greedy())


def test_remote_code_serves_generate_batch(tmp_path):
    """A user with only trust_remote_code=True gets MoR's engine (a fresh process that cannot import the project)."""
    from test_save_load import run_isolated

    model = _model(routing="expert_choice")
    model.save_pretrained(tmp_path / "checkpoint")
    prompts = _prompts(count=4)
    expected = [_reference(model, prompt, _greedy()) for prompt in prompts]
    stdout = run_isolated(
        f"""
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True).eval()
        config = GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=0)
        outputs = model.generate_batch({prompts!r}, generation_config=config,
                                       continuous_batching_config=ContinuousBatchingConfig(page_size=4))
        print(type(model.init_continuous_batching()).__name__)
        print([output.generated_tokens for output in outputs.values()])
        """,
        cwd=tmp_path,
    )
    manager_name, tokens = stdout.strip().splitlines()[-2:]
    assert manager_name == "MoRContinuousBatchingManager"
    assert tokens == repr(expected)


def test_transformers_default_page_size_reads_as_unset():
    """transformers' default page (256 tokens, sized for its GPU kernels) would waste most of every page per recursion
    step: MoR's engine takes its own default (4) then, and any other value as given."""
    model = _model(routing="expert_choice")
    default = model.init_continuous_batching(generation_config=_greedy(), continuous_batching_config=ContinuousBatchingConfig())
    assert default._create_batch_processor().storage.page_size == DEFAULT_PAGE_SIZE == 4
    chosen = model.init_continuous_batching(generation_config=_greedy(),
                                            continuous_batching_config=ContinuousBatchingConfig(page_size=32))
    assert chosen._create_batch_processor().storage.page_size == 32


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_row_buckets_attend_as_one_padded_call(implementation):
    """Rows of 1, 1, 3 and 5 queries over keys of different lengths: attention per range of equal query counts
    gives every real query what one call over the padded layout gives it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from modeling_mor.packing_mor import RowBuckets, build_attention_mask

    torch.manual_seed(0)
    config = tiny_mor_config()
    config._attn_implementation = implementation
    module = MoRForCausalLM(config).model.recursion_block.layers[0].self_attn
    query_counts, key_lengths = [1, 1, 3, 5], [4, 9, 6, 12]
    rows, width, keys_width, heads, head_dim = 4, 5, 12, config.num_attention_heads, module.head_dim
    query = torch.randn(rows, heads, width, head_dim)
    kv_heads = config.num_key_value_heads
    key, value = torch.randn(rows, kv_heads, keys_width, head_dim), torch.randn(rows, kv_heads, keys_width, head_dim)
    key_index = torch.arange(keys_width).expand(rows, keys_width)
    key_valid = key_index < torch.tensor(key_lengths).unsqueeze(-1)
    # Each row's queries are its last tokens.
    query_index = torch.tensor(key_lengths).unsqueeze(-1) - torch.tensor(query_counts).unsqueeze(-1) + torch.arange(width)
    query_valid = torch.arange(width) < torch.tensor(query_counts).unsqueeze(-1)
    mask = build_attention_mask(config, query_index.masked_fill(~query_valid, -1), key_index, key_valid, torch.float32)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None) if implementation != "eager" else None
    if interface is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as interface
    expected, _ = interface(module, query, key, value, mask, scaling=module.scaling, dropout=0.0)
    buckets = RowBuckets.of(query_counts, key_lengths)
    assert buckets.ranges == ((0, 2, 1, 9), (2, 3, 3, 6), (3, 4, 5, 12))
    output, weights = buckets.attend(interface, module, query, key, value, mask, scaling=module.scaling, dropout=0.0)
    assert weights is None
    torch.testing.assert_close(output[query_valid], expected[query_valid], rtol=1e-6, atol=1e-6)


def test_prefill_chunks_and_decode_tokens_share_block_passes_and_attend_apart(monkeypatch):
    """A block pass holds prefill chunks next to decode tokens; their attention runs per range of equal query
    counts (one-token rows together), so a decode row does not pay for a chunk's queries."""
    from modeling_mor.packing_mor import RowBuckets

    mixed_passes = []
    attend = RowBuckets.attend

    def counting_attend(self, *args, **kwargs):
        query_widths = [query_width for _, _, query_width, _ in self.ranges]
        if 1 in query_widths and max(query_widths) > 1:
            mixed_passes.append(query_widths)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(RowBuckets, "attend", counting_attend)
    model = _model(routing="expert_choice")
    prompts = _prompts()
    config = _greedy()
    outputs = model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE)
    )
    assert mixed_passes, "no pass mixed prefill chunks with decode tokens"
    assert all(sorted(widths) == widths and widths.count(1) == 1 for widths in mixed_passes)
    assert [output.generated_tokens for output in outputs.values()] == [_reference(model, p, config) for p in prompts]


def test_generate_batch_serves_in_the_calling_thread(monkeypatch):
    """generate_batch only waits for its results: the engine runs in the caller's thread (no background thread,
    whose OpenMP workers would be throttled on CPU), with the same results; the manager API keeps its thread."""
    from modeling_mor.serving_mor import DepthwiseBatchProcessor

    threads = set()
    step = DepthwiseBatchProcessor._generation_step

    def recording_step(self, model):
        threads.add(threading.get_ident())
        return step(self, model)

    monkeypatch.setattr(DepthwiseBatchProcessor, "_generation_step", recording_step)
    model = _model(routing="expert_choice")
    prompts = _prompts(count=8)
    config = _greedy()
    def running():  # tqdm starts its monitor thread with transformers' progress bar
        return {thread for thread in threading.enumerate() if thread.name != "tqdm_monitor"}

    running_before = running()
    outputs = model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE),
        persistent_manager=True,
    )
    assert threads == {threading.get_ident()}
    assert running() == running_before
    assert [output.generated_tokens for output in outputs.values()] == [_reference(model, p, config) for p in prompts]

    # The manager kept by persistent_manager=True serves from its background thread when used directly.
    threads.clear()
    manager = model.init_continuous_batching(generation_config=config)
    assert not manager.in_calling_thread
    manager.start()
    request_id = manager.add_request(prompts[0])
    result = manager.get_result(request_id=request_id, timeout=60)
    while not result.is_finished():
        result = manager.get_result(request_id=request_id, timeout=60)
    manager.stop(block=True, timeout=30)
    model.destroy_cached_continuous_batching_manager()
    assert result.generated_tokens == _reference(model, prompts[0], config)
    assert threads and threading.get_ident() not in threads


def test_a_fault_in_generate_batch_fails_every_request_without_hanging(monkeypatch):
    from modeling_mor.serving_mor import DepthwiseBatchProcessor

    def broken_step(self, model):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(DepthwiseBatchProcessor, "_generation_step", broken_step)
    model = _model(routing="expert_choice")
    prompts = _prompts(count=3)
    outputs = model.generate_batch(prompts, generation_config=_greedy(),
                                   continuous_batching_config=ContinuousBatchingConfig(**SMALL_ENGINE))
    assert len(outputs) == 3 and all("simulated kernel failure" in output.error for output in outputs.values())

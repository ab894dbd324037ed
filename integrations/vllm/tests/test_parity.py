"""vLLM serves every checkpoint variant with the tokens transformers' generate() gives it.

Each prompt's greedy tokens equal generate() on that prompt alone, although vLLM batches the prompts together and
splits the long ones into prefill chunks of 64 tokens, and the last prompt, sent once the others are done, finds its
first 128 tokens in vLLM's prefix cache (for checkpoints that store only routed tokens per recursion step, where
prefix caching is off, it recomputes them). The log-probabilities of the tokens match generate()'s, and the recursion
depths vLLM's model counted match the depths generate()'s tokens took. Served in bfloat16, the engines agree up to
the first exact tie in generate()'s logits, which bfloat16 rounding may break either way.
"""

from collections import Counter

import pytest
from vllm import SamplingParams, TokensPrompt
from vllm.config import CompilationMode

from mor_vllm.model import depth_counts_of

from conftest import serving
from reference_checkpoints import BFLOAT16_VARIANT, CONVERTED_VARIANT, VARIANTS


PREFIX_CACHE_BLOCK = 128  # vLLM's CPU block size: the last prompt shares 140 tokens with the one before


def prefix_cached_tokens(llm) -> int:
    """The tokens of the last prompt vLLM's prefix cache serves: none where the plugin turned prefix caching off
    (routed-token recursion-wise KV, routed_kv.py)."""
    return PREFIX_CACHE_BLOCK if llm.llm_engine.vllm_config.cache_config.enable_prefix_caching else 0


def fail_on_recompile(model) -> None:
    """In vLLM's worker: from now on a Dynamo recompile raises."""
    # Imported here: cloudpickle, which sends this function to the worker, cannot pickle Dynamo's config module as a
    # global it refers to.
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = True


def compiles_pieces(model) -> bool:
    """In vLLM's worker: whether the model compiled its static pieces (model.py)."""
    return model.model.compiles_pieces


# How each mode is asked for. vLLM's default (neither) serves MoR eagerly on the CPU (mor_vllm.checks), so compiled
# mode is chosen explicitly.
MODES = {
    "eager": dict(enforce_eager=True),
    "compiled": dict(enforce_eager=False, compilation_config={"mode": CompilationMode.VLLM_COMPILE}),
}


def greedy(llm, prompts, new_tokens):
    # min_tokens as generate()'s min_new_tokens: EOS cannot be chosen before the last token.
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt) for prompt in prompts], params, use_tqdm=False)
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    logprobs = [
        [step[token].logprob for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
        for output in outputs
    ]
    return tokens, logprobs


# Every variant in vLLM's eager mode, in float32; two also with vLLM's torch.compile, chosen (the model compiles its
# token-wise work); the checkpoint saved in bfloat16 served in float32 (its weights upcast, as generate() runs them)
# and in bfloat16 (as generate() runs it in bfloat16).
CASES = [(variant, "eager", "float32") for variant in [*VARIANTS, BFLOAT16_VARIANT, CONVERTED_VARIANT]]
CASES += [("expert", "compiled", "float32"), ("token_shared", "compiled", "float32"), (BFLOAT16_VARIANT, "eager", "bfloat16")]


@pytest.mark.parametrize("variant,mode,dtype", CASES)
def test_greedy_tokens_equal_generate(references, variant, mode, dtype):
    folder, reference = references
    expected = reference[variant]
    if variant == BFLOAT16_VARIANT and dtype == "float32":
        expected = expected["float32"]
    new_tokens = len(expected["tokens"][0])
    with serving(folder / variant, **MODES[mode], dtype=dtype) as llm:
        assert llm.apply_model(compiles_pieces) == [mode == "compiled"]
        if mode == "compiled":
            # What the model compiled while vLLM started serves every batch that follows, down to one token: a
            # recompile (a second or two in the middle of serving) fails the test.
            llm.apply_model(fail_on_recompile)
        before = llm.apply_model(depth_counts_of)[0]  # compiled mode warms up on dummy batches
        tokens, logprobs = greedy(llm, expected["prompts"][:-1], new_tokens)
        last_tokens, last_logprobs = greedy(llm, expected["prompts"][-1:], new_tokens)
        depth_counts = [after - start for start, after in zip(before, llm.apply_model(depth_counts_of)[0])]
        cached = prefix_cached_tokens(llm)
    if dtype == "bfloat16":
        assert_bfloat16_greedy_agrees(tokens + last_tokens, logprobs + last_logprobs, expected)
        return
    assert_equals_generate(tokens + last_tokens, logprobs + last_logprobs, depth_counts, expected, cached)


def assert_equals_generate(tokens, logprobs, depth_counts, expected, cached_tokens, where=""):
    """vLLM's greedy tokens and their log-probabilities are generate()'s, and the tokens it ran took generate()'s
    depths: every token once, but the last prompt's first `cached_tokens`, which vLLM's prefix cache served."""
    assert len(tokens) == len(logprobs) == len(expected["tokens"]), where
    for index, (got, want) in enumerate(zip(tokens, expected["tokens"])):
        assert got == want, f"{where}prompt {index} ({len(expected['prompts'][index])} tokens)"
    for got, want in zip(logprobs, expected["logprobs"]):
        assert got == pytest.approx(want, abs=2e-3)
    ran = Counter(depth for depths in expected["depths"] for depth in depths)
    ran.subtract(expected["depths"][-1][:cached_tokens])
    assert depth_counts == [ran[depth] for depth in range(len(depth_counts))], where


BFLOAT16_TIE = 2e-2  # two logits closer than bfloat16's resolution at their size are a tie either engine may break


def assert_bfloat16_greedy_agrees(tokens, logprobs, expected):
    """In bfloat16 the engines' kernels round differently, so an exact tie in generate()'s logits (a random model
    has some) may be broken the other way. Each prompt's tokens equal generate()'s up to a step where generate()
    scored vLLM's token within BFLOAT16_TIE of its own; from there the two continue different texts. The
    log-probabilities agree up to that step."""
    for index, (got, want) in enumerate(zip(tokens, expected["tokens"])):
        step = next((step for step, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        assert logprobs[index][:step] == pytest.approx(expected["logprobs"][index][:step], abs=BFLOAT16_TIE)
        if step < len(want):
            runners_up = expected["top_logprobs"][index][step]
            assert str(got[step]) in runners_up, f"prompt {index}: vLLM's token {got[step]} at step {step} is not in generate()'s top 5"
            gap = expected["logprobs"][index][step] - runners_up[str(got[step])]
            assert gap <= BFLOAT16_TIE, f"prompt {index}: vLLM's token {got[step]} at step {step} scored {gap:.3f} below generate()'s"

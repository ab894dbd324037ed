"""Builds the checkpoints the vLLM tests serve, and what transformers' generate() gives for them.

Run with the project's own environment (transformers >= 5.24: the MoR model code), not vLLM's:

    .venv/bin/python integrations/vllm/tests/reference_checkpoints.py /tmp/mor-vllm-checkpoints

Every variant is a random-init MoR model with head_dim 64 (vLLM's CPU kernels take 32 and up) whose routers are
scaled so that eval-mode routing makes mixed decisions, saved with `save_pretrained` and the shipped stories260K
tokenizer. `reference.json` holds, per variant, the prompts and generate()'s greedy tokens and their log-probabilities
for each prompt alone, and the recursion depth every token took.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


REPOSITORY = Path(__file__).resolve().parents[3]


DIMS = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_hidden_layers=8,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "none": dict(routing="none"),
    "expert": dict(routing="expert_choice"),
    "expert_auxiliary": dict(routing="expert_choice", router_inference="auxiliary", capacity=[1.0, 0.6, 0.3]),
    "expert_shared": dict(routing="expert_choice", kv_cache_policy="shared"),
    "expert_partial_first_step": dict(routing="expert_choice", capacity=[0.7, 0.5, 0.3]),
    "expert_partial_first_step_shared": dict(routing="expert_choice", capacity=[0.7, 0.5, 0.3], kv_cache_policy="shared"),
    "expert_mlp_router": dict(routing="expert_choice", router_type="mlp", router_activation="tanh", gating="update"),
    "expert_cycle": dict(routing="expert_choice", sharing_strategy="cycle", num_hidden_layers=6),
    "expert_relaxed": dict(routing="expert_choice", relaxation_rank=4),
    # Every projection's delta of full rank: per-step weights, stored merged (relaxation_delta for the later steps).
    "expert_relaxed_full_rank": dict(routing="expert_choice", relaxation_rank=128),
    # Rank 64: the K and V projections' deltas (64 wide) are full rank and stored whole, the others' low-rank.
    "expert_relaxed_mixed_rank": dict(routing="expert_choice", relaxation_rank=64),
    "token": dict(routing="token_choice"),
    "token_shared": dict(routing="token_choice", kv_cache_policy="shared"),
    "token_loss_free": dict(routing="token_choice", balancing="loss_free", gating="update"),
    "none_middle_sequence": dict(routing="none", sharing_strategy="middle_sequence"),
    # Tied input/output embeddings, as in stories260K, SmolLM2 and most small Llamas (so in every conversion of them).
    "expert_tied": dict(routing="expert_choice", tie_word_embeddings=True),
    "expert_shared_tied": dict(routing="expert_choice", kv_cache_policy="shared", tie_word_embeddings=True),
}
# A tied SmolLM2-shaped Llama (head_dim 64, 3 query heads per KV head, SiLU MLP 8/3 wide) converted by the project's
# converter as mor-convert's defaults convert it (middle_cycle, --num-recursions auto: 2 for its 6 layers, full-rank
# relaxation, auxiliary routers, update gating), its routers then scaled like the other variants' so that they make
# mixed decisions.
CONVERTED_VARIANT = "converted_smollm2_shape"
SMOLLM2_SHAPE = dict(
    vocab_size=512, hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1,
    num_hidden_layers=6, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
BFLOAT16_VARIANT = "expert_bfloat16"  # the "expert" model saved in bfloat16
TOP_LOGPROBS = 5


def prompts() -> list[list[int]]:
    """Short and long prompts: the long ones span several prefill chunks, and the last one shares its first 140
    tokens with the one before (a prefix-cache hit of one 128-token block in vLLM)."""
    generator = torch.Generator().manual_seed(1)
    short = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (5, 23, 41)]
    long = torch.randint(3, 512, (150,), generator=generator).tolist()
    tail = torch.randint(3, 512, (12,), generator=generator).tolist()
    return short + [long, long[:140] + tail]


def build(overrides: dict, dtype=torch.float32):
    from modeling_mor import MoRConfig, MoRForCausalLM

    torch.manual_seed(0)
    model = MoRForCausalLM(MoRConfig(**{**DIMS, **overrides})).eval()
    with torch.no_grad():
        # A fresh model's per-step deltas are zero (B, or the whole delta): make each step's projections differ.
        for name, parameter in model.named_parameters():
            if name.endswith(("relaxation_B", "relaxation_delta")):
                parameter.normal_(std=0.02)
    return mix_routing_decisions(model).to(dtype)


def build_converted():
    from transformers import LlamaConfig, LlamaForCausalLM

    from conversion.convert_llama_to_mor import convert_llama_to_mor, default_num_recursions

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval()
    num_recursions = default_num_recursions(SMOLLM2_SHAPE["num_hidden_layers"], "middle_cycle")
    model = convert_llama_to_mor(source, num_recursions=num_recursions, sharing_strategy="middle_cycle",
                                 relaxation_rank=SMOLLM2_SHAPE["hidden_size"]).eval()
    assert model.config.tie_word_embeddings and model.config.router_inference == "auxiliary"
    assert model.config.has_full_rank_relaxation
    with torch.no_grad():
        # A fresh conversion's auxiliary routers let every token continue (a large bias); a trained one decides.
        for router in model.model.recursion_block.routing.auxiliary_routers.values():
            router.output_layer.bias.zero_()
    return mix_routing_decisions(model)


@torch.no_grad()
def mix_routing_decisions(model):
    """Scales the routers of a random or freshly converted model so that eval-mode routing sends some tokens deeper
    and others out."""
    for router in model.routers():
        for parameter in router.parameters():
            parameter.mul_(40.0)
    if model.config.routing == "expert_choice" and model.config.router_inference == "auxiliary":
        for router in model.model.recursion_block.routing.auxiliary_routers.values():
            router.output_layer.weight.normal_(0, 2.0)
    return model


@torch.no_grad()
def reference(model, prompt_list: list[list[int]], new_tokens: int) -> dict:
    tokens, logprobs, top_logprobs, depths = [], [], [], []
    for prompt in prompt_list:
        output = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            return_dict_in_generate=True, output_logits=True, output_recursion_depth=True,
        )
        generated = output.sequences[0, len(prompt):]
        # From the raw logits, as vLLM returns log-probabilities by default (min_new_tokens masks EOS in the scores).
        scores = torch.stack(output.logits)[:, 0].float().log_softmax(-1)
        tokens.append(generated.tolist())
        logprobs.append(scores.gather(-1, generated.unsqueeze(-1)).squeeze(-1).tolist())
        # The runners-up at every step: in bfloat16 a near-tie may go either way in another engine's kernels.
        best = scores.topk(TOP_LOGPROBS, dim=-1)
        top_logprobs.append([dict(zip(map(str, ids.tolist()), values.tolist())) for values, ids in zip(*best)])
        # The recursion depth of every prompt token and every generated token but the last, which is never run.
        depths.append(output["recursion_depth"][0, :-1].tolist())
    return {
        "prompts": prompt_list, "tokens": tokens, "logprobs": logprobs, "top_logprobs": top_logprobs, "depths": depths
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="folder to write one checkpoint per variant and reference.json")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    args = parser.parse_args()
    # Imported here, not at the top: the tests, in vLLM's environment, import this file for its variant names.
    sys.path.insert(0, str(REPOSITORY))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPOSITORY / "examples" / "assets" / "stories260K")
    references = {}
    for name, overrides in [*VARIANTS.items(), (BFLOAT16_VARIANT, VARIANTS["expert"]), (CONVERTED_VARIANT, None)]:
        dtype = torch.bfloat16 if name == BFLOAT16_VARIANT else torch.float32
        model = build_converted() if name == CONVERTED_VARIANT else build(overrides, dtype)
        folder = args.output_dir / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        references[name] = reference(model, prompts(), args.new_tokens)
        if dtype != torch.float32:
            # Served in float32 too: the weights upcast, an exact reference.
            references[name]["float32"] = reference(model.float(), prompts(), args.new_tokens)
        # What an OpenAI-style completion of a text prompt gives: the tokenizer adds BOS, as vLLM's server does.
        text_prompt = tokenizer("Once upon a time", return_tensors="pt")
        completion = model.generate(**text_prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        references[name]["text_prompt"] = "Once upon a time"
        references[name]["text_completion_ids"] = completion[0, text_prompt["input_ids"].shape[1]:].tolist()
    (args.output_dir / "reference.json").write_text(json.dumps(references))


if __name__ == "__main__":
    main()

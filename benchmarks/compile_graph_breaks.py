"""Counts torch.compile graph breaks of an MoR model's uncached eval forward and of one cached decode step.

Uses `torch._dynamo.explain` (no compilation to machine code, so it runs in seconds on a CPU) on a small random
expert-choice model whose routers make mixed decisions, with fixed seeds.

Example:
    python benchmarks/compile_graph_breaks.py --routing expert_choice token_choice --reasons 5
"""

import argparse
from collections import Counter

import torch

from modeling_mor import MoRCache, MoRConfig, MoRForCausalLM


def build_model(routing: str, kv_cache_policy: str, seed: int) -> MoRForCausalLM:
    torch.manual_seed(seed)
    config = MoRConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, num_recursions=3, sharing_strategy="middle_cycle", routing=routing,
        kv_cache_policy=kv_cache_policy, pad_token_id=0,
    )
    model = MoRForCausalLM(config).eval()
    with torch.no_grad():  # large router weights: random-init routers then make mixed decisions
        for router in model.routers():
            for parameter in router.parameters():
                parameter.mul_(40.0)
    return model


def explain(function, *args):
    with torch.no_grad():
        explanation = torch._dynamo.explain(function)(*args)
    reasons = Counter(reason.reason.splitlines()[0].strip() for reason in explanation.break_reasons)
    return explanation.graph_break_count, reasons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", nargs="+", default=["expert_choice", "token_choice"])
    parser.add_argument("--kv-cache-policy", default="recursion_wise", choices=["recursion_wise", "shared"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reasons", type=int, default=3, help="how many of the most common break reasons to print")
    args = parser.parse_args(argv)

    for routing in args.routing:
        model = build_model(routing, args.kv_cache_policy, args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        input_ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0

        def eval_forward(input_ids, attention_mask):
            return model(input_ids, attention_mask=attention_mask, use_cache=False).logits

        cache = MoRCache(model.config)
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask, cache=cache)
        step_mask = torch.cat([attention_mask, attention_mask.new_ones(2, 1)], dim=-1)

        def decode_step(next_tokens, step_mask, cache):
            return model(next_tokens, attention_mask=step_mask, cache=cache).logits

        torch._dynamo.reset()
        for name, function, function_args in (
            ("uncached eval forward", eval_forward, (input_ids, attention_mask)),
            ("cached decode step", decode_step, (input_ids[:, -1:], step_mask, cache)),
        ):
            breaks, reasons = explain(function, *function_args)
            print(f"{routing:>13} {name:>22}: {breaks} graph breaks")
            for reason, count in reasons.most_common(args.reasons):
                print(f"{'':>16}{count} x {reason}")


if __name__ == "__main__":
    main()

"""Training-step throughput (tokens/s, forward + backward) of MoR against a vanilla Llama.

Three models with the same width and unrolled depth L: a vanilla `LlamaForCausalLM`; MoR with routing "none" (the
recursive baseline: it should cost what the vanilla model costs); MoR expert-choice middle_cycle with the default
capacities (it should approach the ideal FLOP ratio, 2 + B * sum(capacity) layer applications per token instead of L, plus the LM head).
Steps of the three models are interleaved, so machine noise hits them alike; the median step time is reported.

Example:

    python benchmarks/train_throughput.py --num-layers 14 --hidden-size 512 --batch-size 4 --seq-len 256 --steps 5
"""

import argparse
import statistics
import time

import torch

from common import add_model_arguments, build_models, layer_applications_per_token, matmul_flop_ratio, synchronize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warm-up step)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    variants = {
        "vanilla Llama": None,
        "MoR routing=none": dict(routing="none", sharing_strategy="middle_cycle"),
        "MoR expert-choice": dict(routing="expert_choice", sharing_strategy="middle_cycle"),
    }
    models = build_models(args, variants)
    input_ids = torch.randint(1, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    tokens = input_ids.numel()

    def train_step(name):
        model = models[name].train()
        synchronize(args.device)
        start = time.perf_counter()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        synchronize(args.device)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    for name in models:
        train_step(name)  # warm-up
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            times[name].append(train_step(name))

    with torch.no_grad():
        depth = models["MoR expert-choice"](input_ids, output_recursion_depth=True).recursion_depth  # training mode
    config = models["MoR expert-choice"].config
    flop_ratio = matmul_flop_ratio(models["vanilla Llama"].config, config, depth)

    print(f"device={args.device} dtype={args.dtype} L={args.num_layers} hidden={args.hidden_size} "
          f"batch={args.batch_size} seq={args.seq_len} steps={args.steps} (median step time)")
    baseline = statistics.median(times["vanilla Llama"])
    recursive = statistics.median(times["MoR routing=none"])
    print(f"{'model':<20}{'tokens/s':>12}{'vs vanilla':>12}{'vs routing=none':>17}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20}{tokens / median:>12.0f}{baseline / median:>11.2f}x{recursive / median:>16.2f}x")
    measured = recursive / statistics.median(times["MoR expert-choice"])
    print(f"expert-choice capacities {['%.2f' % c for c in config.capacity]}, B={config.block_size}: ideal "
          f"(matmul FLOP) speed-up over routing=none {flop_ratio:.2f}x (layer applications per token "
          f"{layer_applications_per_token(config, depth):.2f} vs {config.num_hidden_layers}); measured {measured:.2f}x "
          f"= {100 * (measured - 1) / (flop_ratio - 1):.0f}% of the ideal gain")


if __name__ == "__main__":
    main()

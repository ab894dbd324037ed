"""How the time of vLLM's CPU matrix products follows the tokens a recursion step runs: the ceiling of MoR's decode
speed-up from its matmuls on this machine, beside the FLOP ideal.

A decode pass of vLLM's throughput benchmark (benchmarks/vllm_throughput.py) runs one token per sequence: 64 rows.
At a recursion step that only a share of the tokens takes, each shared layer's projections run on fewer rows, which
saves FLOPs in proportion but time less than in proportion: a product this small is partly bound by reading its
weights. This script times vLLM's own CPU GEMM (the kernel its linear layers dispatch to, `onednn_mm`) at the shapes
of one Llama layer (q/k/v, o, gate/up, down) for the rows each step runs at the given capacities, every size
interleaved round after round, and prints per step the time and the FLOPs relative to a full step, then, for the
whole model (the unshared layers at full rows), vanilla's matmul time over MoR's beside the FLOP ratio of the same
products. The measured ratio lies between common.py's two bounds: `matmul_flop_ratio` (time follows the rows;
it also counts the LM head) and `weight_pass_ratio` (time independent of the rows).

Runs in vLLM's environment. vLLM binds its engine to one core on a 2-core machine (docs/benchmarks.md), hence
`--threads 1` by default.

Example:

    python benchmarks/cpu_matmul_scaling.py --rows 64 --capacities 1 0.6667 0.3333 --threads 1
"""

import argparse
import statistics
import time

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def layer_shapes(args) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of a Llama layer's projections, as vLLM merges them."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {
        "qkv_proj": (args.hidden_size, q + 2 * kv),
        "o_proj": (q, args.hidden_size),
        "gate_up_proj": (args.hidden_size, 2 * args.intermediate_size),
        "down_proj": (args.intermediate_size, args.hidden_size),
    }


def vllm_linear(in_features: int, out_features: int) -> torch.nn.Linear:
    """A linear layer whose product runs through vLLM's CPU GEMM, as vLLM's unquantized linear layers do."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Linear(in_features, out_features, bias=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def time_layer(layers: dict[str, torch.nn.Linear], rows: int, calls: int) -> float:
    """Seconds for one layer's projections on `rows` rows (the mean of `calls` calls)."""
    inputs = {name: torch.randn(rows, layer.in_features) for name, layer in layers.items()}
    started = time.perf_counter()
    for _ in range(calls):
        for name, layer in layers.items():
            layer.cpu_linear(inputs[name], layer.weight, None)
    return (time.perf_counter() - started) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="tokens of a full step (decode: the running sequences)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[1.0, 2 / 3, 1 / 3],
                        help="share of the tokens taking each recursion step")
    parser.add_argument("--num-layers", type=int, default=14, help="unrolled layers L (vanilla's depth)")
    parser.add_argument("--block-size", type=int, default=4, help="shared layers B of the recursion block")
    parser.add_argument("--hidden-size", type=int, default=512, help="the layer's shape (the benchmark models')")
    parser.add_argument("--intermediate-size", type=int, default=1408, help="MLP width")
    parser.add_argument("--num-heads", type=int, default=8, help="query heads")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="key/value heads")
    parser.add_argument("--head-dim", type=int, default=64, help="dimension per head")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vLLM binds one core on 2)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    if args.num_layers < args.block_size * len(args.capacities):
        parser.error("--num-layers must cover the recursion block at every step (block size x steps)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = {name: vllm_linear(*shape) for name, shape in layer_shapes(args).items()}
    step_rows = [max(1, round(args.rows * capacity)) for capacity in args.capacities]
    sizes = sorted(set(step_rows) | {args.rows})
    for rows in sizes:  # warm-up: oneDNN builds a kernel per shape on its first call
        time_layer(layers, rows, 10)
    timings = {rows: [] for rows in sizes}
    for _ in range(args.rounds):
        for rows in sizes:
            timings[rows].append(time_layer(layers, rows, args.calls))
    seconds = {rows: statistics.median(values) for rows, values in timings.items()}

    full = seconds[args.rows]
    print(f"{args.threads} thread(s), {args.rows} rows at a full step, one layer's projections: "
          f"{full * 1e6:.0f} us at full rows")
    print(f"{'step':>5}{'capacity':>10}{'rows':>6}{'time vs full':>14}{'FLOPs vs full':>15}")
    for step, (capacity, rows) in enumerate(zip(args.capacities, step_rows), start=1):
        print(f"{step:>5}{capacity:>10.3f}{rows:>6}{seconds[rows] / full:>13.2f}x{rows / args.rows:>14.2f}x")

    unshared = args.num_layers - args.block_size * len(args.capacities)
    vanilla_time, vanilla_flops = args.num_layers * full, args.num_layers * args.rows
    mor_time = unshared * full + args.block_size * sum(seconds[rows] for rows in step_rows)
    mor_flops = unshared * args.rows + args.block_size * sum(step_rows)
    print(f"\nwhole model ({unshared} unshared layers at full rows, {args.block_size} shared layers per step): "
          f"vanilla's matmul time over MoR's {vanilla_time / mor_time:.2f}x, their FLOP ratio {vanilla_flops / mor_flops:.2f}x")


if __name__ == "__main__":
    main()

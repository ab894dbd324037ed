"""Serving throughput: many requests through synchronous generate() and through continuous batching, in one run.

One workload: `--num-requests` prompts of seeded random lengths in [`--min-prompt`, `--max-prompt`], `--new-tokens`
greedy tokens each. Models with the same width and unrolled depth (as benchmarks/decode_throughput.py): vanilla
`LlamaForCausalLM` through `generate()` in left-padded batches of `--generate-batch` and through transformers' own
`generate_batch` (paged attention); MoR routing "none" (the recursive baseline), MoR expert-choice with the
recursion-wise and the shared KV policy, each through `generate()` in batches and through MoR's depth-wise engine
(`generate_batch`) at every `--slots` value. Routers are random-init, scaled by `--router-scale` so that eval routing
makes mixed decisions.

Printed per row: new tokens/s, ratio to the best vanilla row, ratio to routing "none" in the same mode next to the
matmul-FLOP ideal from the depths every token actually took, and for the engine rows the peak KV bytes held next to
the routed-token ideal (exactly the tokens stored, no page rounding) and where an engine iteration's time goes.

Example:

    OMP_NUM_THREADS=1 python benchmarks/serving_throughput.py --num-requests 64 --new-tokens 128 --slots 16 32

This machine class is noisy (the same row has differed by 20% between sessions): `--repeats 3` measures every row
three times, round after round, and reports the median.
"""

import argparse
import statistics
import time

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from common import add_model_arguments, build_decode_models, matmul_flop_ratio, seeded_prompts, synchronize
from modeling_mor.serving_mor import IN_FLIGHT_PER_SLOT


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0, eos_token_id=None, bos_token_id=None)


@torch.no_grad()
def run_generate(model, prompts, args) -> tuple[float, list[list[int]]]:
    """Left-padded batches of `--generate-batch` prompts, in order."""
    outputs = []
    start = time.perf_counter()
    for first in range(0, len(prompts), args.generate_batch):
        batch = prompts[first : first + args.generate_batch]
        width = max(len(prompt) for prompt in batch)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=generation_config(args), disable_compile=True)
        outputs.extend(sequences[:, width:].tolist())
    synchronize(args.device)
    return time.perf_counter() - start, outputs


@torch.no_grad()
def run_engine(model, prompts, args, slots: int | None):
    """`generate_batch` (for MoR models in the calling thread, or `--engine-api manager`: the manager's background
    thread), and for MoR models the engine's statistics."""
    # Pages for `--requests-per-slot` requests per slot at their longest, as MoR's engine sizes its pool by default
    # (transformers would otherwise size its cache from the free memory).
    pages_per_request = -(-(args.max_prompt + args.new_tokens) // args.page_size) + 1
    num_pages = args.requests_per_slot * slots * pages_per_request
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=slots, page_size=args.page_size,
                                         max_batch_tokens=args.max_batch_tokens, num_blocks=num_pages)
    start = time.perf_counter()
    if hasattr(model, "routers") and args.engine_api == "manager":
        # The manager's background thread, as a server would run it.
        with model.continuous_batching_context_manager(generation_config=generation_config(args),
                                                       continuous_batching_config=cb_config) as manager:
            request_ids = manager.add_requests(prompts, max_new_tokens=args.new_tokens)
            results = {}
            while len(results) < len(request_ids):
                result = manager.get_result(timeout=60)
                if result is None:
                    raise RuntimeError("the engine stopped before every request finished")
                if result.is_finished():
                    results[result.request_id] = result
            stats = manager.engine_stats()
    elif hasattr(model, "routers"):
        # generate_batch serves in the calling thread; the kept manager gives the engine's statistics.
        results = model.generate_batch(prompts, generation_config=generation_config(args),
                                       continuous_batching_config=cb_config, persistent_manager=True)
        request_ids = list(results)
        stats = model._cached_continuous_batching_manager.engine_stats()
        model.destroy_cached_continuous_batching_manager()
    else:
        results = model.generate_batch(prompts, generation_config=generation_config(args),
                                       continuous_batching_config=cb_config, warmup=False)
        request_ids, stats = list(results), None
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    failed = [rid for rid in request_ids if results[rid].error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {results[failed[0]].error}")
    return elapsed, [results[rid].generated_tokens for rid in request_ids], stats


def depths_taken(model, prompts, outputs):
    """Recursion depth of every token each request ran through the model (prompt and generated tokens but the last,
    which is sampled and never run), from one uncached forward per request: eval routing is causal. Returns all of
    them and those of the generated tokens alone."""
    depths, decode_depths = [], []
    with torch.no_grad():
        for prompt, generated in zip(prompts, outputs):
            sequence = torch.tensor([prompt + generated[:-1]], device=next(model.parameters()).device)
            depth = model.recursion_depth_of(sequence)[0]
            depths.append(depth)
            decode_depths.append(depth[len(prompt) :])
    return torch.cat(depths), torch.cat(decode_depths)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, hidden_size=512, num_layers=14)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--generate-batch", type=int, default=16, help="batch size of the synchronous generate() rows")
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 32], help="concurrent requests of the engine rows")
    parser.add_argument("--page-size", type=int, default=4, help="tokens per KV page (the engine's default)")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="largest prefill chunk per iteration")
    parser.add_argument("--requests-per-slot", type=int, default=IN_FLIGHT_PER_SLOT,
                        help="KV pages for this many requests per slot at their longest (the engine's default pool)")
    parser.add_argument("--engine-api", choices=["generate_batch", "manager"], default="generate_batch",
                        help="serve the MoR engine rows through generate_batch (in the calling thread) or through the "
                             "manager's background thread (continuous_batching_context_manager)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every row this many times, interleaved, and report the median")
    parser.add_argument("--router-scale", type=float, default=40.0)
    parser.add_argument("--skip-vanilla-engine", action="store_true",
                        help="leave out transformers' own generate_batch for vanilla Llama")
    parser.add_argument("--check", action="store_true", help="check that every engine row's tokens equal generate()'s")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be 1 or more, got {args.repeats}")

    models = build_decode_models(args)
    prompts = seeded_prompts(args.num_requests, args)
    new_tokens = args.num_requests * args.new_tokens
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} L={args.num_layers} "
          f"hidden={args.hidden_size} requests={args.num_requests} prompts {args.min_prompt}-{args.max_prompt} "
          f"new={args.new_tokens} page={args.page_size} pool: {args.requests_per_slot} requests per slot at their longest, "
          f"repeats={args.repeats} (median)", flush=True)

    # Every row once per round, rounds one after another: a slow spell of the machine hits every row alike.
    runs = []  # (name, model, mode, slots or None for generate())
    for name, model in models.items():
        runs.append((name, model, f"generate() x{args.generate_batch}", None))
        engine_slots = args.slots if name.startswith("MoR") else ([] if args.skip_vanilla_engine else [max(args.slots)])
        for slots in engine_slots:
            mode = f"engine, {slots} slots" if name.startswith("MoR") else f"generate_batch, {slots} slots"
            runs.append((name, model, mode, slots))
    measured = {(name, mode): [] for name, _, mode, _ in runs}  # (seconds, stats, outputs) per round
    for round_index in range(args.repeats):
        for name, model, mode, slots in runs:
            if slots is None:
                seconds, outputs = run_generate(model, prompts, args)
                stats = None
            else:
                seconds, outputs, stats = run_engine(model, prompts, args, slots)
            measured[(name, mode)].append((seconds, stats, outputs))
            print(f"  [{round_index + 1}/{args.repeats}] {name:<28} {mode:<22} {new_tokens / seconds:8.1f} tok/s", flush=True)
    rows = []  # (name, mode, median seconds, the median run's stats, outputs)
    for name, _, mode, _ in runs:
        by_time = sorted(measured[(name, mode)], key=lambda run: run[0])
        _, stats, _ = by_time[(len(by_time) - 1) // 2]  # the median run (the lower one of an even count)
        rows.append((name, mode, statistics.median(run[0] for run in by_time), stats, measured[(name, mode)][0][2]))
    if args.check:
        for name, _, mode, _ in runs:
            reference = measured[(name, f"generate() x{args.generate_batch}")][0][2]
            for round_index, (_, _, outputs) in enumerate(measured[(name, mode)]):
                if outputs != reference:
                    mismatched = sum(a != b for a, b in zip(outputs, reference))
                    print(f"  warning: {name}, {mode}, round {round_index + 1}: {mismatched} of {len(outputs)} "
                          f"requests differ from generate()")

    vanilla_best = min(seconds for name, _, seconds, _, _ in rows if name == "vanilla Llama")
    ideal = {}
    for name, model in models.items():
        if name.startswith("MoR"):
            depth, decode_depth = depths_taken(model, prompts, rows[[r[0] for r in rows].index(name)][4])
            ideal[name] = (matmul_flop_ratio(models["vanilla Llama"].config, model.config, depth),
                           depth.float().mean().item(), decode_depth.float().mean().item())
    print(f"\n{'model':<28}{'mode':<24}{'tok/s':>8}{'vs vanilla':>11}{'vs none':>9}{'ideal':>7}{'gain %':>8}"
          f"{'depth':>7}{'KV MiB':>8}{'/ideal':>8}{'max':>8}")
    for name, mode, seconds, stats, _ in rows:
        line = f"{name:<28}{mode:<24}{new_tokens / seconds:>8.1f}{vanilla_best / seconds:>10.2f}x"
        none_row = [r for r in rows if r[0] == "MoR routing=none" and r[1] == mode]
        if name.startswith("MoR") and none_row:
            speedup = none_row[0][2] / seconds
            flop_ideal, mean_depth, _ = ideal[name]
            flop_ideal_vs_none = flop_ideal / ideal["MoR routing=none"][0]
            gain = 100 * (speedup - 1) / (flop_ideal_vs_none - 1) if flop_ideal_vs_none > 1.0001 else float("nan")
            line += f"{speedup:>8.2f}x{flop_ideal_vs_none:>6.2f}x{gain:>8.0f}{mean_depth:>7.2f}"
        else:
            line += " " * 36
        if stats is not None:
            line += f"{stats['peak_kv_bytes_held'] / 2**20:>8.1f}{stats['kv_held_over_ideal_at_peak']:>7.3f}x"
            line += f"{stats['peak_kv_held_over_ideal']:>7.3f}x"
        print(line)
    print("\nEngine iterations (MoR rows): seconds per part, mean tokens per block pass")
    for name, mode, seconds, stats, _ in rows:
        if stats is None:
            continue
        parts = "  ".join(f"{part} {value:.2f}s" for part, value in stats["seconds"].items())
        print(f"  {name:<28}{mode:<18} {stats['iterations']} iterations, {seconds / stats['iterations'] * 1e3:.1f} "
              f"ms each; {parts}; {stats['mean_block_pass_tokens']:.1f} tokens/pass")
    print("\nMean recursion depth of the generated tokens alone: " + ", ".join(
        f"{name} {values[2]:.2f}" for name, values in ideal.items()) + ". A decode iteration of the engine reads the "
        "weights of the 2 end layers and the B block layers once, and a token takes one iteration per recursion step, "
        "so where reading weights dominates the engine's ideal over routing=none is (2 + B N_r) / ((2 + B) x decode "
        "depth); where the matmuls are compute-bound it is the FLOP ideal.")
    print("\n'ideal': matmul-FLOP ratio over routing=none from the depths every token took (prompt included); "
          "'gain %': (speed-up - 1) / (ideal - 1). 'KV MiB': peak keys/values held in pages; '/ideal': held over the "
          "bytes of exactly the tokens stored, at that peak; 'max': the largest such ratio at any iteration (small "
          "holdings early in a request round up the most). Engine parts do not overlap: the layers of the block "
          "passes, those of the first/last layers with the head and sampling, attention in every pass (KV writes, page "
          "gathers, attention kernels), pass setup (page tables, masks, rotary) and scheduling.")


if __name__ == "__main__":
    main()

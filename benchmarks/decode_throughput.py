"""Decode throughput (new tokens/s) and KV-cache memory of MoR against a vanilla Llama, measured in one run.

Models with the same width and unrolled depth L: vanilla `LlamaForCausalLM`, with its default DynamicCache and with a
StaticCache (preallocated: no per-token copy of the cache); MoR routing "none" (the recursive baseline); MoR
expert-choice middle_cycle, with the recursion-wise and the shared KV policy. Each does greedy decoding of
`--new-tokens` after a `--prompt-len` prompt, at every batch size asked; runs are interleaved over `--repeats` rounds
and the median is reported. Routers are random-init with weights scaled by `--router-scale`, so that eval-mode routing
makes mixed decisions (an untrained router sits at the threshold); the depths actually taken are measured and give
two ideal speed-ups, by matmul FLOPs and by weight passes (see the note printed at the end), and the
ideal memory ratio (tokens stored per step). 'KV MiB' is everything a cache keeps (every tensor it holds), and for
MoR 'kept/ideal' sets it against the routed-token ideal (`MoRCache.memory_report`).

`--baseline-code FOLDER` also times the MoR models of another version of this repository (FOLDER holds its
`modeling_mor/`), with the same weights, in the same interleaved rounds: a change is measured against the code
before it in one run.

Examples:

    python benchmarks/decode_throughput.py --batch-sizes 1 16 --prompt-len 128 --new-tokens 128

    mkdir /tmp/before && git archive HEAD~1 modeling_mor | tar -x -C /tmp/before
    PYTHONPATH=. python benchmarks/decode_throughput.py --batch-sizes 16 --baseline-code /tmp/before
"""

import argparse
import importlib
import statistics
import time

import torch
from transformers import DynamicCache, StaticCache

from common import (
    add_model_arguments,
    build_decode_models,
    kept_bytes,
    load_baseline_package,
    matmul_flop_ratio,
    synchronize,
    weight_pass_ratio,
)

BASELINE = " [baseline code]"


@torch.no_grad()
def greedy_loop(model, prompt, new_tokens: int, cache):
    """Greedy decoding by calling the model directly: the model's own cost, without generate()'s per-step work."""
    logits = model(prompt, cache=cache, logits_to_keep=1).logits
    next_ids = logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 1):
        next_ids = model(next_ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return next_ids


def new_cache(name: str, model, max_cache_len: int):
    if name.startswith("MoR"):
        # The MoRCache of the model's own code (the current one or the baseline's).
        return importlib.import_module(type(model).__module__).MoRCache(model.config)
    if name.endswith("StaticCache"):
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    return DynamicCache(config=model.config)


def baseline_twins(models: dict, folder) -> dict:
    """The MoR models built by the code in `folder`, with the same config and weights."""
    baseline = load_baseline_package(folder)
    twins = {}
    for name, model in models.items():
        if name.startswith("MoR"):
            twin = baseline.MoRForCausalLM(baseline.MoRConfig.from_dict(model.config.to_dict()))
            twin.load_state_dict(model.state_dict())
            twins[name + BASELINE] = twin.to(device=model.device, dtype=model.dtype).eval()
    return twins


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, hidden_size=512, num_layers=14)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--router-scale", type=float, default=40.0)
    parser.add_argument("--mode", choices=["generate", "forward"], default="generate",
                        help="time model.generate() (what users see) or a plain greedy loop over model() calls")
    parser.add_argument("--baseline-code", metavar="FOLDER",
                        help="also time the MoR models of the modeling_mor/ in FOLDER (another version of this code)")
    args = parser.parse_args()

    models = build_decode_models(args)
    # The same vanilla model with a preallocated cache: DynamicCache concatenates, i.e. copies, every layer's cache
    # at every token, which a batch pays for; MoRCache grows in chunks instead.
    models = {"vanilla Llama": models["vanilla Llama"], "vanilla Llama, StaticCache": models["vanilla Llama"],
              **{name: model for name, model in models.items() if name.startswith("MoR")}}
    if args.baseline_code:
        models.update(baseline_twins(models, args.baseline_code))

    print(f"device={args.device} dtype={args.dtype} L={args.num_layers} hidden={args.hidden_size} "
          f"prompt={args.prompt_len} new={args.new_tokens} repeats={args.repeats} mode={args.mode} (median)")
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(1, args.vocab_size, (batch_size, args.prompt_len), generator=generator).to(args.device)
        times = {name: [] for name in models}
        caches = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, model in models.items():
                cache = new_cache(name, model, args.prompt_len + args.new_tokens)
                synchronize(args.device)
                start = time.perf_counter()
                if args.mode == "generate":
                    sequences = model.generate(
                        prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        cache=cache, return_dict_in_generate=True,
                        # On a GPU, generate() would compile vanilla Llama with a StaticCache (and not the others).
                        disable_compile=True,
                    ).sequences
                else:
                    greedy_loop(model, prompt, args.new_tokens, cache)
                    sequences = None
                synchronize(args.device)
                if repeat:
                    times[name].append(time.perf_counter() - start)
                caches[name] = (cache, sequences)

        new_tokens = batch_size * args.new_tokens
        baseline = statistics.median(times["vanilla Llama"])
        recursive = statistics.median(times["MoR routing=none"])
        recursive_bytes = kept_bytes(caches["MoR routing=none"][0])
        width = max(len(name) for name in models) + 2
        print(f"\nbatch {batch_size}")
        print(f"{'model':<{width}}{'tok/s':>9}{'vs vanilla':>12}{'vs none':>9}{'FLOPs':>8}{'weights':>9}{'KV MiB':>9}"
              f"{'vs none':>9}{'ideal':>8}{'kept/ideal':>11}{'mean depth':>12}")
        for name, model in models.items():
            median = statistics.median(times[name])
            cache, sequences = caches[name]
            nbytes = kept_bytes(cache)
            flop_ideal = weight_ideal = ideal_memory = kept_over_ideal = mean_depth = float("nan")
            if name.startswith("MoR"):
                if sequences is None:  # forward mode: the depths the generate run of the same prompt takes
                    sequences = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=False)
                with torch.no_grad():
                    depth = model.recursion_depth_of(sequences[:, :-1])  # the tokens the cache has seen
                mean_depth = depth.float().mean().item()
                flop_ideal = matmul_flop_ratio(models["vanilla Llama"].config, model.config, depth)
                decode_depth = depth[:, args.prompt_len :]
                weight_ideal = weight_pass_ratio(models["vanilla Llama"].config, model.config, decode_depth)
                full = model.config.num_recursions * depth.numel()
                ideal_memory = full / sum(cache.tokens_held_per_step()) if model.config.kv_cache_policy == "recursion_wise" else model.config.num_recursions
                # A baseline twin routes as its current-code model: the same tokens, the same ideal.
                kept_over_ideal = nbytes / caches[name.removesuffix(BASELINE)][0].memory_report()["kv_bytes_ideal"]
            print(f"{name:<{width}}{new_tokens / median:>9.1f}{baseline / median:>11.2f}x{recursive / median:>8.2f}x"
                  f"{flop_ideal:>7.2f}x{weight_ideal:>8.2f}x{nbytes / 2**20:>9.2f}{recursive_bytes / nbytes:>8.2f}x"
                  f"{ideal_memory:>7.2f}x{kept_over_ideal:>10.3f}x{mean_depth:>12.2f}")
        for name in models:
            if name.endswith(BASELINE):
                current, before = statistics.median(times[name.removesuffix(BASELINE)]), statistics.median(times[name])
                print(f"{name.removesuffix(BASELINE)}: current code {before / current:.3f}x the speed of the baseline "
                      f"code (medians {current:.2f} s vs {before:.2f} s)")
    print("\nIdeal speed-ups over routing=none: 'FLOPs', weight-matmul FLOPs of the depths taken by every token, prompt "
          "included (reached where matmuls are compute-bound); 'weights', layer passes of the decode steps only, where "
          "a step pays for recursion step r if any row's token takes it (the bound where reading the weights "
          "dominates, as in small-batch decoding; it leaves out the prefill). "
          "'ideal' memory: tokens a full recursion cache holds over the tokens this cache holds (recursion block only; "
          "unshared layers, index tensors and rows padded to the largest one make the measured ratio lower). "
          "'KV MiB': every tensor the cache keeps; 'kept/ideal': that over the keys/values of exactly the tokens "
          "stored (per recursion step, plus every token in the unshared end layers).")


if __name__ == "__main__":
    main()

"""Serving throughput in vLLM: vanilla Llama against MoR (integrations/vllm) on one workload, in one run.

Runs in vLLM's environment (vLLM and the mor-vllm plugin installed). The models are those of the serving benchmark
(benchmarks/save_decode_models.py: vanilla Llama, MoR routing none, MoR expert-choice recursion-wise and with shared
KV; one width, one unrolled depth L), built once with the project's environment (`--project-python`). Workload: seeded
random prompts of `--min-prompt`..`--max-prompt` tokens, `--new-tokens` greedy tokens each; each `--runs` entry
REQUESTSxCONCURRENCY serves that many requests with that many sequences at a time (vLLM's max_num_seqs).

Every row is measured in its own process (one vLLM engine each, the same KV cache budget `--kv-cache-gib` for all),
every row once per round, rounds one after another (this machine drifts 10-20% within minutes), and the median round
is reported. Printed per row: tokens/s, the ratio to the best vanilla row at that concurrency, the mean recursion
depth the served tokens took (counted by the model), the matmul-FLOP ideal over routing none from those depths, and
how many tokens of KV cache vLLM allotted in the budget, next to vanilla's, and the most requests it ran at once.

Example:

    python benchmarks/vllm_throughput.py --runs 64x16 128x64 --modes eager compiled --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import matmul_flop_ratio, seeded_prompts  # imports the project's model code only when asked to


REPOSITORY = Path(__file__).resolve().parents[1]
# vLLM's settings per --modes entry. "compiled" chooses the compilation mode: under vLLM's defaults vanilla compiles,
# but the plugin serves MoR eagerly on the CPU (mor_vllm.checks), so only a chosen mode measures MoR's compiled pieces.
MODES = {
    "eager": dict(enforce_eager=True),
    "compiled": dict(compilation_config={"mode": 3}),  # CompilationMode.VLLM_COMPILE
    "default": {},
}
ROWS = {  # folder written by save_decode_models.py -> row name
    "vanilla_llama": "vanilla Llama",
    "mor_routing_none": "MoR routing=none",
    "mor_expert_recursion_wise": "MoR expert, recursion-wise",
    "mor_expert_shared_kv": "MoR expert, shared KV",
}


def measure(args) -> dict:
    """One row once (the child process): serve the workload, return tokens/s, KV capacity and depth counts."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from mor_vllm.model import depth_counts_of

    prompts = seeded_prompts(args.requests, args)
    # disable_log_stats=False: the scheduler reports its state after every step (read by `PeakRunning`); every row runs
    # so, so rows of one run compare alike (figures from before this option ran without vLLM's stat loggers).
    llm = LLM(model=str(args.measure), skip_tokenizer_init=True, **MODES[args.mode], max_num_seqs=args.concurrency,
              kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), dtype=args.dtype,
              max_model_len=args.max_prompt + args.new_tokens, seed=0, disable_log_stats=False,
              block_size=args.block_size)
    params = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0.0, detokenize=False)
    is_mor = llm.llm_engine.vllm_config.model_config.hf_config.model_type == "mor"
    warm_up = [TokensPrompt(prompt_token_ids=prompt) for prompt in seeded_prompts(4, args)]
    llm.generate(warm_up, params, use_tqdm=False)
    before = llm.apply_model(depth_counts_of)[0] if is_mor else None
    peak = PeakRunning(llm)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    after = llm.apply_model(depth_counts_of)[0] if is_mor else None
    depth_counts = None if before is None else [b - a for a, b in zip(before, after)]
    result = {
        "tokens_per_second": sum(len(output.outputs[0].token_ids) for output in outputs) / seconds,
        "kv_tokens": kv_capacity(llm.collective_rpc(kv_cache_groups)[0], depth_counts),
        "peak_running": peak.running,
        "peak_kv_usage": peak.kv_usage,
        "depth_counts": depth_counts,
    }
    llm.llm_engine.engine_core.shutdown()
    return result


def kv_cache_groups(worker) -> dict:
    """What vLLM allocated (runs in the worker): its KV blocks, and per KV cache group the layers a block serves, its
    tokens per block, and the recursion step whose routed tokens it stores (None: every token)."""
    config = worker.model_runner.kv_cache_config
    groups = []
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        routed_step = spec.recursion_step if getattr(spec, "routed", False) else None
        groups.append({"layers": len(group.layer_names), "block_size": spec.block_size, "routed_step": routed_step})
    return {"num_blocks": config.num_blocks, "groups": groups}


def kv_capacity(allocation: dict, depth_counts: list[int] | None) -> int:
    """The tokens vLLM's KV cache holds at the depths the served tokens took: its layer slots (blocks x tokens per
    block x layers a block serves) over the layer slots a token takes (a group that stores routed tokens only takes
    a slot for the share of tokens that took its step). For a model whose every layer stores every token, vLLM's own
    figure (blocks x block size)."""
    widest = max(group["layers"] for group in allocation["groups"])  # vLLM pads smaller groups to the widest
    slots = allocation["num_blocks"] * allocation["groups"][0]["block_size"] * widest
    per_token = 0.0
    for group in allocation["groups"]:
        share = 1.0
        if group["routed_step"] is not None:
            share = sum(depth_counts[group["routed_step"] + 1:]) / sum(depth_counts)
        per_token += widest * share
    return int(slots / per_token)


class PeakRunning:
    """The most requests vLLM's scheduler ran at once, and the largest share of the KV cache it held, from the
    scheduler statistics every engine step reports (what bounds a memory-bound row: requests wait or are preempted
    when the KV cache is full)."""

    def __init__(self, llm):
        self.running, self.kv_usage = 0, 0.0
        manager = llm.llm_engine.logger_manager
        record = manager.record

        def recording(*positional, scheduler_stats=None, **keywords):
            if scheduler_stats is not None:
                self.running = max(self.running, scheduler_stats.num_running_reqs)
                self.kv_usage = max(self.kv_usage, scheduler_stats.kv_cache_usage)
            return record(*positional, scheduler_stats=scheduler_stats, **keywords)

        manager.record = recording


def run_row(folder: Path, mode: str, requests: int, concurrency: int, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(folder), "--mode", mode, "--requests", str(requests),
               "--concurrency", str(concurrency), "--dtype", args.dtype, "--kv-cache-gib", str(args.kv_cache_gib),
               "--min-prompt", str(args.min_prompt), "--max-prompt", str(args.max_prompt),
               "--new-tokens", str(args.new_tokens), "--vocab-size", str(args.vocab_size), "--seed", str(args.seed)]
    if args.block_size is not None:
        command += ["--block-size", str(args.block_size)]
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # LLM.apply_model(depth_counts_of)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{folder.name} ({mode}) failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def build_models(args) -> None:
    if all((args.models_dir / folder).is_dir() for folder in ROWS):
        return
    print(f"building the models in {args.models_dir} with {args.project_python}", flush=True)
    subprocess.run([str(args.project_python), str(REPOSITORY / "benchmarks" / "save_decode_models.py"),
                    str(args.models_dir), "--vocab-size", str(args.vocab_size)], check=True)


def flop_ideal(models_dir: Path, folder: str, depth_counts: list[int]) -> float:
    """The matmul-FLOP ratio of routing none over this row, from the depths its tokens took (common.py's model)."""
    from transformers import LlamaConfig

    from mor_vllm.configuration_mor import MoRConfig

    depth = torch.repeat_interleave(torch.arange(len(depth_counts)), torch.tensor(depth_counts))
    mor_config = MoRConfig.from_pretrained(models_dir / folder)
    vanilla_config = LlamaConfig.from_pretrained(models_dir / "vanilla_llama")
    return matmul_flop_ratio(vanilla_config, mor_config, depth)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["64x16", "128x64"], help="REQUESTSxCONCURRENCY workloads")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["eager", "compiled"],
                        help="eager: enforce_eager=True; compiled: vLLM's torch.compile, chosen (MoR compiles its "
                             "static pieces); default: neither, as a user gets it (vanilla compiled; MoR eager on the "
                             "CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median round of every row is reported")
    parser.add_argument("--models-dir", type=Path, default=REPOSITORY / "outputs" / "decode-models",
                        help="checkpoints of save_decode_models.py (built there when missing)")
    parser.add_argument("--project-python", type=Path, default=REPOSITORY / ".venv" / "bin" / "python",
                        help="Python of the project's environment, to build the checkpoints")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-gib", type=float, default=1.0,
                        help="KV cache budget of every row (0.234375 is the memory-bound row's 240 MiB)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV block for every row (default: vLLM's, 128 on the CPU)")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process: one row, once
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    workloads = []
    for run in args.runs:
        requests, _, concurrency = run.partition("x")
        if not (requests.isdigit() and concurrency.isdigit()):
            parser.error(f"--runs takes REQUESTSxCONCURRENCY entries such as 128x64, got {run!r}")
        workloads.append((int(requests), int(concurrency)))
    build_models(args)

    print(f"dtype={args.dtype} prompts {args.min_prompt}-{args.max_prompt} new={args.new_tokens} "
          f"KV budget {args.kv_cache_gib} GiB, block size {args.block_size or 'vLLM default'}, "
          f"repeats={args.repeats} (median)", flush=True)
    results = {}  # (folder, mode, requests, concurrency) -> list of results
    for round_index in range(args.repeats):
        for requests, concurrency in workloads:
            for mode in args.modes:
                for folder in ROWS:
                    result = run_row(args.models_dir / folder, mode, requests, concurrency, args)
                    results.setdefault((folder, mode, requests, concurrency), []).append(result)
                    print(f"  [{round_index + 1}/{args.repeats}] {requests} requests, {concurrency} at a time, "
                          f"{mode:<8} {ROWS[folder]:<28} {result['tokens_per_second']:8.1f} tok/s", flush=True)

    for requests, concurrency in workloads:
        print(f"\n{requests} requests, {concurrency} at a time")
        print(f"{'model':<28}{'mode':<10}{'tok/s':>8}{'vs best vanilla':>17}{'depth':>7}{'FLOP ideal':>12}"
              f"{'KV tokens':>11}{'vs vanilla':>12}{'peak running':>14}{'peak KV use':>13}")
        median = {key: statistics.median(r["tokens_per_second"] for r in runs) for key, runs in results.items()}
        best_vanilla = max(median[("vanilla_llama", mode, requests, concurrency)] for mode in args.modes)
        for folder, name in ROWS.items():
            for mode in args.modes:
                key = (folder, mode, requests, concurrency)
                first = results[key][0]
                line = f"{name:<28}{mode:<10}{median[key]:>8.1f}{median[key] / best_vanilla:>16.2f}x"
                if first["depth_counts"] is not None:
                    counts = first["depth_counts"]
                    mean_depth = sum(d * n for d, n in enumerate(counts)) / sum(counts)
                    line += f"{mean_depth:>7.2f}{flop_ideal(args.models_dir, folder, counts):>11.2f}x"
                else:
                    line += " " * 19
                vanilla_kv = results[("vanilla_llama", mode, requests, concurrency)][0]["kv_tokens"]
                line += f"{first['kv_tokens']:>11}{first['kv_tokens'] / vanilla_kv:>11.2f}x"
                line += f"{max(r['peak_running'] for r in results[key]):>14}"
                line += f"{max(r['peak_kv_usage'] for r in results[key]):>12.0%}"
                print(line)
    print("\n'depth': mean recursion steps of the tokens the model ran (prompt tokens and every generated token but "
          "the last). 'FLOP ideal': weight-matmul FLOPs of routing none (= vanilla's) over this row's, from those "
          "depths; attention is not counted. 'KV tokens': the tokens vLLM's KV cache holds in the budget, at the depths "
          "the served tokens took (a recursion-wise step stores only the tokens routed to it). 'peak running': "
          "the most requests vLLM's scheduler ran at once (at most the concurrency; fewer where the KV cache binds); "
          "'peak KV use': the largest share of the KV cache they held.")


if __name__ == "__main__":
    main()

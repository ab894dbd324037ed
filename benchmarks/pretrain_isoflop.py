"""Equal-compute pretraining from scratch (the paper's Table 3 comparison, small): vanilla Llama, the recursive
baselines and MoR variants, each trained to the same training-FLOP budgets, then evaluated on held-out text.

Variants (same width, same unrolled depth L, same tokenizer, same optimizer settings; L must satisfy (L - 2) % N_r
== 0 for N_r = 2 and 3: L = 8 gives 6 middle layers):
    vanilla Llama; recursive middle_cycle N_r = 2 and 3 (routing "none"); MoR expert-choice N_r = 2 and 3
    (recursion-wise KV); MoR token-choice N_r = 3; MoR expert-choice N_r = 3 with recursive KV sharing.
Every MoR model uses gating "output" (the paper's H + g * f(H), for training from scratch) and router_inference
"threshold" (eval routes causally with the router's own logit, trained by the BCE auxiliary loss).

Each run is `python -m conversion.pretrain` (called in-process) with `--max-train-flops`: training FLOPs are counted
from the depths the tokens actually take (conversion/flops.py), so a routed model sees more tokens than a vanilla
one for the same budget; the learning-rate schedule spans each run's planned steps, warm-up a fixed fraction of
them. Evaluation (`conversion.measure.perplexity_and_depths`, the project's one perplexity) on the first
--eval-max-tokens tokens of the eval text, in blocks of --block-size:
    causal: eval mode, the routing the model serves with (token by token);
    top-k:  the training-time routing (expert-choice top-k over each block, which sees the future, so it cannot
            serve), with every other module in eval mode (no dropout), under torch.no_grad. Token-choice, routing
            "none" and vanilla models route the same way in both modes: their top-k column repeats the causal one.
The headline variants (vanilla, recursive N_r = 3, MoR expert N_r = 3) are trained with every seed of --seeds at the
largest budget (the others with the first seed), and the table gives their mean and spread (min to max).

Writes OUTPUT_DIR/runs/<run>/ (each run's model, training_summary.json and log) and the table as
TABLE_PREFIX.json, TABLE_PREFIX.md and the plot TABLE_PREFIX.png (perplexity against training FLOPs per variant).

Examples:

    OMP_NUM_THREADS=1 python benchmarks/pretrain_isoflop.py --quick --output-dir /tmp/isoflop-quick

    # The full run of docs/pretrain_isoflop.md (about 35 CPU-minutes at one thread), on the 2 MiB TinyStories train
    # text of ../shared (the shipped sample, the default, is 206K tokens: the largest budget would repeat it 4 times).
    OMP_NUM_THREADS=1 nohup python benchmarks/pretrain_isoflop.py --output-dir outputs/isoflop \\
        --train-file ../shared/data/tinystories/train.txt --table-prefix docs/pretrain_isoflop > isoflop.log 2>&1 &
"""

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


# Dozens of runs: no progress bars (weights loading, evaluation) in the log; tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run from a source checkout without installing

from transformers import AutoTokenizer, LlamaConfig  # noqa: E402

from conversion import pretrain  # noqa: E402
from conversion.cli_checks import one_line  # noqa: E402
from conversion.measure import depth_histogram, mean_depth, perplexity_and_depths, read_eval_tokens  # noqa: E402
from conversion.output_dir import check_output_dir, record_output  # noqa: E402
from conversion.training.data import tokenize_texts  # noqa: E402
from conversion.training.summary import SUMMARY_FILE  # noqa: E402
from conversion.text_files import read_text_file  # noqa: E402
from modeling_mor import MoRConfig  # noqa: E402


ASSETS = PROJECT_ROOT / "examples" / "assets"

# Name -> MoR config fields (None: the vanilla Llama). Every MoR variant is middle_cycle with gating "output".
VARIANTS = {
    "vanilla": None,
    "recursive N_r=2": dict(num_recursions=2, routing="none"),
    "recursive N_r=3": dict(num_recursions=3, routing="none"),
    "MoR expert N_r=2": dict(num_recursions=2, routing="expert_choice", kv_cache_policy="recursion_wise"),
    "MoR expert N_r=3": dict(num_recursions=3, routing="expert_choice", kv_cache_policy="recursion_wise"),
    "MoR token N_r=3": dict(num_recursions=3, routing="token_choice"),
    "MoR expert N_r=3, shared KV": dict(num_recursions=3, routing="expert_choice", kv_cache_policy="shared"),
}
HEADLINE = ("vanilla", "recursive N_r=3", "MoR expert N_r=3")

# The model and training settings of a full run and of --quick (a CI-sized smoke run).
# A full run: stories260K's width (hidden 64, 8 heads, 4 KV heads) at L = 8; about 24 GFLOP/s on one CPU thread, so
# the largest budget is about two CPU-minutes per variant.
FULL = dict(hidden_size=64, intermediate_size=172, num_heads=8, num_kv_heads=4, num_layers=8, block_size=256,
            batch_size=4, budgets=[0.6e12, 1.2e12, 2.4e12], eval_max_tokens=16384, max_train_documents=None)
QUICK = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=8, block_size=64,
             batch_size=4, budgets=[1.5e9, 3e9], eval_max_tokens=1024, max_train_documents=60)


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where the runs go (refused if it exists, unless "
                                                            "--overwrite or --reuse-runs)")
    parser.add_argument("--table-prefix", help="path prefix of the table (.json, .md) and plot (.png) "
                                               "(default: OUTPUT_DIR/pretrain_isoflop)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and budgets: every variant end to end in "
                                                             "seconds (numbers meaningless)")
    parser.add_argument("--budgets", type=float, nargs="+", help=f"training FLOP budgets (default {FULL['budgets']}; "
                                                                 f"--quick {QUICK['budgets']})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds of the headline variants at the largest budget (the others use the first)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                        help=f"a subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--train-file", default=str(ASSETS / "tinystories_train_sample.txt"))
    parser.add_argument("--eval-file", default=str(ASSETS / "tinystories_valid_sample.txt"))
    parser.add_argument("--tokenizer", default=str(ASSETS / "stories260K"))
    model = parser.add_argument_group("model and training (defaults: a full run's, or --quick's)")
    for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers", "block_size",
                 "batch_size", "eval_max_tokens", "max_train_documents"):
        model.add_argument(f"--{name.replace('_', '-')}", type=int)
    model.add_argument("--learning-rate", type=float, default=3e-3)
    model.add_argument("--weight-decay", type=float, default=0.1)
    model.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up, a fraction of each run")
    model.add_argument("--router-aux-loss-coef", type=float, default=1e-3,
                       help="weight of the expert-choice BCE loss, which trains the causal eval routing")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT_DIR that an earlier run of this benchmark wrote (a folder "
                             "holding anything else is refused)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="keep OUTPUT_DIR and reuse its finished runs (same settings): a stopped benchmark resumes")
    return parser


def resolve_settings(args) -> dict:
    defaults = QUICK if args.quick else FULL
    settings = {name: getattr(args, name) if getattr(args, name, None) is not None else value
                for name, value in defaults.items()}
    settings.update(learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                    warmup_fraction=args.warmup_fraction, router_aux_loss_coef=args.router_aux_loss_coef)
    return settings


def check_arguments(args, settings) -> None:
    """Refuses bad input before any training (ValueError, one line)."""
    for name in ("train_file", "eval_file"):
        read_text_file(getattr(args, name), f"--{name.replace('_', '-')}")
    if not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer} is not a folder. Fix: give a tokenizer folder, for example "
                         f"examples/assets/stories260K.")
    if any(budget <= 0 for budget in settings["budgets"]):
        raise ValueError(f"--budgets {settings['budgets']}: every budget must be a positive number of FLOPs.")
    for num_recursions in {VARIANTS[name]["num_recursions"] for name in args.variants if VARIANTS[name]}:
        if (settings["num_layers"] - 2) % num_recursions or settings["num_layers"] - 2 < num_recursions:
            raise ValueError(f"--num-layers {settings['num_layers']} cannot be unrolled middle_cycle with N_r = "
                             f"{num_recursions}: L - 2 must be a positive multiple of it (L = 8 fits N_r = 2 and 3).")
    if args.overwrite and args.reuse_runs:
        raise ValueError("give --overwrite (start again) or --reuse-runs (keep the finished runs), not both.")
    if not args.reuse_runs:
        check_output_dir(Path(args.output_dir), args.overwrite)


def model_config(name: str, settings: dict, vocab_size: int):
    dims = dict(
        vocab_size=vocab_size, hidden_size=settings["hidden_size"], intermediate_size=settings["intermediate_size"],
        num_attention_heads=settings["num_heads"], num_key_value_heads=settings["num_kv_heads"],
        num_hidden_layers=settings["num_layers"], max_position_embeddings=settings["block_size"],
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    overrides = VARIANTS[name]
    if overrides is None:
        return LlamaConfig(**dims)
    return MoRConfig(**dims, sharing_strategy="middle_cycle", gating="output", router_inference="threshold",
                     router_aux_loss_coef=settings["router_aux_loss_coef"], **overrides)


def runs_to_train(args, settings) -> list[tuple[str, float, int]]:
    """(variant, budget, seed) of every run: each variant at every budget with the first seed, and the headline
    variants with every seed at the largest budget."""
    largest = max(settings["budgets"])
    runs = [(name, budget, args.seeds[0]) for budget in sorted(settings["budgets"]) for name in args.variants]
    runs += [(name, largest, seed) for seed in args.seeds[1:] for name in args.variants if name in HEADLINE]
    return runs


def run_name(name: str, budget: float, seed: int) -> str:
    slug = name.replace(" ", "_").replace(",", "").replace("=", "")
    return f"{slug}-{budget:.3g}-seed{seed}"


@contextlib.contextmanager
def training_time_routing(model):
    """`perplexity_and_depths` puts the model in eval mode. A forward pre-hook puts the expert-choice routing module,
    alone, back in training mode at every call: it then routes by top-k over each block as in training, while
    everything else (dropout) stays in eval mode; the caller's torch.no_grad keeps the routers' training losses
    from building a graph."""
    routing = model.model.recursion_block.routing
    handle = routing.register_forward_pre_hook(lambda module, inputs: setattr(module, "training", True))
    try:
        yield model
    finally:
        handle.remove()
        routing.training = model.training


def evaluate(model, eval_tokens, block_size) -> dict:
    causal, causal_depths = perplexity_and_depths(model, eval_tokens, block_size, desc="causal routing")
    causal_mean_depth = mean_depth(causal_depths)
    result = {"ppl_causal": causal, "nll_causal": math.log(causal), "ppl_topk": causal,
              "mean_depth_causal": causal_mean_depth, "mean_depth_topk": causal_mean_depth,
              "depths_causal": depth_histogram(causal_depths)}
    if getattr(model.config, "routing", None) == "expert_choice":
        with training_time_routing(model):
            top_k, top_k_depths = perplexity_and_depths(model, eval_tokens, block_size, desc="top-k routing")
        result.update(ppl_topk=top_k, mean_depth_topk=mean_depth(top_k_depths))
    return result


def train_one(args, settings, name, budget, seed, folder: Path, vocab_size: int, eval_tokens) -> dict:
    """Pretrains one variant to one budget with conversion.pretrain and evaluates it on `eval_tokens`; returns its
    table row."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.json"
    model_config(name, settings, vocab_size).to_json_file(config_file)
    model_dir = folder / "model"
    argv = [
        str(config_file), str(model_dir), "--tokenizer", args.tokenizer, "--train-file", args.train_file,
        "--max-train-flops", repr(budget), "--block-size", str(settings["block_size"]),
        "--per-device-train-batch-size", str(settings["batch_size"]), "--learning-rate", str(settings["learning_rate"]),
        "--weight-decay", str(settings["weight_decay"]), "--warmup-steps", str(settings["warmup_fraction"]),
        "--lr-scheduler-type", "cosine", "--logging-steps", "10", "--save-steps", "1000000", "--save-total-limit", "1",
        "--seed", str(seed), "--disable-tqdm", "--overwrite",
    ]
    if settings["max_train_documents"]:
        argv += ["--max-train-documents", str(settings["max_train_documents"])]
    with open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = pretrain.main(argv)
    if status != 0:
        raise RuntimeError(f"pretraining {name} failed (exit {status}); see {folder / 'train.log'}")
    for checkpoint in model_dir.glob("checkpoint-*"):  # the final model stays; optimizer states are not needed
        shutil.rmtree(checkpoint)
    summary = json.loads((model_dir / SUMMARY_FILE).read_text())
    model_class = pretrain.MODEL_CLASSES["mor" if VARIANTS[name] is not None else "llama"][1]
    model = model_class.from_pretrained(model_dir, dtype=torch.float32)
    row = {
        "variant": name, "budget": budget, "seed": seed,
        "non_embedding_params": model.num_parameters(exclude_embeddings=True),
        "train_flops": summary["train_flops"], "tokens_seen": summary["tokens_seen"], "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"],
        **evaluate(model, eval_tokens, settings["block_size"]),
    }
    (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def spread(values):
    return (min(values), max(values)) if len(values) > 1 else None


def aggregate(rows, variants) -> list[dict]:
    """One line per (variant, budget): the mean over seeds, and the min-max spread where there are several."""
    lines = []
    for budget in sorted({row["budget"] for row in rows}):
        for name in variants:
            group = [row for row in rows if row["variant"] == name and row["budget"] == budget]
            if not group:
                continue
            line = {"variant": name, "budget": budget, "seeds": [row["seed"] for row in group]}
            for key in ("non_embedding_params", "train_flops", "tokens_seen", "steps", "wall_time_s", "ppl_causal",
                        "nll_causal", "ppl_topk", "mean_depth_causal", "mean_depth_topk"):
                values = [row[key] for row in group if row[key] is not None]
                line[key] = statistics.mean(values) if values else None
                if key.startswith(("ppl", "nll")):
                    line[f"{key}_spread"] = spread(values)
            lines.append(line)
    return lines


def format_ppl(line, key) -> str:
    text = f"{line[key]:.3f}"
    if line.get(f"{key}_spread"):
        low, high = line[f"{key}_spread"]
        text += f" ({low:.3f}-{high:.3f}, {len(line['seeds'])} seeds)"
    return text


def markdown_table(lines, settings, dataset_tokens, description: str = "") -> str:
    header = ("| variant | budget (FLOPs) | non-emb. params | training FLOPs | tokens seen (epochs) | steps | "
              "eval ppl, causal routing | eval NLL, causal | eval ppl, training top-k | mean eval depth (causal / "
              "top-k) | wall time |")
    rows = [header, "|" + "---|" * 11]
    for line in lines:
        depth = "-" if line["mean_depth_causal"] is None else (
            f"{line['mean_depth_causal']:.2f} / {line['mean_depth_topk']:.2f}")
        rows.append(
            f"| {line['variant']} | {line['budget']:.3g} | {line['non_embedding_params']:,.0f} | "
            f"{line['train_flops']:.4g} | {line['tokens_seen']:,.0f} ({line['tokens_seen'] / dataset_tokens:.2f}) | "
            f"{line['steps']:.0f} | {format_ppl(line, 'ppl_causal')} | {format_ppl(line, 'nll_causal')} | "
            f"{format_ppl(line, 'ppl_topk')} | {depth} | {line['wall_time_s']:.0f} s |"
        )
    return description + "\n".join(rows) + "\n"


def describe_run(args, settings, dataset_tokens) -> str:
    """The header of the markdown table: how it was made."""
    # --reuse-runs changes no figure (a run is reused only when finished): the command that reproduces them omits it.
    command = " ".join(["python benchmarks/pretrain_isoflop.py", *(a for a in sys.argv[1:] if a != "--reuse-runs")])
    return (
        f"# Pretraining from scratch at equal training FLOPs\n\n"
        f"Made by `OMP_NUM_THREADS={torch.get_num_threads()} {command}`.\n\n"
        f"Every model: hidden {settings['hidden_size']}, intermediate {settings['intermediate_size']}, "
        f"{settings['num_heads']} heads ({settings['num_kv_heads']} KV), unrolled depth L = {settings['num_layers']} "
        f"(middle_cycle: 2 unshared layers and a block of 6 / N_r), tied embeddings, the stories260K tokenizer "
        f"(vocabulary 512); trained from scratch with `conversion.pretrain` on `{Path(args.train_file).name}` "
        f"({dataset_tokens:,} tokens) in blocks of {settings['block_size']}, batch {settings['batch_size']}, AdamW "
        f"lr {settings['learning_rate']}, weight decay {settings['weight_decay']}, cosine schedule over each run's "
        f"planned steps with {settings['warmup_fraction']:.0%} warm-up; MoR: gating \"output\", router_inference "
        f"\"threshold\", BCE weight {settings['router_aux_loss_coef']}. Training FLOPs: conversion/flops.py (6 x the "
        f"parameters each token passes at its depth + causal attention, forward + backward), counted from the depths "
        f"taken; each run stops at the end of the first step that reaches its budget. Evaluation: the first "
        f"{settings['eval_max_tokens']:,} tokens of `{Path(args.eval_file).name}` in blocks of "
        f"{settings['block_size']}; *causal*: eval-mode routing (servable); *training top-k*: expert-choice top-k over "
        f"each block, as in training (not causal). Several seeds: mean (min-max). Wall time: training on one shared "
        f"CPU thread (other jobs ran on the machine).\n\n"
    )


def save_plot(lines, variants, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("note: matplotlib is not installed; no plot was drawn.")
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, key, title in ((axes[0], "ppl_causal", "causal (eval-mode) routing"),
                             (axes[1], "ppl_topk", "training-time top-k routing")):
        for name in variants:
            points = [line for line in lines if line["variant"] == name]
            if not points:
                continue
            flops = [line["train_flops"] for line in points]
            values = [line[key] for line in points]
            low = [value - (line[f"{key}_spread"] or (value, value))[0] for value, line in zip(values, points)]
            high = [(line[f"{key}_spread"] or (value, value))[1] - value for value, line in zip(values, points)]
            axis.errorbar(flops, values, yerr=[low, high], marker="o", capsize=3, label=name,
                          linestyle="--" if name.startswith("recursive") else "-")
        axis.set_xscale("log")
        axis.set_yscale("log")
        # Plain numbers on the log axis (not 6 x 10^1).
        axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("training FLOPs")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    axes[1].legend(fontsize=8)
    figure.suptitle("Pretraining from scratch at equal training FLOPs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def suffixed(prefix: Path, suffix: str) -> Path:
    return prefix.parent / f"{prefix.name}{suffix}"


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    settings = resolve_settings(args)
    try:
        check_arguments(args, settings)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    prefix = Path(args.table_prefix) if args.table_prefix else output_dir / "pretrain_isoflop"
    if args.overwrite and output_dir.exists():  # an earlier output of this benchmark (check_arguments)
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not any(output_dir.iterdir()):  # a new benchmark folder: record what it will hold (see output_dir.py)
        tables = (f"{glob.escape(prefix.name)}.*",) if prefix.parent.resolve() == output_dir.resolve() else ()
        record_output(output_dir, also=("runs", *tables))
    prefix.parent.mkdir(parents=True, exist_ok=True)

    texts = read_text_file(args.train_file, "--train-file")
    documents = texts.split("<|endoftext|>" if "<|endoftext|>" in texts else "\n\n")
    if settings["max_train_documents"]:
        documents = documents[: settings["max_train_documents"]]
    dataset_tokens = tokenize_texts(tokenizer, documents).numel() // settings["block_size"] * settings["block_size"]

    eval_tokens = read_eval_tokens(tokenizer, args.eval_file, settings["eval_max_tokens"])  # the same for every run
    runs = runs_to_train(args, settings)
    print(f"{len(runs)} runs; settings {settings}; {dataset_tokens:,} training tokens; threads "
          f"{torch.get_num_threads()}", flush=True)
    rows, start = [], time.perf_counter()
    for index, (name, budget, seed) in enumerate(runs, 1):
        folder = output_dir / "runs" / run_name(name, budget, seed)
        if args.reuse_runs and (folder / "row.json").is_file():
            row = json.loads((folder / "row.json").read_text())
        else:
            if folder.exists():
                shutil.rmtree(folder)
            row = train_one(args, settings, name, budget, seed, folder, len(tokenizer), eval_tokens)
        rows.append(row)
        print(f"[{index}/{len(runs)} {time.perf_counter() - start:.0f} s] {name:<28} budget {budget:.3g} seed {seed}: "
              f"ppl causal {row['ppl_causal']:.3f} top-k {row['ppl_topk']:.3f}, depth "
              f"{row['mean_depth_causal'] if row['mean_depth_causal'] is None else round(row['mean_depth_causal'], 2)}"
              f", {row['tokens_seen']:,} tokens, {row['train_flops']:.4g} FLOPs, {row['wall_time_s']:.0f} s",
              flush=True)

    lines = aggregate(rows, args.variants)
    table = markdown_table(lines, settings, dataset_tokens, describe_run(args, settings, dataset_tokens))
    result = {"settings": settings, "dataset_tokens": dataset_tokens, "train_file": Path(args.train_file).name,
              "eval_file": Path(args.eval_file).name, "threads": torch.get_num_threads(), "table": lines, "runs": rows}
    suffixed(prefix, ".json").write_text(json.dumps(result, indent=2) + "\n")
    suffixed(prefix, ".md").write_text(table)
    plotted = save_plot(lines, args.variants, suffixed(prefix, ".png"))
    print("\n" + table)
    print(f"table: {suffixed(prefix, '.json')}, {suffixed(prefix, '.md')}"
          f"{', plot: ' + str(suffixed(prefix, '.png')) if plotted else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

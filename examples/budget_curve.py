"""One checkpoint, many budgets: sweep an MoR model's `router_threshold` at inference and draw perplexity against mean
recursion depth (the compute each token spends), next to other checkpoints as reference points.

Eval-mode expert-choice routing is causal: at every recursion step whose configured capacity is below 1, a token
continues iff sigmoid(router logit) > `config.router_threshold`. Raising the threshold stops more tokens earlier (less
compute); lowering it sends more of them deeper. Whether that trades quality for compute smoothly depends on how the
model was trained: with random capacities (`--random-capacity MIN` of `mor-pretrain` or `mor-uptrain`) the routers'
sigmoids learn a ranking that holds at any depth; trained at one fixed capacity schedule, they learn one cut.

For every CHECKPOINT and every --thresholds value, the held-out perplexity and the mean depth are measured with
`conversion.measure.perplexity_and_depths` (the project's one perplexity) on the first --eval-max-tokens tokens of
--eval-file; every --reference checkpoint (for example models trained at fixed capacities) is measured once, at its
own threshold. The table goes to PREFIX.md and PREFIX.json, the plot (each CHECKPOINT's sweep as a line, the
references as points) to PREFIX.png. Every row also gives the share of the unrolled model's layer applications per
token (`conversion.flops.layer_applications`), and `--layer-budgets` adds, per budget, the threshold calibrated the
way `mor-uptrain --layer-budget` calibrates it (`conversion.measure.calibrate_router_threshold`), on the first
--eval-max-tokens tokens of `--calibration-file`: another compute budget for a trained checkpoint, without training
again.

Example (a random-capacity model swept, a fixed-capacity one as a point; see docs/budget_curve.md for the full run):

    mor-pretrain mor_config.json outputs/mor-random --tokenizer examples/assets/stories260K \\
        --train-file examples/assets/tinystories_train_sample.txt --max-steps 300 --random-capacity 0.1
    mor-pretrain mor_config.json outputs/mor-fixed --tokenizer examples/assets/stories260K \\
        --train-file examples/assets/tinystories_train_sample.txt --max-steps 300
    python examples/budget_curve.py outputs/mor-random --reference outputs/mor-fixed \\
        --thresholds 0.1 0.3 0.5 0.7 0.9 --output-prefix outputs/budget_curve
"""

import argparse
import json
import os
import sys
from pathlib import Path


os.environ.setdefault("TQDM_DISABLE", "1")  # one line per measurement, no progress bars

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run from a source checkout without installing

import torch  # noqa: E402

from conversion.cli_checks import (  # noqa: E402
    HelpFormatter,
    check_option_needs,
    choose_threads,
    load_tokenizer,
    one_line,
    read_mor_config,
)
from conversion.measure import context_length, eval_block_size, perplexity_and_depths, read_eval_text, read_eval_tokens  # noqa: E402
from conversion.measure import calibrate_router_threshold, depth_histogram, format_depth_histogram, mean_depth  # noqa: E402
from conversion.flops import layer_applications  # noqa: E402
from conversion.text_files import read_text_file  # noqa: E402
from conversion.output_dir import WRITTEN_BY, check_output_files  # noqa: E402


ASSETS = PROJECT_ROOT / "examples" / "assets"
OUTPUT_SUFFIXES = (".md", ".json", ".png")


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="MoR expert-choice model folder(s) whose router_threshold is swept (each one a line)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                        help="router_threshold values, each in (0, 1) (default: 0.1 0.3 0.5 0.7 0.9)")
    parser.add_argument("--layer-budgets", type=float, nargs="+", default=[], metavar="FRACTION",
                        help="also the threshold at which the text of --calibration-file takes at most each FRACTION of "
                             "the unrolled model's layer applications per token (calibrated as mor-uptrain "
                             "--layer-budget does), measured like the others")
    parser.add_argument("--calibration-file",
                        help="UTF-8 text the --layer-budgets thresholds are calibrated on (default: --eval-file; the "
                             "training text keeps the evaluation text held out)")
    parser.add_argument("--reference", nargs="+", default=[], metavar="CHECKPOINT",
                        help="MoR model folder(s) measured once at their own threshold (points on the plot)")
    parser.add_argument("--eval-file", default=str(ASSETS / "tinystories_valid_sample.txt"),
                        help="UTF-8 text on which every perplexity and mean depth is measured (default: the shipped "
                             "TinyStories validation sample)")
    parser.add_argument("--eval-max-tokens", type=int, default=16384, help="perplexity on the first N tokens of it")
    parser.add_argument("--eval-block-size", type=int,
                        help="perplexity block (default: 256 tokens capped at the models' context)")
    parser.add_argument("--output-prefix", required=True,
                        help="path prefix of the table (PREFIX.md, PREFIX.json) and the plot (PREFIX.png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PREFIX.md/.json/.png of an earlier sweep (files of anything else are refused)")
    return parser


def check_arguments(args) -> int:
    """Everything that can be refused before a model is loaded; returns the perplexity block size."""
    for threshold in args.thresholds:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"--thresholds {threshold} is not valid: router_threshold is a sigmoid cut in (0, 1). "
                             f"Fix: give values such as 0.1 0.3 0.5 0.7 0.9.")
    for budget in args.layer_budgets:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"--layer-budgets {budget} is not valid: it is a share of the model's layer applications, "
                             f"in (0, 1]. Fix: give values such as 0.75 0.85.")
    check_option_needs("--layer-budgets", args.layer_budgets or None, {"--calibration-file": args.calibration_file})
    if args.calibration_file is not None:
        read_text_file(args.calibration_file, "--calibration-file")
    if args.eval_max_tokens < 2:
        raise ValueError(f"--eval-max-tokens {args.eval_max_tokens} is too small; give at least 2 (default 16384).")
    contexts = []
    for name, folders in (("CHECKPOINT", args.checkpoints), ("--reference", args.reference)):
        for folder in folders:
            config = read_mor_config(folder, name)
            if name == "CHECKPOINT" and config.routing != "expert_choice":
                raise ValueError(f"CHECKPOINT {folder} routes {config.routing!r}; router_threshold only acts on "
                                 f"expert-choice routing. Fix: give an expert-choice MoR model, or pass it as "
                                 f"--reference.")
            if name == "CHECKPOINT" and all(capacity >= 1.0 for capacity in config.capacity):
                raise ValueError(f"CHECKPOINT {folder} has capacity {config.capacity}: no recursion step decides, so "
                                 f"router_threshold changes nothing. Fix: give a model with a capacity below 1.")
            if context_length(config):
                contexts.append(context_length(config))
    read_eval_text(args.eval_file)
    block_size = eval_block_size(args.eval_block_size, min(contexts) if contexts else None)
    table_path, json_path, plot_path = outputs(Path(args.output_prefix).expanduser())
    # --overwrite replaces an earlier sweep's files only: its JSON says it wrote them.
    check_output_files([table_path, json_path, plot_path], json_path, args.overwrite)
    return block_size


def outputs(prefix: Path) -> list[Path]:
    return [prefix.parent / f"{prefix.name}{suffix}" for suffix in OUTPUT_SUFFIXES]


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def measure(model, tokens, block_size) -> dict:
    perplexity, depths = perplexity_and_depths(model, tokens, block_size)
    depth = mean_depth(depths, zero_is_padding=False)  # perplexity_and_depths pads nothing
    return {"perplexity": perplexity, "mean_depth": depth,
            "layer_fraction": layer_applications(model, depth) / model.config.num_hidden_layers,
            "depth_histogram": depth_histogram(depths)}


def sweep(model, tokens, block_size, thresholds) -> list[dict]:
    """Perplexity and mean depth at every threshold; the model's own threshold is put back at the end."""
    trained = model.config.router_threshold
    rows = []
    try:
        for threshold in thresholds:
            model.config.router_threshold = threshold
            rows.append({"threshold": threshold, **measure(model, tokens, block_size)})
            print(f"  threshold {threshold:.4g}: mean depth {rows[-1]['mean_depth']:.3f}, layer applications "
                  f"{rows[-1]['layer_fraction']:.3f}, perplexity {rows[-1]['perplexity']:.3f}", flush=True)
    finally:
        model.config.router_threshold = trained
    return rows


def budget_rows(model, calibration_tokens, tokens, block_size, budgets) -> list[dict]:
    """For each budget, the threshold `calibrate_router_threshold` finds on `calibration_tokens`, measured on `tokens`."""
    rows = []
    for budget in budgets:
        threshold, spent = calibrate_router_threshold(model, calibration_tokens, budget, block_size)
        print(f"  --layer-budgets {budget}: threshold {threshold:.4f} (the calibration text takes {spent:.3f})",
              flush=True)
        (row,) = sweep(model, tokens, block_size, [threshold])
        rows.append({**row, "layer_budget": budget, "calibration_fraction": spent})
    return rows


def is_monotone(rows) -> dict:
    """Along the sweep (thresholds ascending): the depth never grows, and the perplexity never falls as depth falls."""
    ordered = sorted(rows, key=lambda row: row["threshold"])
    depth_falls = all(b["mean_depth"] <= a["mean_depth"] for a, b in zip(ordered, ordered[1:]))
    by_depth = sorted(rows, key=lambda row: row["mean_depth"])
    quality_rises = all(b["perplexity"] <= a["perplexity"] for a, b in zip(by_depth, by_depth[1:]))
    return {"depth_non_increasing_in_threshold": depth_falls, "perplexity_non_increasing_in_depth": quality_rises}


def markdown(result) -> str:
    lines = [f"Perplexity on the first {result['eval_tokens']:,} tokens of `{result['eval_file']}` in blocks of "
             f"{result['block_size']} (eval-mode, causal routing); mean depth: recursion steps per token.", ""]
    for curve in result["sweeps"]:
        config = curve["config"]
        lines += [f"### `{curve['name']}` swept (trained capacity {config['capacity']}, threshold "
                  f"{config['router_threshold']})", "",
                  "| router_threshold | mean depth | layer applications | perplexity | depth histogram |",
                  "|---|---|---|---|---|"]
        for row in curve["rows"]:
            budget = f" (--layer-budgets {row['layer_budget']:g})" if "layer_budget" in row else ""
            lines.append(f"| {row['threshold']:.4g}{budget} | {row['mean_depth']:.3f} | {row['layer_fraction']:.3f} | "
                         f"{row['perplexity']:.3f} | {format_depth_histogram(row['depth_histogram'])} |")
        flags = curve["monotone"]
        lines += ["", f"Depth non-increasing as the threshold grows: {'yes' if flags['depth_non_increasing_in_threshold'] else 'no'}; "
                      f"perplexity non-increasing as depth grows: {'yes' if flags['perplexity_non_increasing_in_depth'] else 'no'}.", ""]
    if result["references"]:
        lines += ["### Reference checkpoints (each at its own threshold)", "",
                  "| checkpoint | trained capacity | threshold | mean depth | perplexity |", "|---|---|---|---|---|"]
        for row in result["references"]:
            lines.append(f"| `{row['name']}` | {row['config']['capacity']} | {row['config']['router_threshold']} | "
                         f"{row['mean_depth']:.3f} | {row['perplexity']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def save_plot(result, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot was drawn.")
        return False
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for curve in result["sweeps"]:
        rows = sorted(curve["rows"], key=lambda row: row["mean_depth"])
        axis.plot([r["mean_depth"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                  label=f"{curve['name']}: router_threshold sweep")
        for row in rows:
            axis.annotate(f"{row['threshold']:g}", (row["mean_depth"], row["perplexity"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 4))
    for row in result["references"]:
        axis.scatter([row["mean_depth"]], [row["perplexity"]], marker="s", s=50, zorder=3,
                     label=f"{row['name']} (capacity {', '.join(f'{c:.2g}' for c in row['config']['capacity'])})")
    axis.set_xlabel("mean recursion depth (compute per token)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("One checkpoint, many budgets")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        block_size = check_arguments(args)
        tokenizer = load_tokenizer(args.checkpoints[0], "CHECKPOINT", "the sweep reads the eval text with it")
        tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
        calibration_tokens = tokens
        if args.calibration_file is not None:
            calibration_tokens = read_eval_tokens(tokenizer, args.calibration_file, args.eval_max_tokens)
    except (ValueError, OSError) as error:  # OSError: OutputDirExistsError
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(choose_threads(read_mor_config(args.checkpoints[0], "CHECKPOINT")))
    result = {WRITTEN_BY: "examples/budget_curve.py", "eval_file": Path(args.eval_file).name,
              "eval_tokens": tokens.numel(), "block_size": block_size, "sweeps": [], "references": []}
    for folder in args.checkpoints:
        print(f"{folder}:", flush=True)
        model = load_model(folder)
        try:
            rows = budget_rows(model, calibration_tokens, tokens, block_size, args.layer_budgets)
            rows += sweep(model, tokens, block_size, args.thresholds)
        except ValueError as error:  # a budget below what the steps every token takes cost
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        rows.sort(key=lambda row: row["threshold"])
        result["sweeps"].append({"name": Path(folder).name, "path": str(folder), "rows": rows,
                                 "monotone": is_monotone(rows),
                                 "config": {"capacity": model.config.capacity,
                                            "router_threshold": model.config.router_threshold}})
    for folder in args.reference:
        model = load_model(folder)
        row = measure(model, tokens, block_size)
        print(f"{folder}: mean depth {row['mean_depth']:.3f}, perplexity {row['perplexity']:.3f}", flush=True)
        result["references"].append({"name": Path(folder).name, "path": str(folder), **row,
                                     "config": {"capacity": model.config.capacity,
                                                "router_threshold": model.config.router_threshold}})
    table_path, json_path, plot_path = outputs(Path(args.output_prefix).expanduser())
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    table_path.write_text(table)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plotted = save_plot(result, plot_path)
    print("\n" + table)
    print(f"table: {table_path}, {json_path}{', plot: ' + str(plot_path) if plotted else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

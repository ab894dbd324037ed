"""Perplexity against training tokens for runs of benchmarks/conversion_recipe.py, in one picture.

Each run's curve is its uptraining's evaluations (exp of Trainer's eval loss on the first --curve-tokens tokens of the
held-out text the recipe evaluates on, WikiText-2 test by default; the model in eval mode, routing causally), from
the run's last checkpoint; the converted model's and the final model's measured perplexities (on --eval-tokens
tokens) are drawn at 0 tokens and at the end, and the source's as a horizontal line.

Example (from the project root):

    python benchmarks/plot_recipe_curves.py outputs/recipe-full-nr2 outputs/recipe-r0-nr2 \\
        --labels "full rank, N_r=2" "rank 0, N_r=2" --output docs/conversion_recipe_curves.png
"""

import argparse
import json
import math
from pathlib import Path


def run_curve(folder: Path) -> tuple[list[tuple[int, float]], dict[str, dict]]:
    """(tokens seen, perplexity) of a run's evaluations during uptraining, and its measured rows by model name."""
    rows = {row["model"]: row for row in map(json.loads, (folder / "conversion_recipe.jsonl").read_text().splitlines())}
    states = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda path: int(path.parent.name.split("-")[1]))
    if not states:
        raise SystemExit(f"error: {folder} has no checkpoint-N/trainer_state.json (the log of its uptraining).")
    history = json.loads(states[-1].read_text())["log_history"]
    points = [(entry["num_input_tokens_seen"], math.exp(entry["eval_loss"])) for entry in history
              if "eval_loss" in entry and "num_input_tokens_seen" in entry]
    return points, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="OUTPUT_DIRs of conversion_recipe.py")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--text", default="wikitext2_test", help="which measured text the end points show")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"give one label per run ({len(args.runs)}), got {len(labels)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    source = None
    for run, label in zip(args.runs, labels):
        points, rows = run_curve(run)
        source = rows["source"][f"perplexity_{args.text}"]
        line, = axis.plot(*zip(*points), marker=".", label=f"{label} (during training, {args.text})")
        end = (points[-1][0] if points else 0, rows["uptrained"][f"perplexity_{args.text}"])
        axis.plot([0, end[0]], [rows["converted"][f"perplexity_{args.text}"], end[1]], linestyle="none", marker="s",
                  color=line.get_color())
        axis.annotate(f"{end[1]:.1f}", end, textcoords="offset points", xytext=(4, 4), color=line.get_color())
    axis.axhline(source, color="black", linestyle="--", label=f"source ({source:.2f})")
    axis.set_yscale("log")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("perplexity (log scale)")
    axis.set_title("Conversion recipe: perplexity during uptraining")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

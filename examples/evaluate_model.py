"""Evaluate an MoR or Llama checkpoint offline: perplexity, few-shot multiple-choice accuracy, routing statistics.

The metric values come from the `evaluate` metric modules shipped in `metrics/` (loaded by path: nothing is
downloaded); `--metric-source hub` uses the Hub's "perplexity" and "accuracy" metrics instead, where the Hub is
reachable. Routing statistics (MoR only) are measured on the tokens the perplexity scores, with eval-mode (causal)
routing.

Example (from the repository root; the first command converts the shipped stories260K Llama to an MoR folder):

```bash
mor-convert examples/assets/stories260K /tmp/mor-stories --num-recursions 3 \
    --sharing-strategy middle_cycle
python examples/evaluate_model.py /tmp/mor-stories \
    --eval-file examples/assets/tinystories_valid_sample.txt --max-tokens 8192 \
    --mc-file examples/data/tiny_stories_mc.jsonl --num-fewshot 3 --output-json /tmp/mor-stories-eval.json
```

A folder that is not an MoR or Llama model, a missing or non-UTF-8 file and a bad option value are refused with one
`error:` line (exit code 2) before the model is loaded.

Without `--eval-file` and `--mc-file` it uses the small files in `examples/data/`.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
# Lets `python examples/evaluate_model.py` import the project's `evaluation` package without installing it.
sys.path.insert(0, str(REPO_ROOT))

from conversion.cli_checks import (  # noqa: E402
    HelpFormatter,
    build_config,
    check_extra_installed,
    check_model_weights,
    check_output_file,
    choose_threads,
    check_weights_match_config,
    hub_failure,
    load_tokenizer,
    looks_like_hub_id,
    fetching_from_hub,
    one_line,
    read_as_path,
)
from conversion.measure import format_depth_histogram  # noqa: E402
from conversion.text_files import read_text_file  # noqa: E402
from evaluation.core import METRICS, load_metric, read_checkpoint_config  # noqa: E402
from evaluation import (  # noqa: E402
    check_supported_checkpoint,
    load_model_and_tokenizer,
    load_multiple_choice_items,
    multiple_choice_accuracy,
    routing_statistics,
    text_file_perplexity,
)


DATA_DIR = REPO_ROOT / "examples" / "data"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be 0 or more")
    return value


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", help="a model folder (MoR or Llama checkpoint with its tokenizer) or a Hub id")
    parser.add_argument(
        "--eval-file", default=str(DATA_DIR / "tiny_stories_sample.txt"), help="text file for perplexity"
    )
    parser.add_argument(
        "--mc-file",
        default=str(DATA_DIR / "tiny_stories_mc.jsonl"),
        help="multiple-choice JSONL (context/question, choices, answer index)",
    )
    parser.add_argument(
        "--num-fewshot", type=non_negative_int, default=3, help="solved examples before each question"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="score only the first N tokens of --eval-file (default: all)",
    )
    parser.add_argument(
        "--max-length", type=positive_int, default=256, help="tokens per perplexity window (BOS included)"
    )
    parser.add_argument(
        "--stride",
        type=non_negative_int,
        default=128,
        help="tokens between window starts; 0 truncates to one window instead",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--metric-source",
        choices=["local", "hub"],
        default="local",
        help="local: the metric modules in metrics/ (offline); hub: the Hub's 'perplexity' and 'accuracy'",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--output-json", default=None, help="also write every result to this JSON file")
    return parser


def describe_model(model) -> str:
    config = model.config
    if config.model_type != "mor":
        return f"{type(model).__name__} ({config.model_type}, {config.num_hidden_layers} layers)"
    return (
        f"{type(model).__name__} (mor: {config.sharing_strategy}, num_recursions={config.num_recursions}, "
        f"routing={config.routing}, {config.num_hidden_layers} unrolled layers)"
    )


def print_report(results: dict) -> None:
    print()
    print(f"Model: {results['model']}")
    print(f"  {results['model_description']}")
    perplexity = results["perplexity"]
    stride = f"stride {perplexity['stride']}" if perplexity["stride"] else "no stride"
    print(
        f"Perplexity: {perplexity['perplexity']:.4f} over {perplexity['num_tokens']} tokens of {results['eval_file']} "
        f"(windows of {perplexity['max_length']} tokens, {stride}; metric {perplexity['metric']})"
    )
    choice = results["multiple_choice"]
    print(
        f"{choice['num_fewshot']}-shot multiple choice: accuracy {choice['accuracy']:.4f}, accuracy_norm "
        f"{choice['accuracy_norm']:.4f} on {choice['num_items']} items (chance {choice['chance_accuracy']:.4f}; "
        f"metric {choice['metric']})"
    )
    routing = results["routing"]
    if routing is None:
        print("Routing: not an MoR model")
        return
    print(
        f"Routing: mean depth {routing['mean_depth']:.4f} of {routing['num_recursions']} over {routing['num_tokens']} "
        f"tokens; tokens per depth {format_depth_histogram(routing['depth_histogram'])}"
    )
    print(
        f"  compute saved vs full depth: recursion block {100 * routing['block_compute_saved']:.2f}%, whole model "
        f"{100 * routing['model_compute_saved']:.2f}% (B={routing['block_size']} shared layers, "
        f"L={routing['num_hidden_layers']}, {routing['unshared_end_layers']} unshared end layers)"
    )


def check_model(model: str) -> None:
    """Raises ValueError, reading config.json, the weights' headers and the tokenizer only, unless `model` is an MoR
    or Llama folder (with its weights and tokenizer) or Hub id."""
    path = Path(model).expanduser()
    if not path.exists() and not looks_like_hub_id(model):
        raise ValueError(f"{model} does not exist{read_as_path(model)}. Pass a model folder (an MoR or Llama checkpoint saved with "
                         f"save_pretrained, with its tokenizer) or a Hub id.")
    try:
        with fetching_from_hub(model) if not path.exists() else contextlib.nullcontext():
            check_supported_checkpoint(model)
    except ValueError as error:
        if path.exists() or error.__cause__ is None:  # a local folder, or a Hub config that was read
            raise
        raise ValueError(hub_failure(model, error.__cause__)) from error
    if path.exists():
        check_model_weights(path, model)
        config = build_config(read_checkpoint_config(model), model)
        check_weights_match_config(path, config, model)
    load_tokenizer(model, "", "the evaluation reads the text and the questions with it")  # as load_model_and_tokenizer


def check_inputs(args) -> None:
    """Every input is checked before the model is loaded; each problem is one ValueError naming it."""
    check_extra_installed("evaluate", "eval", "examples/evaluate_model.py (its metrics are `evaluate` modules)")
    check_model(args.model)
    read_text_file(args.eval_file, "--eval-file")
    lines = read_text_file(args.mc_file, "--mc-file").splitlines()
    for line_number, line in enumerate(lines, start=1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--mc-file {args.mc_file}, line {line_number}: not valid JSON ({error.msg}, column "
                             f"{error.colno}).") from error
    items = load_multiple_choice_items(args.mc_file)
    if args.num_fewshot >= len(items):
        raise ValueError(f"--num-fewshot {args.num_fewshot} needs at least {args.num_fewshot + 1} questions; "
                         f"{args.mc_file} has {len(items)}. Pass a smaller --num-fewshot.")
    if args.output_json:
        check_output_file(args.output_json, "--output-json")
    if args.metric_source == "hub":  # fetched now (and cached), not after the model has run
        for name in METRICS:
            try:
                load_metric(name, "hub")
            except RuntimeError as error:
                raise ValueError(
                    f"--metric-source hub: the Hub's {METRICS[name][1]!r} metric could not be loaded "
                    f"({one_line(error.__cause__ or error)}). Fix: check the network connection (and unset "
                    f"HF_HUB_OFFLINE), or leave --metric-source out for the project's own copies, which run offline."
                ) from None


def main(argv=None) -> dict:
    args = build_argument_parser().parse_args(argv)
    stride = args.stride or None
    try:
        check_inputs(args)
    except ValueError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    print(choose_threads(model.config))
    perplexity = text_file_perplexity(
        args.model,
        args.eval_file,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        stride=stride,
        batch_size=args.batch_size,
        device=args.device,
        metric_source=args.metric_source,
    )
    choice = multiple_choice_accuracy(
        model,
        tokenizer,
        args.mc_file,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        metric_source=args.metric_source,
    )
    routing = routing_statistics(
        model,
        tokenizer,
        args.eval_file,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        stride=stride,
        batch_size=args.batch_size,
    )
    results = {
        "model": args.model,
        "model_description": describe_model(model),
        "eval_file": args.eval_file,
        "mc_file": args.mc_file,
        "perplexity": perplexity,
        "multiple_choice": choice,
        "routing": routing,
    }
    print_report(results)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"Wrote {args.output_json}")
    return results


if __name__ == "__main__":
    main()

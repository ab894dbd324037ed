"""Pretrain a fresh model from a config, to a number of steps or to a training FLOP budget, with `transformers.Trainer`.

The model is an MoR model (a config.json with `"model_type": "mor"`, for example with gating "output" and the router's
own BCE for causal inference, as the paper trains from scratch) or a vanilla Llama (`"model_type": "llama"`) of the
same width, initialised with `--seed`. Training is uptraining's code path (`run_training` of conversion/training/: the
same Trainer, data, checkpoints, resuming, staging and DDP), without a teacher: see `mor-uptrain --help`.

Compute: `--max-train-flops` stops training at the end of the first optimizer step whose FLOP count reaches the budget
(it is checked right after each step, so a run overshoots by less than one step and never stops short). The count is
the forward + backward FLOPs of the depths the tokens actually took (`conversion/flops.py`: 6 * the parameters each
token is multiplied with at its depth, plus the causal attention term), so a routed model, whose tokens skip
recursion steps, trains on more tokens for the same budget than a vanilla one. Without `--max-steps`, the
learning-rate schedule spans the steps the budget is planned to take (exact for vanilla models, routing "none" and
expert-choice, whose training top-k fixes the depths; token-choice and `--random-capacity`, whose depths vary, are
planned at their average depth with 5% more steps, so that the budget ends its run). FLOPs and tokens seen
are logged (`train_flops`, `num_input_tokens_seen`) and written to OUTPUT_DIR/training_summary.json, with the
held-out perplexity and recursion depths (eval-mode, causal routing) when `--eval-file` is given.

Example (the config: stories260K's shape as MoR; any MoRConfig or LlamaConfig saved with save_pretrained):

    python -c "from modeling_mor import MoRConfig; MoRConfig(vocab_size=512, hidden_size=64, intermediate_size=172, \\
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, router_aux_loss_coef=1e-2, \\
    tie_word_embeddings=True).save_pretrained('outputs/mor-config')"
    mor-pretrain outputs/mor-config outputs/mor-scratch --tokenizer examples/assets/stories260K \\
        --train-file examples/assets/tinystories_train_sample.txt \\
        --eval-file examples/assets/tinystories_valid_sample.txt --max-train-flops 2e12 --learning-rate 3e-3
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from modeling_mor import MoRConfig, MoRForCausalLM

from .cli_checks import WEIGHTS_FILES, HelpFormatter, choose_threads, load_tokenizer, one_line, run_command_line
from .measure import read_eval_text
from .training.data import load_training_data
from .training.options import (
    add_data_arguments,
    add_trainer_arguments,
    check_capacity_schedule,
    check_run_folder,
    check_training_options,
    resolve_block_sizes,
)
from .training.run import INTERRUPTED_RUN, run_training


MODEL_CLASSES = {"mor": (MoRConfig, MoRForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def build_argument_parser():
    parser = argparse.ArgumentParser(prog="mor-pretrain", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("config", metavar="CONFIG",
                        help="the model to train: a config.json (model_type 'mor' or 'llama'), or a folder holding one")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to OUTPUT_DIR; it may not be, "
                             "contain or lie inside CONFIG, --tokenizer or the data")
    parser.add_argument("--tokenizer", required=True,
                        help="a tokenizer folder (for example examples/assets/stories260K); saved with the model")
    add_data_arguments(parser, eval_help="text file for the held-out perplexity after training (and --eval-steps)")
    add_trainer_arguments(parser, learning_rate=1e-3, learning_rate_note="for a small model trained from scratch")
    return parser


def read_model_config(path):
    """The config CONFIG describes (a file, or a folder with config.json): a MoRConfig or a LlamaConfig. ValueError
    (one line, naming the fix) for anything else."""
    given = Path(path).expanduser()
    file = given / "config.json" if given.is_dir() else given
    if not file.is_file():
        raise ValueError(f"CONFIG {path} does not exist{' (no config.json in it)' if given.is_dir() else ''}. Fix: "
                         f"give a config.json with model_type 'mor' or 'llama', or a folder holding one.")
    weights = [name for name in WEIGHTS_FILES if (given / name).is_file()] if given.is_dir() else []
    if weights:
        raise ValueError(
            f"CONFIG {path} holds trained weights ({weights[0]}), and pretraining starts from random weights: they "
            f"would be ignored. Fix: to train these weights further, give an MoR folder to `mor-uptrain {path} "
            f"OUTPUT_DIR` (a Llama: convert it first with mor-convert); to start afresh with this shape, give the file "
            f"{file}."
        )
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"CONFIG {file} is not a JSON file ({one_line(error)}). Fix: give a config.json.") from None
    if not isinstance(fields, dict) or fields.get("model_type") not in MODEL_CLASSES:
        found = fields.get("model_type") if isinstance(fields, dict) else None
        raise ValueError(f"CONFIG {file} has model_type {found!r}; pretraining builds 'mor' or 'llama' models. Fix: set "
                         f"\"model_type\" to one of them.")
    config_class, _ = MODEL_CLASSES[fields["model_type"]]
    try:
        return config_class.from_dict(fields)
    # MoRConfig's checks name the field and what would be valid; the strict dataclass checks name a mistyped field.
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"CONFIG {file} is not a valid config: {one_line(error)}") from None


def check_arguments(args):
    """Everything that can be refused before any work: options, CONFIG, the tokenizer, the text files, OUTPUT_DIR
    and the checkpoint to resume from. Returns the config, the tokenizer and `training.options.CheckedArguments`."""
    check_training_options(args)
    config = read_model_config(args.config)
    resolve_block_sizes(args, config)
    check_capacity_schedule(args, config)
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer", "pretraining reads the text with it and saves it with "
                               "the model", fix="give a folder that holds a tokenizer (tokenizer.json, or a sentencepiece "
                               "model, with tokenizer_config.json), for example examples/assets/stories260K")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"CONFIG's vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                         f"tokens: the embedding could not hold every token id. Fix: set \"vocab_size\" to "
                         f"{len(tokenizer)} (or more).")
    if args.eval_file:
        read_eval_text(args.eval_file)
    checked = check_run_folder(args, CONFIG=args.config, **{"--tokenizer": args.tokenizer})
    return config, tokenizer, checked


def build_model(config, seed: int):
    """A freshly initialised model of `config` (float32), the same for the same seed."""
    set_seed(seed)
    _, model_class = MODEL_CLASSES[config.model_type]
    return model_class(config).to(torch.float32)


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        config, tokenizer, checked = check_arguments(args)
        data = load_training_data(args, tokenizer)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(choose_threads(config))
    model = build_model(config, args.seed)
    return run_training(args, checked, model, tokenizer, data, start, activity="pretraining")


def command_line() -> int:
    """The `mor-pretrain` console script (and `python -m conversion.pretrain`): `main`, with Ctrl-C as one error line."""
    return run_command_line(main, INTERRUPTED_RUN)


if __name__ == "__main__":
    raise SystemExit(command_line())

"""Uptrain a converted MoR model: continued pretraining with the LM loss plus the router losses, optionally distilled
from the source model, with `transformers.Trainer`.

It runs as it is on one process, and multi-process (DDP; gloo on CPU, NCCL on GPUs) under `accelerate launch` or
`torchrun`. Checkpoints (with the tokenizer) land in OUTPUT_DIR/checkpoint-N (resume with --resume-from-checkpoint);
the final model, its tokenizer, the updated model card and a loss-curve picture land in OUTPUT_DIR itself. Until the
first checkpoint is saved, a new run writes into a hidden staging folder next to OUTPUT_DIR, so that a run stopped
before it (an error, Ctrl-C, SIGTERM) leaves nothing behind; from the first checkpoint on, OUTPUT_DIR holds what
`--resume-from-checkpoint latest` continues from.

Compute: every run counts its training FLOPs from the recursion depths its tokens actually take (`conversion.flops`)
and the tokens it has seen; both are logged (`train_flops`, `num_input_tokens_seen`) and written to
OUTPUT_DIR/training_summary.json. `--max-train-flops` trains to a FLOP budget instead of (or as well as) a number of
steps. `mor-pretrain` trains a fresh model from a config with the same code.

Examples:

    mor-uptrain outputs/stories-mor outputs/stories-mor-uptrained \\
        --train-file examples/assets/tinystories_train_sample.txt \\
        --eval-file examples/assets/tinystories_valid_sample.txt --max-steps 600 --learning-rate 1e-3 \\
        --teacher examples/assets/stories260K

    torchrun --nproc_per_node 2 --no-python mor-uptrain outputs/stories-mor outputs/stories-mor-ddp \\
        --train-file examples/assets/tinystories_train_sample.txt --max-steps 100 --learning-rate 1e-3
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .cli_checks import (
    HelpFormatter,
    check_model_weights,
    choose_threads,
    load_tokenizer,
    looks_like_hub_id,
    one_line,
    read_mor_config,
    run_command_line,
)
from .convert_llama_to_mor import read_source_config, resolve_source
from .measure import context_length, depth_histogram, read_eval_text
from .model_card import UnfilledPlaceholderError, load_card_figures, perplexity_rows, save_card
from .training.data import load_training_data
from .training.options import (
    CheckedArguments,
    add_data_arguments,
    add_trainer_arguments,
    check_capacity_schedule,
    check_run_folder,
    check_training_options,
    resolve_block_sizes,
)
from .training.run import INTERRUPTED_RUN, run_training
from .training.router_fit import DEFAULT_ROUTER_FIT_AT, DEFAULT_ROUTER_FIT_TOKENS, refuse_router_fit, router_fit_obstacle
from .training.trainer import check_block_wise_stage, recursion_boundaries


def build_argument_parser():
    parser = argparse.ArgumentParser(prog="mor-uptrain", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model_dir", metavar="INPUT_DIR", help="a converted MoR folder (or Hub id)")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to OUTPUT_DIR; it may not be, "
                             "contain or lie inside INPUT_DIR, --teacher or the data")
    add_data_arguments(parser, eval_help="text file for the perplexity before and after uptraining (and --eval-steps)")
    method = parser.add_argument_group("MoR uptraining")
    method.add_argument("--teacher", help="the source model (folder, Hub id or .gguf file) to distill from")
    method.add_argument("--distill-weight", type=float, default=0.5,
                        help="weight of the distillation loss (KL to the teacher); the LM and router losses get the "
                             "rest")
    method.add_argument("--distill-temperature", type=float, default=1.0,
                        help="softmax temperature of the student's and the teacher's logits in the distillation loss")
    method.add_argument("--hidden-distill-weight", type=float, default=0.0,
                        help="weight of a hidden-state term (needs --teacher): the student's hidden states where each "
                             "recursion step ends against the teacher's at the same depth, each channel standardized "
                             "by the teacher's statistics (0: off)")
    method.add_argument("--block-wise-fraction", type=float, default=0.0, metavar="F",
                        help="spend the first F of the budget (its FLOPs or minutes, else its steps) on a block-wise "
                             "stage (needs --teacher and a middle_* model with recursion-wise KV): each shared layer, "
                             "at each recursion step, is fed the teacher's hidden states and trained to produce the "
                             "teacher's next ones (no routing, no gate), then training goes on end to end; the "
                             "warm-ups count its steps. Measured on SmolLM2: it does not help "
                             "(docs/conversion.md#block-wise-stage); 0: off")
    method.add_argument("--router-fit-tokens", type=int, metavar="N",
                        help="measure on N training tokens what stopping before each deciding recursion step costs "
                             "every token (KL of its next-token distribution to full depth) and fit the deciding "
                             "routers to let the cheapest leave (expert-choice with auxiliary routers, a conversion's "
                             f"default). Default: {DEFAULT_ROUTER_FIT_TOKENS} where the model has such routers and "
                             "training runs on one process, else off (a line says why). Measured on SmolLM2: "
                             "docs/conversion.md#router-fit; 0: off")
    method.add_argument("--router-fit-at", type=float, metavar="F",
                        help=f"when the router fit runs: once F of the budget is spent (default "
                             f"{DEFAULT_ROUTER_FIT_AT}, as measured on SmolLM2), after which the fitted routers also choose who "
                             f"takes each step in training (router_selection 'auxiliary'), so the model learns the "
                             f"routing it is served with; 1: after training (its estimated time is taken off "
                             f"--max-minutes), before --layer-budget sets the threshold")
    method.add_argument("--router-aux-loss-coef", type=float, help="override the model's BCE router-loss weight")
    add_trainer_arguments(parser, learning_rate=3e-4,
                          learning_rate_note="what the conversion recipe measured for SmolLM2-135M: docs/conversion.md")
    return parser


def check_router_fit_options(args, config) -> None:
    """The router fit as asked: refused (ValueError) where an explicit --router-fit-tokens N or --router-fit-at F
    cannot run; the default (None) turned off, said in one line, where it cannot."""
    if args.router_fit_tokens == 0 and args.router_fit_at is not None:
        raise ValueError(f"--router-fit-at {args.router_fit_at} says when the router fit runs, and --router-fit-tokens "
                         f"0 turns it off. Fix: leave one of them out.")
    asked = args.router_fit_tokens is not None or args.router_fit_at is not None
    if args.router_fit_tokens == 0:
        return
    fit_at = args.router_fit_at or DEFAULT_ROUTER_FIT_AT
    obstacle = router_fit_obstacle(config)
    if obstacle is None and args.block_wise_fraction and fit_at <= args.block_wise_fraction:
        # The block-wise stage trains the shared layers alone, without routing: nothing to fit the routers to yet.
        obstacle = (f"it would run at {fit_at:g} of the budget, inside the block-wise stage (--block-wise-fraction "
                    f"{args.block_wise_fraction:g}), where the model does not route",
                    f"give --router-fit-at above {args.block_wise_fraction:g}, or leave the router fit options out")
    if obstacle is None:
        return
    if asked:
        given = " ".join(f"{option} {value}" for option, value in (("--router-fit-tokens", args.router_fit_tokens),
                                                                   ("--router-fit-at", args.router_fit_at))
                         if value is not None)
        refuse_router_fit(given, *obstacle)
    args.router_fit_tokens = 0
    say_once(f"Router fit: off, {obstacle[0]}")


def say_once(message: str) -> None:
    """Prints on the first process only (torchrun and accelerate set RANK in every process they start)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def check_arguments(args) -> CheckedArguments:
    """Everything that can be refused before any work: options, INPUT_DIR, the text files, OUTPUT_DIR and the
    checkpoint to resume from. Resolves the default block sizes in `args`."""
    check_training_options(args)
    config = read_mor_config(args.model_dir, "INPUT_DIR")
    resolve_block_sizes(args, config)
    check_capacity_schedule(args, config)
    if args.hidden_distill_weight:
        if not args.teacher:
            raise ValueError(f"--hidden-distill-weight {args.hidden_distill_weight} needs a --teacher, whose hidden "
                             f"states it matches. Fix: give --teacher SOURCE (the model converted), or leave the option "
                             f"out.")
        recursion_boundaries(config)  # refuses a model without recursion steps to match
    if args.block_wise_fraction:
        if not args.teacher:
            raise ValueError(f"--block-wise-fraction {args.block_wise_fraction} trains the shared layers on the "
                             f"teacher's hidden states and needs a --teacher. Fix: give --teacher SOURCE (the model "
                             f"converted), or leave the option out.")
        check_block_wise_stage(config.sharing_strategy, config.kv_cache_policy)
    check_router_fit_options(args, config)
    if args.teacher:
        check_teacher(args, config)
    if args.eval_file:
        read_eval_text(args.eval_file)
    return check_run_folder(args, INPUT_DIR=args.model_dir, **{"--teacher": args.teacher})


def check_teacher(args, config) -> None:
    """Refuses a --teacher that distillation could not use (ValueError, one line naming the fix), reading its config
    only: distillation compares the teacher's next-token distribution with the student's at every position of a
    training block, so it needs the student's vocabulary and a context of at least --block-size tokens."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    given = f"--teacher {args.teacher}"
    teacher_source, gguf_file = resolve_source(args.teacher)  # a missing .gguf file is refused here
    folder = Path(teacher_source).expanduser()
    if not folder.exists() and not looks_like_hub_id(args.teacher):
        raise ValueError(f"{given} does not exist. Fix: check the path, or give a Hub id or a .gguf file.")
    if gguf_file is None and (folder / "config.json").is_file():
        check_model_weights(folder, given)
    teacher, _ = read_source_config(teacher_source, gguf_file, "--teacher")
    if type(teacher) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{given} is a {teacher.model_type!r} model without a language-model head, so it predicts no "
                         f"next token to distill. Fix: give the model INPUT_DIR was converted from.")
    if teacher.vocab_size != config.vocab_size:
        raise ValueError(
            f"{given} has a vocabulary of {teacher.vocab_size} tokens and INPUT_DIR {args.model_dir} one of "
            f"{config.vocab_size}: distillation compares their next-token distributions token by token, so they "
            f"need the same tokenizer. Fix: give the model INPUT_DIR was converted from, or leave --teacher out."
        )
    if args.block_wise_fraction and (teacher.num_hidden_layers, teacher.hidden_size) != (config.num_hidden_layers,
                                                                                           config.hidden_size):
        raise ValueError(
            f"{given} has {teacher.num_hidden_layers} layers of width {teacher.hidden_size} and INPUT_DIR "
            f"{args.model_dir} unrolls to {config.num_hidden_layers} of width {config.hidden_size}: "
            f"--block-wise-fraction trains each unrolled layer on the teacher's hidden states at the same depth, so "
            f"they must match. Fix: give the model INPUT_DIR was converted from, or leave --block-wise-fraction out."
        )
    teacher_context = context_length(teacher)
    if teacher_context and teacher_context < args.block_size:
        raise ValueError(
            f"{given} reads at most {teacher_context} tokens (max_position_embeddings), fewer than the training "
            f"blocks of --block-size {args.block_size}. Fix: pass --block-size {teacher_context} (or less), or give "
            f"a teacher with a longer context."
        )


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        checked = check_arguments(args)
        tokenizer = load_tokenizer(args.model_dir, "INPUT_DIR", "uptraining reads the text with it and saves it with "
                                   "the model")
        data = load_training_data(args, tokenizer)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32)
    print(choose_threads(model.config))
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    teacher = None
    if args.teacher:
        teacher_source, teacher_gguf = resolve_source(args.teacher)  # a folder, a Hub id or a .gguf file
        teacher = AutoModelForCausalLM.from_pretrained(teacher_source, gguf_file=teacher_gguf, dtype=torch.float32).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    def finish(trainer, folder, before, after, depths, train_seconds, summary):
        write_card(args, trainer, folder, Path(args.output_dir).expanduser().resolve(), before, after, depths,
                   data.eval_tokens, train_seconds, summary["router_calibration"], summary.get("router_fit"))

    return run_training(args, checked, model, tokenizer, data, start, teacher=teacher, measure_before=True,
                        finish=finish, activity="uptraining")


def write_card(args, trainer, folder: Path, output_dir: Path, before, after, depths, eval_tokens, train_seconds,
               calibration: dict | None = None, router_fit: dict | None = None):
    """Updates the conversion's card figures with this run's and renders the card into `folder`."""
    figures = load_card_figures(args.model_dir)
    if not figures:
        print(f"note: {args.model_dir} has no card figures (mor_card.json, written by the conversion); no model card "
              f"was written.")
        return
    if eval_tokens is not None:
        # "before" and "after" measured alike; the conversion's rows keep their own measurement.
        measurement = {"file": Path(args.eval_file).name, "tokens": eval_tokens.numel(),
                       "block_size": args.eval_block_size}
        rows = perplexity_rows(figures)
        for label, value in (("MoR before uptraining", before), ("MoR after uptraining", after)):
            rows.pop(label, None)
            rows[label] = {"perplexity": value, **measurement}
        figures.update(
            perplexity=rows,
            depth_histogram=depth_histogram(depths),
            depth_model="after uptraining",
            depth_measurement=measurement,
        )
    world_size = trainer.args.world_size
    figures["uptraining"] = {
        "steps": trainer.state.global_step,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "train_flops": trainer.state.total_flos,
        "train_data": args.dataset or ", ".join(Path(p).name for p in args.train_file),
        "wall_time": f"{train_seconds / 60:.1f} min on {world_size} process(es)",
        # A local teacher by its name only: the card is published, the machine's paths are not.
        "teacher": Path(args.teacher).name if args.teacher and Path(args.teacher).exists() else args.teacher,
        "router_calibration": calibration,  # --layer-budget's threshold (None when not asked for, or not applied)
        "router_fit": router_fit,  # --router-fit-tokens' report (None when not asked for)
    }
    figures["model_name"] = output_dir.name
    figures["repo_id"] = f"path/to/{output_dir.name}"
    try:
        save_card(folder, figures)
    except UnfilledPlaceholderError as error:
        print(f"warning: no model card was written ({error})")


def command_line() -> int:
    """The `mor-uptrain` console script (and `python -m conversion.uptrain`): `main`, with Ctrl-C as one error line."""
    return run_command_line(main, INTERRUPTED_RUN)


if __name__ == "__main__":
    raise SystemExit(command_line())

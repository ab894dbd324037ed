"""The options of the training command lines (uptraining and pretraining) and the checks that refuse bad ones before
any work: the data and Trainer option groups, their smallest values, a capacity schedule the model cannot follow,
OUTPUT_DIR and the checkpoint to resume from."""

from pathlib import Path
from typing import NamedTuple

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from ..cli_checks import POSITIVE, Range, check_extra_installed, check_option_needs, check_option_values
from ..measure import context_length, eval_block_size, routes_by_threshold
from ..output_dir import OutputDirExistsError, check_output_dir, check_output_dir_is_separate


# The training tokens --layer-budget calibrates the router threshold on (see `training.run.calibration_tokens`).
CALIBRATION_TOKENS = 2048


def add_data_arguments(parser, eval_help: str) -> None:
    """The data options of the training command lines."""
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", nargs="+",
                      help="local UTF-8 text file(s); documents split on <|endoftext|> or blank lines")
    data.add_argument("--dataset", help="a Hub dataset id or a local dataset folder (instead of --train-file)")
    data.add_argument("--dataset-config", help="the configuration (subset) of --dataset, when it has several")
    data.add_argument("--dataset-split", default="train", help="the split of --dataset to train on")
    data.add_argument("--text-column", default="text", help="the column of --dataset that holds the text")
    data.add_argument("--max-train-documents", type=int, help="train on the first N documents only (default: all)")
    data.add_argument("--eval-file", help=eval_help)
    data.add_argument("--eval-max-tokens", type=int, default=16384, help="perplexity on the first N tokens of it")
    data.add_argument("--block-size", type=int,
                      help="training sequence length (default: 256 tokens, or the model's context, "
                           "max_position_embeddings, when shorter; a longer value is refused)")
    data.add_argument("--eval-block-size", type=int,
                      help="block of the perplexity, every measurement alike (default: 256 tokens capped at the "
                           "model's context)")


def add_trainer_arguments(parser, learning_rate: float, learning_rate_note: str) -> None:
    """The Trainer options and the compute budget of the training command lines, and --overwrite. `learning_rate` is
    the command's default peak learning rate, `learning_rate_note` why."""
    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument("--max-steps", type=int,
                         help="optimizer steps to train (at least 1); the learning-rate schedule's length. Without it, "
                              "--max-train-flops plans the steps")
    trainer.add_argument("--max-train-flops", type=float,
                         help="training FLOP budget (forward + backward, counted from the recursion depths taken; see "
                              "conversion/flops.py): training stops at the end of the first step that reaches it. "
                              "Without --max-steps, the schedule spans the steps the budget is planned to take")
    trainer.add_argument("--max-minutes", type=float,
                         help="wall-time budget of the training, in minutes of this machine (evaluation and saving "
                              "during training included, loading and the final measurement not): training stops at "
                              "the end of the first step that reaches it. Without --max-steps and --max-train-flops, "
                              "the learning-rate schedule runs on the clock: warm-up in steps, then its decay over the "
                              "budget")
    trainer.add_argument("--per-device-train-batch-size", type=int, default=16,
                         help="blocks of --block-size tokens per process and micro-batch")
    trainer.add_argument("--gradient-accumulation-steps", type=int, default=1,
                         help="micro-batches per optimizer step")
    trainer.add_argument("--learning-rate", type=float, default=learning_rate,
                         help=f"peak learning rate (AdamW; default: {learning_rate:g}, {learning_rate_note})")
    trainer.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    trainer.add_argument("--warmup-steps", type=float, default=20,
                         help="linear warm-up steps; a value below 1 is a fraction of the run's steps (default: 20)")
    trainer.add_argument("--lr-scheduler-type", default="cosine",
                         help="Trainer's learning-rate schedule after the warm-up (linear, cosine, constant, ...)")
    trainer.add_argument("--logging-steps", type=int, default=10, help="log the losses every N optimizer steps")
    trainer.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    trainer.add_argument("--save-steps", type=int, default=200, help="save a checkpoint every N steps and at the end")
    trainer.add_argument("--save-total-limit", type=int, default=2,
                         help="keep the newest N checkpoints (older ones are deleted)")
    trainer.add_argument("--resume-from-checkpoint",
                         help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR")
    trainer.add_argument("--gradient-checkpointing", action="store_true",
                         help="recompute activations in the backward pass: less memory, more compute")
    trainer.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision")
    trainer.add_argument("--seed", type=int, default=0,
                         help="seed of a fresh model's weights (pretraining), the data order, dropout and the capacity "
                              "draws")
    trainer.add_argument("--dataloader-num-workers", type=int, default=0,
                         help="processes that prepare batches (0: the training process itself)")
    trainer.add_argument("--report-to", default="none",
                         help="where Trainer also logs: none, tensorboard, wandb, ... (installed separately)")
    trainer.add_argument("--disable-tqdm", action="store_true", help="log lines instead of progress bars")
    schedule = parser.add_argument_group(
        "expert-choice capacity schedule (the share of the tokens each recursion step keeps while training; the saved "
        "model keeps the configured capacities)")
    schedule.add_argument("--capacity-warmup-steps", type=int, default=0,
                          help="move the capacities linearly from 1 (every token at full depth) to their targets over "
                               "the first N optimizer steps")
    schedule.add_argument("--random-capacity", type=float, metavar="MIN",
                          help="every optimizer step trains with its own capacities: the steps after the first draw "
                               "theirs uniformly in [MIN, the first step's capacity], sorted non-increasing, so that "
                               "one checkpoint works at any depth and router_threshold trades quality for compute at "
                               "inference (examples/budget_curve.py); the saved config keeps the configured capacities")
    schedule.add_argument("--layer-budget", type=float, metavar="FRACTION",
                          help="after training, set the saved eval-mode router_threshold to the lowest at which the "
                               "tokens of the training text take at most FRACTION of the unrolled model's layer "
                               "applications per token (the source's, for a conversion; measured on about "
                               f"{CALIBRATION_TOKENS:,} tokens spread over the training blocks): the model's compute, "
                               "chosen by the user (pairs with --random-capacity)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT_DIR that is an earlier output of these tools (a folder "
                             "holding anything else is refused), once this run has saved its first checkpoint")


# The values each option takes (block sizes are checked by `measure.eval_block_size`), and those of uptraining's
# distillation and router options. Trainer's `max_steps=-1` (train for the epochs instead) is not offered: a run
# trains for the steps or the FLOPs it is given.
OPTION_VALUES = {
    "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
    "save_steps": 1, "save_total_limit": 1, "eval_steps": 1, "max_train_documents": 1, "eval_max_tokens": 2,
    "max_train_flops": 1, "warmup_steps": 0, "capacity_warmup_steps": 0, "learning_rate": POSITIVE,
    "weight_decay": 0, "dataloader_num_workers": 0,
    "distill_weight": Range(0, 1), "distill_temperature": POSITIVE, "router_aux_loss_coef": 0,
    "max_minutes": POSITIVE, "hidden_distill_weight": 0, "layer_budget": Range(0, 1, low_open=True),
    "block_wise_fraction": Range(0, 1), "router_fit_tokens": 0,
    "router_fit_at": Range(0, 1, low_open=True),
}


def check_training_options(args) -> None:
    """The checks of the data and Trainer options that read no file."""
    if bool(args.train_file) == bool(args.dataset):
        raise ValueError("give exactly one of --train-file or --dataset.")
    if args.max_steps is None and args.max_train_flops is None and getattr(args, "max_minutes", None) is None:
        raise ValueError("give --max-steps (optimizer steps to train), --max-train-flops (a training FLOP budget), "
                         "--max-minutes (a wall-time budget), or several.")
    check_option_values(args, OPTION_VALUES)
    random_min = getattr(args, "random_capacity", None)
    if random_min is not None and not 0.0 < random_min < 1.0:
        raise ValueError(f"--random-capacity {random_min} is not valid: it is the smallest capacity a recursion step "
                         f"may draw, a fraction of the sequence in (0, 1). Fix: give for example 0.1.")
    check_option_needs("--eval-file", args.eval_file,
                       {"--eval-block-size": args.eval_block_size, "--eval-steps": args.eval_steps})
    if args.dataset:
        check_extra_installed("datasets", "train", "--dataset", alternative="give --train-file")


def resolve_block_sizes(args, config) -> None:
    """Training blocks and perplexity blocks: 256 tokens by default, capped at the model's context."""
    args.block_size = eval_block_size(args.block_size, context_length(config), option="--block-size")
    args.eval_block_size = eval_block_size(args.eval_block_size, context_length(config))


def check_capacity_schedule(args, config) -> None:
    """Refuses a capacity schedule the model cannot follow (ValueError, one line naming the fix): only expert-choice
    routing has capacities, and a random one needs a later step to draw for, below the first step's capacity."""
    warmup_steps, random_min = getattr(args, "capacity_warmup_steps", 0), getattr(args, "random_capacity", None)
    if getattr(args, "layer_budget", None) is not None and not routes_by_threshold(config):
        raise ValueError(f"--layer-budget {args.layer_budget} sets the eval-mode router threshold of expert-choice "
                         f"routing with a recursion step that decides (capacity below 1), which this model does not "
                         f"have; nothing was written. Fix: leave --layer-budget out, or convert with --routing "
                         f"expert_choice and a --capacity below 1 after the first step.")
    if not warmup_steps and random_min is None:
        return
    option = "--random-capacity" if random_min is not None else "--capacity-warmup-steps"
    if getattr(config, "model_type", None) != "mor" or config.routing != "expert_choice":
        routing = getattr(config, "routing", None)
        raise ValueError(f"{option} schedules expert-choice capacities, and this model "
                         f"{'routes ' + repr(routing) if routing else 'is not an MoR model'}; nothing was written. Fix: "
                         f"leave {option} out, or train an MoR model with routing 'expert_choice'.")
    if random_min is not None:
        if config.num_recursions < 2:
            raise ValueError("--random-capacity draws the capacities of the recursion steps after the first, and this "
                             "model has one recursion step; nothing was written. Fix: leave --random-capacity out.")
        if random_min >= config.capacity[0]:
            raise ValueError(f"--random-capacity {random_min} is not below the first recursion step's capacity "
                             f"{config.capacity[0]}, the most a later step can keep; nothing was written. Fix: give a "
                             f"value below {config.capacity[0]} (for example 0.1).")


class CheckedArguments(NamedTuple):
    resume_checkpoint: str | None  # the checkpoint folder to resume from
    in_place: bool  # True: the run continues one already in OUTPUT_DIR; False: it starts in a staging folder


def check_run_folder(args, **inputs) -> CheckedArguments:
    """OUTPUT_DIR and the checkpoint to resume from. `inputs` (name -> local path or Hub id) are the model inputs of
    the run, which OUTPUT_DIR may not be, contain or lie inside; the data options are added here."""
    output_dir = Path(args.output_dir).expanduser()
    # Resolved paths, so that no spelling of OUTPUT_DIR (relative, `..`, a symlink) can replace or write into an input.
    check_output_dir_is_separate(output_dir, **inputs, **{"--dataset": args.dataset, "--eval-file": args.eval_file})
    for path in args.train_file or []:
        check_output_dir_is_separate(output_dir, **{"--train-file": path})
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"OUTPUT_DIR {output_dir} exists and is not a folder; nothing was written.")
    has_content = output_dir.is_dir() and any(output_dir.iterdir())

    resume_checkpoint = None
    if args.resume_from_checkpoint == "latest":
        resume_checkpoint = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
        if resume_checkpoint is None:
            where = "does not exist" if not output_dir.exists() else "has no checkpoint-N folder"
            raise ValueError(
                f"--resume-from-checkpoint latest: there is no checkpoint to resume from, {output_dir} {where} (a run "
                f"stopped before its first checkpoint leaves nothing); nothing was written. Start the run again "
                f"without --resume-from-checkpoint."
            )
        if not (Path(resume_checkpoint) / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"--resume-from-checkpoint latest: the newest checkpoint, {resume_checkpoint}, is incomplete (no "
                f"{TRAINER_STATE_NAME}: the run was stopped while saving it). Delete it to resume from the one before."
            )
    elif args.resume_from_checkpoint:
        resume_checkpoint = str(Path(args.resume_from_checkpoint).expanduser())
        if not (Path(resume_checkpoint) / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"--resume-from-checkpoint {args.resume_from_checkpoint} is not a checkpoint (a checkpoint-N folder "
                f"with {TRAINER_STATE_NAME}); give one, or 'latest' for the newest in OUTPUT_DIR."
            )
    if has_content and not (args.overwrite or args.resume_from_checkpoint):
        raise OutputDirExistsError(
            f"{output_dir} already exists and is not empty; nothing was written. Pass --resume-from-checkpoint to "
            f"continue a run there, or --overwrite to replace it."
        )
    in_place = args.resume_from_checkpoint == "latest" or (
        bool(args.resume_from_checkpoint) and has_content and not args.overwrite
    )
    if not in_place:
        # The new run replaces OUTPUT_DIR: only an empty folder or an earlier output of these tools, never the cwd.
        check_output_dir(output_dir, overwrite=True)
    return CheckedArguments(resume_checkpoint, in_place)

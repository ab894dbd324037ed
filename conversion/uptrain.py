"""Uptrain a converted MoR model: continued pretraining with the LM loss plus the router losses, optionally distilled
from the source model, with `transformers.Trainer`.

It runs as it is on one process, and multi-process (DDP; gloo on CPU, NCCL on GPUs) under `accelerate launch` or
`torchrun`. Checkpoints (with the tokenizer) land in OUTPUT_DIR/checkpoint-N (resume with --resume-from-checkpoint);
the final model, its tokenizer, the updated model card and a loss-curve picture land in OUTPUT_DIR itself. Until the
first checkpoint is saved, a new run writes into a hidden staging folder next to OUTPUT_DIR, so that a run stopped
before it (an error, Ctrl-C, SIGTERM) leaves nothing behind; from the first checkpoint on, OUTPUT_DIR holds what
`--resume-from-checkpoint latest` continues from.

Examples:

    python -m conversion.uptrain outputs/stories-mor outputs/stories-mor-uptrained \\
        --train-file examples/assets/tinystories_train_sample.txt \\
        --eval-file examples/assets/tinystories_valid_sample.txt --max-steps 600 --teacher examples/assets/stories260K

    torchrun --nproc_per_node 2 -m conversion.uptrain outputs/stories-mor outputs/stories-mor-ddp \\
        --train-file examples/assets/tinystories_train_sample.txt --max-steps 100
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from .cli_checks import check_minimum_values, check_option_needs, looks_like_hub_id, one_line, read_mor_config
from .convert_llama_to_mor import resolve_source
from .measure import (
    check_fills_one_block,
    context_length,
    eval_block_size,
    perplexity_and_depths,
    read_eval_text,
    read_eval_tokens,
)
from .model_card import UnfilledPlaceholderError, describe_measurement, load_card_figures, perplexity_rows, save_card
from .output_dir import OutputDirExistsError, check_output_dir_is_separate, staged_output_dir
from .text_files import read_text_file


class TokenBlocks(Dataset):
    """A token stream cut into blocks of `block_size` tokens (packing: documents follow each other)."""

    def __init__(self, token_ids: torch.LongTensor, block_size: int, source: str = "the text"):
        num_blocks = token_ids.numel() // block_size
        if num_blocks == 0:
            raise ValueError(
                f"{source} has {token_ids.numel()} tokens, fewer than one block of {block_size}: give more text, or a "
                f"smaller --block-size."
            )
        self.blocks = token_ids[: num_blocks * block_size].view(num_blocks, block_size)

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def tokenize_texts(tokenizer, texts) -> torch.LongTensor:
    """Concatenates documents, each starting with BOS and ending with EOS when the tokenizer has them."""
    ids = []
    for text in texts:
        if not text.strip():
            continue
        document = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            document = [tokenizer.bos_token_id, *document]
        if tokenizer.eos_token_id is not None:
            document.append(tokenizer.eos_token_id)
        ids.extend(document)
    return torch.tensor(ids, dtype=torch.long)


def load_training_texts(args) -> list[str]:
    if args.dataset:
        from datasets import load_dataset

        try:
            dataset = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        except Exception as error:  # datasets raises many kinds (not found, offline, a bad split or config)
            if Path(args.dataset).expanduser().exists():
                fix = ("check that it is a dataset folder (data files such as .jsonl, .csv, .parquet or .txt), and "
                       "--dataset-config and --dataset-split")
            else:
                fix = ("check the dataset name (a Hub dataset id or a local dataset folder), --dataset-config and "
                       "--dataset-split, the network connection, and unset HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) "
                       "to download it")
            raise ValueError(f"--dataset {args.dataset} could not be loaded ({one_line(error)}); nothing was "
                             f"written. Fix: {fix}; or give --train-file.") from None
        if args.text_column not in dataset.column_names:
            raise ValueError(f"--text-column {args.text_column!r} is not a column of {args.dataset}: {dataset.column_names}")
        if args.max_train_documents:
            dataset = dataset.select(range(min(args.max_train_documents, len(dataset))))
        return list(dataset[args.text_column])
    texts = []
    for path in args.train_file:
        text = read_text_file(path, "--train-file")
        # TinyStories-style files separate documents by <|endoftext|> or blank lines.
        separator = "<|endoftext|>" if "<|endoftext|>" in text else "\n\n"
        texts.extend(part.strip() for part in text.split(separator))
    if args.max_train_documents:
        texts = texts[: args.max_train_documents]
    return texts


class CapacityWarmup(TrainerCallback):
    """Expert-choice capacity warm-up: every step starts at capacity 1 (all tokens at full depth) and moves linearly
    to the configured capacities over `warmup_steps`, so the routers learn before they start dropping tokens."""

    def __init__(self, model, warmup_steps: int):
        self.config = model.config
        self.target = list(model.config.capacity)
        self.warmup_steps = warmup_steps

    def capacity_at(self, step: int) -> list[float]:
        progress = min(1.0, step / max(1, self.warmup_steps))
        return [1.0 - progress * (1.0 - target) for target in self.target]

    def on_step_begin(self, args, state, control, **kwargs):
        self.config.capacity = self.capacity_at(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.config.capacity = self.target


class UptrainTrainer(Trainer):
    """Trainer whose loss adds distillation from a teacher (KL to its softened logits), and which logs every loss
    term (LM, router, distillation) on its own."""

    def __init__(self, *args, teacher=None, distill_weight=0.5, distill_temperature=1.0, **kwargs):
        model = kwargs.get("model")
        # Trainer sets `config.use_cache = args.use_cache` (False) for training; what is saved keeps the model's own.
        self.saved_use_cache = getattr(getattr(model, "config", None), "use_cache", True)
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._loss_terms: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        terms = {"lm_loss": outputs.lm_loss}
        for name in ("router_aux_loss", "balance_loss", "router_z_loss"):
            if getattr(outputs, name, None) is not None:
                terms[name] = getattr(outputs, name)
        if self.teacher is not None and model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            temperature = self.distill_temperature
            distill_loss = F.kl_div(
                F.log_softmax(outputs.logits.float() / temperature, dim=-1),
                F.log_softmax(teacher_logits.float() / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * temperature**2 / outputs.logits.shape[1]
            loss = (1 - self.distill_weight) * loss + self.distill_weight * distill_loss
            terms["distill_loss"] = distill_loss
        if model.training:
            for name, value in terms.items():
                self._loss_terms.setdefault(name, []).append(value.detach().float().item())
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir=None, _internal_call=False):
        """Saves with the model's own `use_cache` (the final model and every checkpoint), training goes on without."""
        config = self.model.config
        training_use_cache = config.use_cache
        config.use_cache = self.saved_use_cache
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            config.use_cache = training_use_cache

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            for name, values in self._loss_terms.items():
                logs[name] = round(sum(values) / len(values), 4)
            self._loss_terms = {}
        super().log(logs, *args, **kwargs)


class MoveIntoPlaceAtFirstCheckpoint(TrainerCallback):
    """A new run trains into a hidden staging folder (see `output_dir.staged_output_dir`), so that one stopped before
    its first checkpoint leaves nothing behind. Once that checkpoint is complete, the folder moves into place as
    OUTPUT_DIR, where later checkpoints and the final model land and where `--resume-from-checkpoint latest` finds
    them: a run stopped after it can be resumed."""

    def __init__(self, staging: contextlib.ExitStack, output_dir: Path):
        self.staging = staging
        self.output_dir = output_dir

    def on_save(self, args, state, control, **kwargs):
        if args.output_dir == str(self.output_dir):
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every process has written its part of the checkpoint (its RNG state)
            torch.distributed.barrier()
        self.staging.close()  # renames the staging folder to OUTPUT_DIR, on the process that made it
        if distributed:  # no process writes again before the folder has moved
            torch.distributed.barrier()
        args.output_dir = str(self.output_dir)


def save_loss_curve(log_history, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(entry["step"], entry["lm_loss"]) for entry in log_history if "lm_loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:  # fewer steps than --logging-steps: nothing was logged
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train LM loss")
    if evaluation:
        axis.plot(*zip(*evaluation), marker="o", label="eval loss")
    for name in ("router_aux_loss", "balance_loss", "distill_loss"):
        points = [(entry["step"], entry[name]) for entry in log_history if name in entry]
        if points:
            axis.plot(*zip(*points), linestyle="--", label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("MoR uptraining")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog="python -m conversion.uptrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", metavar="INPUT_DIR", help="a converted MoR folder (or Hub id)")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to OUTPUT_DIR; it may not be, "
                             "contain or lie inside INPUT_DIR, --teacher or the data")
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", nargs="+",
                      help="local UTF-8 text file(s); documents split on <|endoftext|> or blank lines")
    data.add_argument("--dataset", help="a Hub dataset id or a local dataset folder (instead of --train-file)")
    data.add_argument("--dataset-config")
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--max-train-documents", type=int)
    data.add_argument("--eval-file", help="text file for the perplexity before and after uptraining (and --eval-steps)")
    data.add_argument("--eval-max-tokens", type=int, default=16384, help="perplexity on the first N tokens of it")
    data.add_argument("--block-size", type=int,
                      help="training sequence length (default: 256 tokens, or the model's context, "
                           "max_position_embeddings, when shorter; a longer value is refused)")
    data.add_argument("--eval-block-size", type=int,
                      help="block of the perplexity before and after uptraining, both measured alike (default: as the "
                           "conversion, 256 tokens capped at the model's context)")
    method = parser.add_argument_group("MoR uptraining")
    method.add_argument("--teacher", help="the source model (folder, Hub id or .gguf file) to distill from")
    method.add_argument("--distill-weight", type=float, default=0.5)
    method.add_argument("--distill-temperature", type=float, default=1.0)
    method.add_argument("--capacity-warmup-steps", type=int, default=0)
    method.add_argument("--router-aux-loss-coef", type=float, help="override the model's BCE router-loss weight")
    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument("--max-steps", type=int, required=True, help="optimizer steps to train (at least 1)")
    trainer.add_argument("--per-device-train-batch-size", type=int, default=16)
    trainer.add_argument("--gradient-accumulation-steps", type=int, default=1)
    trainer.add_argument("--learning-rate", type=float, default=1e-3)
    trainer.add_argument("--weight-decay", type=float, default=0.0)
    trainer.add_argument("--warmup-steps", type=int, default=20)
    trainer.add_argument("--lr-scheduler-type", default="cosine")
    trainer.add_argument("--logging-steps", type=int, default=10)
    trainer.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    trainer.add_argument("--save-steps", type=int, default=200, help="save a checkpoint every N steps and at the end")
    trainer.add_argument("--save-total-limit", type=int, default=2)
    trainer.add_argument("--resume-from-checkpoint",
                         help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR")
    trainer.add_argument("--gradient-checkpointing", action="store_true")
    trainer.add_argument("--bf16", action="store_true")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--dataloader-num-workers", type=int, default=0)
    trainer.add_argument("--report-to", default="none")
    trainer.add_argument("--disable-tqdm", action="store_true", help="log lines instead of progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT_DIR (once this run has saved its first checkpoint)")
    return parser


# The smallest value each option takes (block sizes are checked by `measure.eval_block_size`). Trainer's
# `max_steps=-1` (train for the epochs instead) is not offered: a run trains for the steps it is given.
MINIMUM_VALUES = {
    "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
    "save_steps": 1, "save_total_limit": 1, "eval_steps": 1, "max_train_documents": 1, "eval_max_tokens": 2,
}


class CheckedArguments(NamedTuple):
    resume_checkpoint: str | None  # the checkpoint folder to resume from
    in_place: bool  # True: the run continues one already in OUTPUT_DIR; False: it starts in a staging folder


def check_arguments(args) -> CheckedArguments:
    """Everything that can be refused before any work: options, INPUT_DIR, the text files, OUTPUT_DIR and the
    checkpoint to resume from. Resolves the default block sizes in `args`."""
    if bool(args.train_file) == bool(args.dataset):
        raise ValueError("give exactly one of --train-file or --dataset.")
    check_minimum_values(args, MINIMUM_VALUES)
    check_option_needs("--eval-file", args.eval_file,
                       {"--eval-block-size": args.eval_block_size, "--eval-steps": args.eval_steps})
    if args.dataset:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ValueError(
                '--dataset needs the `datasets` package, which is not installed; nothing was written. Fix: pip install '
                '"mor-transformers[train]" (or pip install datasets), or give --train-file.'
            ) from None

    config = read_mor_config(args.model_dir, "INPUT_DIR")
    # Training blocks and perplexity blocks: 256 tokens by default, capped at the model's context.
    args.block_size = eval_block_size(args.block_size, context_length(config), option="--block-size")
    args.eval_block_size = eval_block_size(args.eval_block_size, context_length(config))
    if args.teacher:
        teacher_source, _ = resolve_source(args.teacher)  # a missing .gguf file is refused here
        if not Path(teacher_source).expanduser().exists() and not looks_like_hub_id(args.teacher):
            raise ValueError(f"--teacher {args.teacher} does not exist. Fix: check the path, or give a Hub id or a "
                             f".gguf file.")
    if args.eval_file:
        read_eval_text(args.eval_file)

    output_dir = Path(args.output_dir).expanduser()
    # Resolved paths, so that no spelling of OUTPUT_DIR (relative, `..`, a symlink) can replace or write into an input.
    check_output_dir_is_separate(
        output_dir, INPUT_DIR=args.model_dir, **{"--teacher": args.teacher, "--dataset": args.dataset,
                                                 "--eval-file": args.eval_file}
    )
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
    return CheckedArguments(resume_checkpoint, in_place)


def load_tokenizer(model_dir):
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the tokenizer of INPUT_DIR {model_dir} could not be loaded ({one_line(error)}); uptraining needs the "
            f"one its conversion saved next to the weights."
        ) from None


def staging_folder(staging: contextlib.ExitStack, output_dir: Path, training_args) -> Path:
    """Enters `staged_output_dir` on the process that saves; every process gets the same staging folder's path."""
    # overwrite=True: check_arguments has already refused an OUTPUT_DIR that may not be replaced.
    folder = staging.enter_context(staged_output_dir(output_dir, overwrite=True)) if training_args.should_save else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [str(folder) if folder is not None else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = Path(shared[0])
    return folder


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        checked = check_arguments(args)
        # The text is read and tokenized before the model is loaded, so that unusable data is refused at once.
        tokenizer = load_tokenizer(args.model_dir)
        train_source = f"--dataset {args.dataset}" if args.dataset else f"--train-file {' '.join(args.train_file)}"
        train_dataset = TokenBlocks(tokenize_texts(tokenizer, load_training_texts(args)), args.block_size, train_source)
        eval_tokens = eval_dataset = None
        if args.eval_file:
            eval_tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
            check_fills_one_block(eval_tokens, args.eval_block_size, args.eval_file, args.eval_max_tokens)
            if args.eval_steps:
                eval_dataset = TokenBlocks(eval_tokens, args.block_size, f"--eval-file {args.eval_file}")
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32)
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    teacher = None
    if args.teacher:
        teacher_source, teacher_gguf = resolve_source(args.teacher)  # a folder, a Hub id or a .gguf file
        teacher = AutoModelForCausalLM.from_pretrained(teacher_source, gguf_file=teacher_gguf, dtype=torch.float32).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    output_dir = Path(args.output_dir).expanduser().resolve()
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        activation_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
        disable_tqdm=args.disable_tqdm,
        # Routing can leave a router or a relaxation delta without gradient in a step (no token routed to it).
        ddp_find_unused_parameters=True,
        use_cpu=not torch.cuda.is_available(),
    )
    staging = contextlib.ExitStack()
    with staging:  # on leaving it, a run that is still staged (no checkpoint saved) moves into place
        if not checked.in_place:
            training_args.output_dir = str(staging_folder(staging, output_dir, training_args))
        callbacks = [MoveIntoPlaceAtFirstCheckpoint(staging, output_dir)]
        if args.capacity_warmup_steps:
            callbacks.append(CapacityWarmup(model, args.capacity_warmup_steps))
        trainer = UptrainTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            # The tokenizer goes into every checkpoint and the final folder; the blocks need no padding collator.
            processing_class=tokenizer,
            data_collator=default_data_collator,
            callbacks=callbacks,
            teacher=teacher.to(training_args.device) if teacher is not None else None,
            distill_weight=args.distill_weight,
            distill_temperature=args.distill_temperature,
        )

        before = None
        if eval_tokens is not None and trainer.is_world_process_zero():
            before, _ = perplexity_and_depths(model, eval_tokens, args.eval_block_size, desc="perplexity before")
            print(f"Perplexity before uptraining: {before:.2f}")

        trainer.train(resume_from_checkpoint=checked.resume_checkpoint)
        train_seconds = time.perf_counter() - start

        # OUTPUT_DIR, or the staging folder still when no checkpoint was saved (a run resumed at its last step).
        final_dir = Path(training_args.output_dir)
        trainer.save_model(str(final_dir))  # the final model and its tokenizer (every process must call this)
        if not trainer.is_world_process_zero():
            return 0
        after, depths = write_card(args, trainer, final_dir, output_dir, before, eval_tokens, train_seconds)
        curve_saved = save_loss_curve(trainer.state.log_history, final_dir / "loss_curve.png")

    print(f"\nUptrained {trainer.state.global_step} steps in {train_seconds / 60:.1f} min; saved {output_dir}")
    if before is not None:
        measured = describe_measurement({"file": args.eval_file, "tokens": eval_tokens.numel(),
                                         "block_size": args.eval_block_size})
        print(f"  perplexity before {before:.2f} -> after {after:.2f} ({measured.replace('`', '')})")
        total = sum(depths.values()) - depths.get(0, 0)
        mean = sum(d * c for d, c in depths.items()) / max(1, total)
        print(f"  recursion depths: {dict(sorted((d, c) for d, c in depths.items() if d > 0))} (mean {mean:.2f})")
    if curve_saved:
        print(f"  loss curve: {output_dir / 'loss_curve.png'}")
    return 0


def write_card(args, trainer, folder: Path, output_dir: Path, before, eval_tokens, train_seconds):
    """Updates the conversion's card figures with this run's and renders the card into `folder`; returns the
    perplexity and depths after uptraining (None when there is no evaluation text)."""
    after, depths = (None, None)
    if eval_tokens is not None:
        after, depths = perplexity_and_depths(trainer.model, eval_tokens, args.eval_block_size, desc="perplexity after")
    figures = load_card_figures(args.model_dir)
    if not figures:
        print(f"note: {args.model_dir} has no card figures (mor_card.json, written by the conversion); no model card "
              f"was written.")
        return after, depths
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
            depth_histogram={str(d): c for d, c in sorted(depths.items()) if d > 0},
            depth_model="after uptraining",
            depth_measurement=measurement,
        )
    world_size = trainer.args.world_size
    figures["uptraining"] = {
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        * world_size * args.block_size,
        "train_data": args.dataset or ", ".join(Path(p).name for p in args.train_file),
        "wall_time": f"{train_seconds / 60:.1f} min on {world_size} process(es)",
        "teacher": args.teacher,
    }
    figures["model_name"] = output_dir.name
    figures["repo_id"] = f"path/to/{output_dir.name}"
    try:
        save_card(folder, figures)
    except UnfilledPlaceholderError as error:
        print(f"warning: no model card was written ({error})")
    return after, depths


if __name__ == "__main__":
    raise SystemExit(main())

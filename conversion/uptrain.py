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
        --eval-file examples/assets/tinystories_valid_sample.txt --max-steps 600 --teacher examples/assets/stories260K

    torchrun --nproc_per_node 2 --no-python mor-uptrain outputs/stories-mor outputs/stories-mor-ddp \\
        --train-file examples/assets/tinystories_train_sample.txt --max-steps 100
"""

import argparse
import contextlib
import json
import math
import random
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

from .cli_checks import (
    HelpFormatter,
    check_extra_installed,
    describe_threads,
    check_minimum_values,
    check_option_needs,
    looks_like_hub_id,
    one_line,
    read_mor_config,
    run_command_line,
)
from .convert_llama_to_mor import resolve_source
from .flops import FlopCounter
from .measure import (
    check_fills_one_block,
    context_length,
    depth_histogram,
    eval_block_size,
    format_depth_histogram,
    mean_depth,
    perplexity_and_depths,
    read_eval_text,
    read_eval_tokens,
)
from .model_card import UnfilledPlaceholderError, describe_measurement, load_card_figures, perplexity_rows, save_card
from .output_dir import (
    TRAINER_CHECKPOINTS,
    OutputDirExistsError,
    check_output_dir,
    check_output_dir_is_separate,
    foreign_entries,
    record_output,
    staged_output_dir,
)
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


class CapacitySchedule(TrainerCallback):
    """The expert-choice capacities (`config.capacity`) each optimizer step trains with: set before the step, and the
    configured ones restored after it and at the end of training, so that evaluation, every checkpoint and the final
    model keep the configured capacities (which eval-mode routing reads: a step of capacity 1 makes no decision).

    - Warm-up (`warmup_steps`): every step starts at capacity 1 (all tokens at full depth) and moves linearly to its
      target over `warmup_steps`, so the routers learn before they start dropping tokens.
    - Random capacities (`random_min`): every optimizer step draws its own target: the first recursion step keeps its
      configured capacity c_1 and the later steps' capacities are N_r - 1 draws, uniform in [random_min, c_1], sorted
      non-increasing (a mean training depth anywhere from c_1 + (N_r - 1) * random_min to N_r * c_1). The model
      learns to work at any depth, and each router's sigmoid, trained by the BCE against top-k decisions taken at
      varying capacities, learns the probability that a token is kept: a ranking, so that `router_threshold` at
      inference trades quality for compute on one checkpoint. The draws depend on `seed` and the step only: every
      process draws the same, and a resumed run draws what the straight run drew.
    """

    def __init__(self, model, warmup_steps: int = 0, random_min: float | None = None, seed: int = 0):
        self.config = model.config
        self.configured = list(model.config.capacity)
        self.warmup_steps = warmup_steps
        self.random_min = random_min
        self.seed = seed

    def target_at(self, step: int) -> list[float]:
        """The capacities step `step` routes to after warm-up: the configured ones, or this step's random draw."""
        if self.random_min is None:
            return list(self.configured)
        first = self.configured[0]
        draws = random.Random(f"capacity-{self.seed}-{step}")
        later = sorted((draws.uniform(self.random_min, first) for _ in self.configured[1:]), reverse=True)
        return [first, *later]

    def expected_capacity(self) -> list[float]:
        """The mean capacities over the steps (the k-th largest of n uniform draws on [a, b] averages
        a + (b - a) * (n + 1 - k) / (n + 1)), which the FLOP budget plans with."""
        if self.random_min is None:
            return list(self.configured)
        first, draws = self.configured[0], len(self.configured) - 1
        return [first, *(self.random_min + (first - self.random_min) * (draws + 1 - k) / (draws + 1)
                         for k in range(1, draws + 1))]

    def capacity_at(self, step: int) -> list[float]:
        progress = min(1.0, step / max(1, self.warmup_steps)) if self.warmup_steps else 1.0
        return [1.0 - progress * (1.0 - target) for target in self.target_at(step)]

    def on_step_begin(self, args, state, control, **kwargs):
        self.config.capacity = self.capacity_at(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer logs, evaluates and saves right after this: with the configured capacities.
        self.config.capacity = list(self.configured)


def capacity_schedule_of(args, model) -> CapacitySchedule | None:
    """The `CapacitySchedule` of --capacity-warmup-steps and --random-capacity, or None when neither is given."""
    warmup_steps, random_min = getattr(args, "capacity_warmup_steps", 0), getattr(args, "random_capacity", None)
    if not warmup_steps and random_min is None:
        return None
    return CapacitySchedule(model, warmup_steps, random_min, seed=args.seed)


def check_capacity_schedule(args, config) -> None:
    """Refuses a capacity schedule the model cannot follow (ValueError, one line naming the fix): only expert-choice
    routing has capacities, and a random one needs a later step to draw for, below the first step's capacity."""
    warmup_steps, random_min = getattr(args, "capacity_warmup_steps", 0), getattr(args, "random_capacity", None)
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


class FlopBudget(TrainerCallback):
    """Keeps Trainer's FLOP count (`state.total_flos`, the depth-aware count of `UptrainTrainer.floating_point_ops`)
    summed over every process after each optimizer step, and stops training at the end of the first step that brings
    it to `max_flops` or beyond: the budget is checked right after the step that crosses it, so a run overshoots by
    less than one step's FLOPs and never stops short of the budget. That step is saved (and evaluated, with
    evaluation on), as the last step of a run that reaches max_steps is."""

    def __init__(self, trainer: Trainer, max_flops: float | None = None):
        self.trainer = trainer
        self.max_flops = max_flops
        self.reached = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_flops is None:
            return  # Trainer sums the count itself before every log, save and the end of training
        # Every process ends the step together, so the count's all-gather (under DDP) is safe here.
        self.trainer.store_flos()
        if state.total_flos >= self.max_flops:
            self.reached = True
            control.should_training_stop = True
            if args.save_strategy == "steps":
                control.should_save = True
            if args.eval_strategy == "steps":
                control.should_evaluate = True


class UptrainTrainer(Trainer):
    """Trainer whose loss adds distillation from a teacher (KL to its softened logits), which logs every loss term
    (LM, router, distillation) on its own, and which counts the training FLOPs from the recursion depths taken
    (`conversion.flops.FlopCounter`; the teacher's forward passes are not counted), logged as `train_flops` with the
    tokens seen. `max_train_flops` stops training once the count reaches it (`FlopBudget`). Vanilla Llama models train
    with it too (the plain LM loss; every token at full depth)."""

    def __init__(self, *args, teacher=None, distill_weight=0.5, distill_temperature=1.0, max_train_flops=None,
                 **kwargs):
        model = kwargs.get("model")
        # Trainer sets `config.use_cache = args.use_cache` (False) for training; what is saved keeps the model's own.
        self.saved_use_cache = getattr(getattr(model, "config", None), "use_cache", True)
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._loss_terms: dict[str, list[float]] = {}
        self.flop_counter = flop_counter_of(self.model)
        if max_train_flops is not None and self.flop_counter is None:
            raise ValueError(f"a FLOP budget needs a model whose FLOPs can be counted (a Llama or an MoR causal LM), "
                             f"not a {type(self.model).__name__}.")
        self._micro_batch_flops = None
        self.flop_budget = FlopBudget(self, max_train_flops)
        self.add_callback(self.flop_budget)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts_depth = self.flop_counter is not None and self.flop_counter.is_mor
        outputs = model(**inputs, output_recursion_depth=True) if counts_depth else model(**inputs)
        if model.training and self.flop_counter is not None:
            token_valid = inputs.get("attention_mask")
            if token_valid is None:
                token_valid = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            self._micro_batch_flops = self.flop_counter.batch_flops(
                token_valid, outputs.recursion_depth if counts_depth else None
            )
        loss = outputs.loss
        # A vanilla model's loss is the LM loss.
        terms = {"lm_loss": outputs.lm_loss if getattr(outputs, "lm_loss", None) is not None else outputs.loss}
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

    def floating_point_ops(self, inputs) -> float:
        """The FLOPs of the micro-batch just trained, counted by `compute_loss` from its recursion depths (Trainer
        calls this after every training step and adds it to `state.total_flos`, which checkpoints keep)."""
        if self.flop_counter is None:
            return super().floating_point_ops(inputs)
        flops, self._micro_batch_flops = self._micro_batch_flops, None
        return flops or 0.0

    def save_model(self, output_dir=None, _internal_call=False):
        """Saves with the model's own `use_cache` (the final model and every checkpoint), training goes on without."""
        config = self.model.config
        training_use_cache = config.use_cache
        config.use_cache = self.saved_use_cache
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            config.use_cache = training_use_cache

    def _save(self, output_dir=None, state_dict=None):
        """Saves a sharded model (FSDP2, DeepSpeed) as a one-process run saves it. Their gathered state dicts hold
        the tied head and the embeddings as two tensors, which `save_pretrained` (which finds ties by storage) would
        both write: the head is dropped, as `tie_word_embeddings` restores it on loading. And FSDP2's `fully_shard`
        turns the model's class into a subclass FSDP<Class> defined in torch, for which `save_pretrained` would write
        torch's FSDP source files as the model's code and point config.json's auto_map at them: the model saves as
        its own class."""
        from torch.distributed.fsdp import FSDPModule

        head = self.model.get_output_embeddings()
        if state_dict is not None and head is not None and head.weight is self.model.get_input_embeddings().weight:
            head_names = {f"{name}.weight" for name, module in self.model.named_modules() if module is head}
            state_dict = {name: tensor for name, tensor in state_dict.items() if name not in head_names}
        model_class = type(self.model)
        if not issubclass(model_class, FSDPModule):
            return super()._save(output_dir, state_dict=state_dict)
        self.model.__class__ = next(cls for cls in model_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.model.__class__ = model_class

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            # Every process logs a training step (Trainer gathers the loss there), so the terms are averaged over
            # the processes here, as Trainer averages the loss: the global batch's, not the main process's part.
            names = sorted(self._loss_terms)
            local = torch.tensor([sum(self._loss_terms[n]) / len(self._loss_terms[n]) for n in names],
                                 device=self.args.device)
            means = self.accelerator.reduce(local, reduction="mean") if names else local
            for name, value in zip(names, means.tolist()):
                logs[name] = round(value, 4)
            self._loss_terms = {}
            # Trainer sums the count (store_flos) just before it logs; current_flos is what a later log adds.
            logs["train_flops"] = self.state.total_flos + self.current_flos
        super().log(logs, *args, **kwargs)


def flop_counter_of(model) -> FlopCounter | None:
    """A `FlopCounter` for `model` (DDP-unwrapped), or None for a model it does not know (a PEFT wrapper, another
    architecture): Trainer's own 6 * parameters * tokens count is used then."""
    try:
        return FlopCounter(model)
    except AttributeError:
        return None


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


# What Ctrl-C leaves of a training run (see `MoveIntoPlaceAtFirstCheckpoint` above).
INTERRUPTED_RUN = ("a run stopped before its first checkpoint leaves nothing, a later one continues with "
                   "--resume-from-checkpoint latest")


def save_loss_curve(log_history, path, title: str = "MoR uptraining") -> bool:
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
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog="mor-uptrain", description=__doc__, formatter_class=HelpFormatter
    )
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
    method.add_argument("--router-aux-loss-coef", type=float, help="override the model's BCE router-loss weight")
    add_trainer_arguments(parser)
    return parser


def add_data_arguments(parser, eval_help: str) -> None:
    """The data options of the training command lines (uptraining, and pretraining in conversion/pretrain.py)."""
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


def add_trainer_arguments(parser) -> None:
    """The Trainer options and the compute budget of the training command lines, and --overwrite."""
    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument("--max-steps", type=int,
                         help="optimizer steps to train (at least 1); the learning-rate schedule's length. Without it, "
                              "--max-train-flops plans the steps")
    trainer.add_argument("--max-train-flops", type=float,
                         help="training FLOP budget (forward + backward, counted from the recursion depths taken; see "
                              "conversion/flops.py): training stops at the end of the first step that reaches it. "
                              "Without --max-steps, the schedule spans the steps the budget is planned to take")
    trainer.add_argument("--per-device-train-batch-size", type=int, default=16,
                         help="blocks of --block-size tokens per process and micro-batch")
    trainer.add_argument("--gradient-accumulation-steps", type=int, default=1,
                         help="micro-batches per optimizer step")
    trainer.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (AdamW)")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT_DIR that is an earlier output of these tools (a folder "
                             "holding anything else is refused), once this run has saved its first checkpoint")


# The smallest value each option takes (block sizes are checked by `measure.eval_block_size`). Trainer's
# `max_steps=-1` (train for the epochs instead) is not offered: a run trains for the steps or the FLOPs it is given.
MINIMUM_VALUES = {
    "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
    "save_steps": 1, "save_total_limit": 1, "eval_steps": 1, "max_train_documents": 1, "eval_max_tokens": 2,
    "max_train_flops": 1, "warmup_steps": 0, "capacity_warmup_steps": 0,
}


class CheckedArguments(NamedTuple):
    resume_checkpoint: str | None  # the checkpoint folder to resume from
    in_place: bool  # True: the run continues one already in OUTPUT_DIR; False: it starts in a staging folder


def check_arguments(args) -> CheckedArguments:
    """Everything that can be refused before any work: options, INPUT_DIR, the text files, OUTPUT_DIR and the
    checkpoint to resume from. Resolves the default block sizes in `args`."""
    check_training_options(args)
    config = read_mor_config(args.model_dir, "INPUT_DIR")
    resolve_block_sizes(args, config)
    check_capacity_schedule(args, config)
    if args.teacher:
        teacher_source, _ = resolve_source(args.teacher)  # a missing .gguf file is refused here
        if not Path(teacher_source).expanduser().exists() and not looks_like_hub_id(args.teacher):
            raise ValueError(f"--teacher {args.teacher} does not exist. Fix: check the path, or give a Hub id or a "
                             f".gguf file.")
    if args.eval_file:
        read_eval_text(args.eval_file)
    return check_run_folder(args, INPUT_DIR=args.model_dir, **{"--teacher": args.teacher})


def check_training_options(args) -> None:
    """The checks of the data and Trainer options that read no file (shared with conversion/pretrain.py)."""
    if bool(args.train_file) == bool(args.dataset):
        raise ValueError("give exactly one of --train-file or --dataset.")
    if args.max_steps is None and args.max_train_flops is None:
        raise ValueError("give --max-steps (optimizer steps to train), --max-train-flops (a training FLOP budget), "
                         "or both.")
    check_minimum_values(args, MINIMUM_VALUES)
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


def load_tokenizer(model_dir, described: str = "INPUT_DIR", needed_by: str = "uptraining needs the one its "
                   "conversion saved next to the weights"):
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the tokenizer of {described} {model_dir} could not be loaded ({one_line(error)}); {needed_by}."
        ) from None


class TrainingData(NamedTuple):
    train_dataset: TokenBlocks
    eval_tokens: torch.LongTensor | None  # the perplexity text, when --eval-file is given
    eval_dataset: TokenBlocks | None  # its blocks for Trainer's evaluation, when --eval-steps is given too


def load_training_data(args, tokenizer) -> TrainingData:
    """Reads and tokenizes the training and evaluation text (before any model is loaded, so that unusable data is
    refused at once)."""
    train_source = f"--dataset {args.dataset}" if args.dataset else f"--train-file {' '.join(args.train_file)}"
    train_dataset = TokenBlocks(tokenize_texts(tokenizer, load_training_texts(args)), args.block_size, train_source)
    eval_tokens = eval_dataset = None
    if args.eval_file:
        eval_tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
        check_fills_one_block(eval_tokens, args.eval_block_size, args.eval_file, args.eval_max_tokens)
        if args.eval_steps:
            eval_dataset = TokenBlocks(eval_tokens, args.block_size, f"--eval-file {args.eval_file}")
    return TrainingData(train_dataset, eval_tokens, eval_dataset)


def staging_folder(staging: contextlib.ExitStack, output_dir: Path, training_args) -> Path:
    """Enters `staged_output_dir` on the process that saves; every process gets the same staging folder's path."""
    # overwrite=True: check_arguments has already refused an OUTPUT_DIR that may not be replaced.
    folder = (staging.enter_context(staged_output_dir(output_dir, overwrite=True, grows=(TRAINER_CHECKPOINTS,)))
              if training_args.should_save else None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [str(folder) if folder is not None else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = Path(shared[0])
    return folder


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        checked = check_arguments(args)
        tokenizer = load_tokenizer(args.model_dir)
        data = load_training_data(args, tokenizer)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(describe_threads())

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32)
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    teacher = None
    if args.teacher:
        teacher_source, teacher_gguf = resolve_source(args.teacher)  # a folder, a Hub id or a .gguf file
        teacher = AutoModelForCausalLM.from_pretrained(teacher_source, gguf_file=teacher_gguf, dtype=torch.float32).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    def finish(trainer, folder, before, after, depths, train_seconds):
        write_card(args, trainer, folder, Path(args.output_dir).expanduser().resolve(), before, after, depths,
                   data.eval_tokens, train_seconds)

    return run_training(args, checked, model, tokenizer, data, start, teacher=teacher, measure_before=True,
                        finish=finish, activity="uptraining")


def build_training_arguments(args, output_dir: Path, evaluates: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        # Without --max-steps, `run_training` plans the steps from the FLOP budget.
        max_steps=args.max_steps if args.max_steps is not None else 1,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if evaluates else "no",
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
        # Counted over every process (the blocks are packed: every token is a real one).
        include_num_input_tokens_seen="all",
        # Routing can leave a router or a relaxation delta without gradient in a step (no token routed to it).
        ddp_find_unused_parameters=True,
        use_cpu=not torch.cuda.is_available(),
    )


# Token-choice depths, and expert-choice depths under --random-capacity, vary from step to step, so their plan (an even
# load; the mean capacities) is an estimate: their schedule gets this many times the planned steps, so that the budget,
# not the step count, ends a run up to that much lighter than planned (the last steps of a cosine schedule run at a
# small fraction of the peak rate).
VARYING_DEPTH_STEP_MARGIN = 1.05


def planned_steps(model, args, world_size: int, capacity_schedule: CapacitySchedule | None = None) -> int:
    """The optimizer steps the FLOP budget is planned to take, from the FLOPs of a training step with the depths
    training is expected to route (`FlopCounter.planned_batch_flops`: exact for vanilla models, routing "none" and
    expert-choice; token-choice at an even load, and random capacities at their mean, with
    `VARYING_DEPTH_STEP_MARGIN`)."""
    counter = flop_counter_of(model)
    varies = getattr(model.config, "routing", None) == "token_choice"
    configured = getattr(model.config, "capacity", None)
    if capacity_schedule is not None and capacity_schedule.random_min is not None:
        varies = True
        model.config.capacity = capacity_schedule.expected_capacity()
    try:
        step_flops = (counter.planned_batch_flops(args.per_device_train_batch_size, args.block_size)
                      * args.gradient_accumulation_steps * world_size)
    finally:
        if configured is not None:
            model.config.capacity = configured
    steps = args.max_train_flops / step_flops
    if varies:
        steps *= VARYING_DEPTH_STEP_MARGIN
    return max(1, math.ceil(steps))


def run_training(args, checked: CheckedArguments, model, tokenizer, data: TrainingData, start: float, *,
                 teacher=None, measure_before: bool = False, finish=None, activity: str = "training") -> int:
    """Trains `model` with `UptrainTrainer` as `args` say (the options of `add_data_arguments` and
    `add_trainer_arguments`), saves it with its tokenizer, a loss curve and OUTPUT_DIR/training_summary.json (steps,
    tokens seen, training FLOPs, the evaluation), and calls `finish(trainer, folder, before, after, depths,
    train_seconds)` before the folder moves into place (uptraining renders its model card there)."""
    capacity_schedule = capacity_schedule_of(args, model)
    output_dir = Path(args.output_dir).expanduser().resolve()
    training_args = build_training_arguments(args, output_dir, evaluates=data.eval_dataset is not None)
    steps_planned = None
    if args.max_train_flops is not None:
        steps_planned = planned_steps(model, args, training_args.world_size, capacity_schedule)
        if args.max_steps is None:
            training_args.max_steps = steps_planned
    # A run that continues in OUTPUT_DIR leaves what was there before, and not written by these tools, out of the
    # folder's record (see output_dir.py).
    foreign_before = foreign_entries(output_dir) if checked.in_place else []
    staging = contextlib.ExitStack()
    try:
        with staging:  # on leaving it, a run that is still staged (no checkpoint saved) moves into place
            if not checked.in_place:
                training_args.output_dir = str(staging_folder(staging, output_dir, training_args))
            callbacks = [MoveIntoPlaceAtFirstCheckpoint(staging, output_dir)]
            if capacity_schedule is not None:
                callbacks.append(capacity_schedule)
            trainer = UptrainTrainer(
                model=model,
                args=training_args,
                train_dataset=data.train_dataset,
                eval_dataset=data.eval_dataset,
                # The tokenizer goes into every checkpoint and the final folder; the blocks need no padding collator.
                processing_class=tokenizer,
                data_collator=default_data_collator,
                callbacks=callbacks,
                teacher=teacher.to(training_args.device) if teacher is not None else None,
                distill_weight=getattr(args, "distill_weight", 0.5),
                distill_temperature=getattr(args, "distill_temperature", 1.0),
                max_train_flops=args.max_train_flops,
            )

            before = None
            if measure_before and data.eval_tokens is not None and trainer.is_world_process_zero():
                before, _ = perplexity_and_depths(model, data.eval_tokens, args.eval_block_size,
                                                  desc="perplexity before")
                print(f"Perplexity before {activity}: {before:.2f}")

            trainer.train(resume_from_checkpoint=checked.resume_checkpoint)
            train_seconds = time.perf_counter() - start

            # OUTPUT_DIR, or the staging folder still when no checkpoint was saved (a run resumed at its last step).
            final_dir = Path(training_args.output_dir)
            trainer.save_model(str(final_dir))  # the final model and its tokenizer (every process must call this)
            after = depths = None
            # An FSDP-sharded model all-gathers its parameters in every forward: every process runs the measurement.
            if data.eval_tokens is not None and (trainer.is_world_process_zero() or trainer.is_fsdp_enabled):
                after, depths = perplexity_and_depths(trainer.model, data.eval_tokens, args.eval_block_size,
                                                      desc="perplexity after")
            if not trainer.is_world_process_zero():
                return 0
            summary = training_summary(args, trainer, steps_planned, data, after, depths, train_seconds)
            (final_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            if finish is not None:
                finish(trainer, final_dir, before, after, depths, train_seconds)
            curve_saved = save_loss_curve(trainer.state.log_history, final_dir / "loss_curve.png",
                                          title=f"{type(model).__name__}, {activity}")
            if final_dir == output_dir:  # a staged run is recorded as it moves into place
                record_output(final_dir, also=(TRAINER_CHECKPOINTS,), exclude=foreign_before)
    except OutputDirExistsError as error:  # OUTPUT_DIR gained other files during the run: it is kept as it is
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    print(f"\n{activity.capitalize()}: {trainer.state.global_step} steps in {train_seconds / 60:.1f} min; saved "
          f"{output_dir}")
    print(f"  training FLOPs {summary['train_flops']:.4g} ({summary['stopped_by']}), tokens seen "
          f"{summary['tokens_seen']:,}")
    if after is not None:
        measured = describe_measurement({"file": args.eval_file, "tokens": data.eval_tokens.numel(),
                                         "block_size": args.eval_block_size})
        prefix = f"perplexity before {before:.2f} -> after" if before is not None else "perplexity"
        print(f"  {prefix} {after:.2f} ({measured.replace('`', '')})")
        if depths:
            print(f"  recursion depths (tokens per depth): {format_depth_histogram(summary['eval']['depth_histogram'])}, "
                  f"mean {summary['eval']['mean_depth']:.2f}")
    if curve_saved:
        print(f"  loss curve: {output_dir / 'loss_curve.png'}")
    return 0


SUMMARY_FILE = "training_summary.json"


def training_summary(args, trainer, steps_planned, data: TrainingData, after, depths, train_seconds) -> dict:
    """What OUTPUT_DIR/training_summary.json records: the compute spent, the data seen and the evaluation."""
    state = trainer.state
    budget = args.max_train_flops
    if trainer.flop_budget.reached:
        stopped_by = "FLOP budget"
    elif state.global_step >= state.max_steps:
        stopped_by = "max steps"
    else:
        stopped_by = "end of run"
    summary = {
        "model_type": trainer.model.config.model_type,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "planned_steps": steps_planned,
        "tokens_seen": int(state.num_input_tokens_seen),
        "train_flops": state.total_flos,
        "max_train_flops": budget,
        "stopped_by": stopped_by,
        "flop_count": "conversion/flops.py: 6 * parameters touched at each token's depth + causal attention, "
                      "forward + backward" if trainer.flop_counter is not None else "Trainer: 6 * parameters * tokens",
        "wall_time_s": round(train_seconds, 2),
        "world_size": trainer.args.world_size,
        "train_data": args.dataset or [Path(p).name for p in args.train_file],
        "block_size": args.block_size,
        "eval": None,
    }
    if after is not None:
        summary["eval"] = {
            "perplexity": after,
            "file": Path(args.eval_file).name,
            "tokens": data.eval_tokens.numel(),
            "block_size": args.eval_block_size,
            "routing": "eval mode (causal)",
            "depth_histogram": depth_histogram(depths) if depths else None,
            "mean_depth": mean_depth(depths) if depths else None,
        }
    return summary


def write_card(args, trainer, folder: Path, output_dir: Path, before, after, depths, eval_tokens, train_seconds):
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

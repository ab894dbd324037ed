"""Uptrain a converted MoR model: continued pretraining with the LM loss plus the router losses, optionally distilled
from the source model, with `transformers.Trainer`.

It runs as it is on one process, and multi-process (DDP; gloo on CPU, NCCL on GPUs) under `accelerate launch` or
`torchrun`. Checkpoints land in OUTPUT_DIR/checkpoint-N (resume with --resume-from-checkpoint); the final model,
its tokenizer, the updated model card and a loss-curve picture land in OUTPUT_DIR itself.

Examples:

    python -m conversion.uptrain outputs/stories-mor outputs/stories-mor-uptrained \\
        --train-file ../shared/data/tinystories/train.txt --eval-file ../shared/data/tinystories/valid.txt \\
        --max-steps 600 --teacher ../shared/data/stories260K

    torchrun --nproc_per_node 2 -m conversion.uptrain outputs/stories-mor outputs/stories-mor-ddp \\
        --train-file ../shared/data/tinystories/train.txt --max-steps 100
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from .convert_llama_to_mor import resolve_source
from .measure import perplexity_and_depths, read_eval_tokens
from .model_card import load_card_figures, save_card


class TokenBlocks(Dataset):
    """A token stream cut into blocks of `block_size` tokens (packing: documents follow each other)."""

    def __init__(self, token_ids: torch.LongTensor, block_size: int):
        num_blocks = token_ids.numel() // block_size
        if num_blocks == 0:
            raise ValueError(f"The training text has {token_ids.numel()} tokens, fewer than one block of {block_size}.")
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

        dataset = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        if args.text_column not in dataset.column_names:
            raise ValueError(f"--text-column {args.text_column!r} is not a column of {args.dataset}: {dataset.column_names}")
        if args.max_train_documents:
            dataset = dataset.select(range(min(args.max_train_documents, len(dataset))))
        return list(dataset[args.text_column])
    texts = []
    for path in args.train_file:
        text = Path(path).read_text(encoding="utf-8")
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

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            for name, values in self._loss_terms.items():
                logs[name] = round(sum(values) / len(values), 4)
            self._loss_terms = {}
        super().log(logs, *args, **kwargs)


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
    parser.add_argument("model_dir", help="a converted MoR folder (or Hub id)")
    parser.add_argument("output_dir", help="checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to OUTPUT_DIR")
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", nargs="+", help="local text file(s); documents split on <|endoftext|> or blank lines")
    data.add_argument("--dataset", help="a Hub dataset id or a local dataset folder (instead of --train-file)")
    data.add_argument("--dataset-config")
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--max-train-documents", type=int)
    data.add_argument("--eval-file", help="text file for evaluation perplexity (during and after training)")
    data.add_argument("--eval-max-tokens", type=int, default=16384)
    data.add_argument("--block-size", type=int, default=256, help="training sequence length")
    method = parser.add_argument_group("MoR uptraining")
    method.add_argument("--teacher", help="the source model (folder, Hub id or .gguf file) to distill from")
    method.add_argument("--distill-weight", type=float, default=0.5)
    method.add_argument("--distill-temperature", type=float, default=1.0)
    method.add_argument("--capacity-warmup-steps", type=int, default=0)
    method.add_argument("--router-aux-loss-coef", type=float, help="override the model's BCE router-loss weight")
    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument("--max-steps", type=int, required=True)
    trainer.add_argument("--per-device-train-batch-size", type=int, default=16)
    trainer.add_argument("--gradient-accumulation-steps", type=int, default=1)
    trainer.add_argument("--learning-rate", type=float, default=1e-3)
    trainer.add_argument("--weight-decay", type=float, default=0.0)
    trainer.add_argument("--warmup-steps", type=int, default=20)
    trainer.add_argument("--lr-scheduler-type", default="cosine")
    trainer.add_argument("--logging-steps", type=int, default=10)
    trainer.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    trainer.add_argument("--save-steps", type=int, default=200)
    trainer.add_argument("--save-total-limit", type=int, default=2)
    trainer.add_argument("--resume-from-checkpoint", help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR")
    trainer.add_argument("--gradient-checkpointing", action="store_true")
    trainer.add_argument("--bf16", action="store_true")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--dataloader-num-workers", type=int, default=0)
    trainer.add_argument("--report-to", default="none")
    trainer.add_argument("--disable-tqdm", action="store_true", help="log lines instead of progress bars")
    parser.add_argument("--overwrite", action="store_true", help="allow an existing OUTPUT_DIR (without resuming)")
    return parser


def check_arguments(args) -> None:
    output_dir = Path(args.output_dir)
    if bool(args.train_file) == bool(args.dataset):
        raise ValueError("Give exactly one of --train-file or --dataset.")
    for path in [*(args.train_file or []), *([args.eval_file] if args.eval_file else [])]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist.")
    if output_dir.exists() and any(output_dir.iterdir()) and not (args.overwrite or args.resume_from_checkpoint):
        raise FileExistsError(
            f"{output_dir} already exists and is not empty; nothing was written. Pass --resume-from-checkpoint to "
            f"continue a run there, or --overwrite to train into it anyway."
        )


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        check_arguments(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32)
    if getattr(model.config, "model_type", None) != "mor":
        print(f"error: {args.model_dir} is a {model.config.model_type!r} model, not an MoR one. Convert it first with "
              f"`python -m conversion.convert_llama_to_mor`.", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    teacher = None
    if args.teacher:
        teacher_source, teacher_gguf = resolve_source(args.teacher)  # a folder, a Hub id or a .gguf file
        teacher = AutoModelForCausalLM.from_pretrained(teacher_source, gguf_file=teacher_gguf, dtype=torch.float32).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    train_dataset = TokenBlocks(tokenize_texts(tokenizer, load_training_texts(args)), args.block_size)
    eval_tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens) if args.eval_file else None
    eval_dataset = TokenBlocks(eval_tokens, args.block_size) if eval_tokens is not None else None

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if (eval_dataset is not None and args.eval_steps) else "no",
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
    callbacks = [CapacityWarmup(model, args.capacity_warmup_steps)] if args.capacity_warmup_steps else []
    trainer = UptrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        teacher=teacher.to(training_args.device) if teacher is not None else None,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
    )

    before = None
    if eval_tokens is not None and trainer.is_world_process_zero():
        before, _ = perplexity_and_depths(model, eval_tokens, args.block_size, desc="perplexity before")
        print(f"Perplexity before uptraining: {before:.2f}")

    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    train_seconds = time.perf_counter() - start

    trainer.save_model(args.output_dir)  # the final model, in OUTPUT_DIR itself (every process must call this)
    if not trainer.is_world_process_zero():
        return 0
    tokenizer.save_pretrained(args.output_dir)
    model = trainer.model
    figures = load_card_figures(args.model_dir)
    figures.setdefault("perplexity", {})
    after, depths = (None, None)
    if eval_tokens is not None:
        after, depths = perplexity_and_depths(model, eval_tokens, args.block_size, desc="perplexity after")
        figures.update(eval_file=Path(args.eval_file).name, eval_tokens=eval_tokens.numel(), eval_block_size=args.block_size)
        figures["perplexity"]["MoR after uptraining"] = after
        figures["depth_histogram"] = {str(d): c for d, c in sorted(depths.items()) if d > 0}
        figures["depth_model"] = "after uptraining"
    figures["uptraining"] = {
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        * training_args.world_size * args.block_size,
        "train_data": args.dataset or ", ".join(Path(p).name for p in args.train_file),
        "wall_time": f"{train_seconds / 60:.1f} min on {training_args.world_size} process(es)",
        "teacher": args.teacher,
    }
    figures["model_name"] = Path(args.output_dir).name
    if figures.get("base_model"):
        save_card(args.output_dir, figures)
    curve_saved = save_loss_curve(trainer.state.log_history, Path(args.output_dir) / "loss_curve.png")

    print(f"\nUptrained {trainer.state.global_step} steps in {train_seconds / 60:.1f} min; saved {args.output_dir}")
    if before is not None:
        print(f"  perplexity before {before:.2f} -> after {after:.2f} on {eval_tokens.numel()} tokens of {args.eval_file}")
        total = sum(depths.values()) - depths.get(0, 0)
        mean = sum(d * c for d, c in depths.items()) / max(1, total)
        print(f"  recursion depths: {dict(sorted((d, c) for d, c in depths.items() if d > 0))} (mean {mean:.2f})")
    if curve_saved:
        print(f"  loss curve: {Path(args.output_dir) / 'loss_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

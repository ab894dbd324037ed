"""Fine-tune a Mixture-of-Recursions (MoR) model with LoRA adapters (PEFT) and the transformers Trainer.

The shared layers of the recursion block run once per recursion step, so a LoRA adapter on a shared projection is one
adapter that serves every step: the adapter holds one LoRA module per unique layer and projection. Optionally the
routers are trained too (`--lora-routers`), which a converted checkpoint that was not uptrained needs: its routers
start constant (zero weights), so every token gets the same recursion depth whatever the token until they are trained.

The script prints a few greedy samples and the perplexity (and mean recursion depth) on an eval set before and after
training, logs the training loss through Trainer, and saves the adapter (and the tokenizer) to OUTPUT_DIR.

Example, from the repository root (`pip install -e '.[peft]'`): convert the tiny stories260K Llama shipped in
examples/assets into MoR form, then fine-tune it on TinyStories text or on the bundled instructions:

    mor-convert examples/assets/stories260K mor-stories260K \\
        --num-recursions 3 --sharing-strategy middle_cycle
    python examples/finetune_lora.py mor-stories260K lora-stories260K \\
        --train-file examples/assets/tinystories_train_sample.txt \\
        --eval-file examples/assets/tinystories_valid_sample.txt \\
        --format text --block-size 128 --max-eval-tokens 8192 --lora-routers --max-steps 150 --learning-rate 5e-3
    python examples/finetune_lora.py mor-stories260K lora-instructions --train-file examples/data/instructions.jsonl \\
        --format instructions --lora-routers --max-steps 150 --learning-rate 5e-3

Load the adapter afterwards with:

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained("mor-stories260K", trust_remote_code=True)
    model = PeftModel.from_pretrained(base, "lora-stories260K")  # or .merge_and_unload() for a plain MoR model

Data formats (--format):
    text          a plain text file; tokenized as one stream and cut into blocks of --block-size tokens.
    instructions  a JSON Lines file of {"instruction": ..., "response": ...}; the loss is on the response tokens.
Without --eval-file, the last 10% of the training blocks or examples (at least one) are held out for the perplexity.

MODEL and OUTPUT_DIR come first, as in the other command lines (the older `--model MODEL --output-dir OUTPUT_DIR`
still works). Bad input (a MODEL that is not an MoR checkpoint (convert a Llama first), an existing OUTPUT_DIR without
--overwrite, an OUTPUT_DIR that is, contains or lies inside the MODEL folder or a data file, a missing, non-UTF-8 or
too small data file, a malformed instruction line, an option value out of range) is refused with one `error:` line,
exit code 2, before the model is loaded and before anything is written. The output is written to a hidden staging
folder that becomes OUTPUT_DIR only once complete.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed


PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run from a source checkout without installing

# Importing the package registers the MoR classes with the Auto classes (no remote code needed).
from conversion.cli_checks import (  # noqa: E402
    POSITIVE,
    HelpFormatter,
    Range,
    check_extra_installed,
    check_option_values,
    choose_threads,
    load_tokenizer,
    one_line,
    read_mor_config,
    run_command_line,
)
from conversion.measure import context_length, eval_block_size  # noqa: E402
from conversion.output_dir import (  # noqa: E402
    OutputDirExistsError,
    check_output_dir,
    check_output_dir_is_separate,
    staged_output_dir,
)
from conversion.text_files import TextFileError, read_text_file  # noqa: E402
from modeling_mor.peft_mor import LLAMA_PROJECTIONS, check_lora_target_modules, router_linear_names  # noqa: E402


INSTRUCTION_TEMPLATE = "Instruction: {instruction}\nResponse:"
DEFAULT_TEXT_PROMPTS = [
    "Once upon a time, there was a little dog",
    "Lily and Ben went to the park",
    "The sun was hot, so",
]
DEFAULT_INSTRUCTION_PROMPTS = [
    "Write a story about a cat who likes the rain.",
    "Tell a story about a boy who finds a lost kitten.",
    "Write a story about a girl and a big tree.",
]
IGNORE_INDEX = -100


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="An MoR model folder (e.g. a converted Llama) or a Hub id.")
    parser.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="Where the adapter and tokenizer are saved (refused if it exists, unless --overwrite); it may not be, "
        "contain or lie inside MODEL or the data files.",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Load the model with the code saved in its checkpoint instead of the installed modeling_mor package.",
    )
    parser.add_argument("--train-file", required=True, help="Training data: a .txt file or an instruction .jsonl file.")
    parser.add_argument("--eval-file", default=None, help="Eval data in the same format (default: hold out 10%%).")
    parser.add_argument("--format", choices=["text", "instructions"], default="text", help="How to read the files.")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="Tokens per training block / longest example (default: 256, or the model's context, "
        "max_position_embeddings, when shorter; a longer value is refused).",
    )
    parser.add_argument("--max-eval-tokens", type=int, default=32768, help="At most this many eval tokens.")

    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha / r).")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="Dropout on the LoRA input.")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=list(LLAMA_PROJECTIONS),
        help="Module names that get LoRA adapters (each unique layer's module of that name).",
    )
    parser.add_argument(
        "--lora-routers",
        nargs="?",
        const="lora",
        choices=["lora", "full"],
        default=None,
        help="Also train the routers: 'lora' (the default when the flag is given alone) adds LoRA adapters to the "
        "router scorers, 'full' trains the router weights themselves (PEFT modules_to_save).",
    )

    parser.add_argument("--max-steps", type=int, default=150, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per step.")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Peak learning rate (linear decay).")
    parser.add_argument("--warmup-steps", type=int, default=10, help="Linear warmup steps.")
    parser.add_argument("--logging-steps", type=int, default=10, help="Log the training loss every N steps.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the LoRA init and the data order.")

    parser.add_argument("--prompts", nargs="*", default=None, help="Prompts (instructions) for the samples.")
    parser.add_argument("--sample-tokens", type=int, default=40, help="New tokens per greedy sample.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace OUTPUT_DIR if it is an earlier output of these tools (a folder holding anything "
                        "else is refused).")
    parser.add_argument("--save-merged", action="store_true", help="Also save the merged model to OUTPUT_DIR/merged.")
    return parser


def parse_arguments(argv=None):
    """The arguments, with MODEL and OUTPUT_DIR also accepted in their older spelling, `--model MODEL` and
    `--output-dir OUTPUT_DIR` (a note says so)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    older = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    older.add_argument("--model")
    older.add_argument("--output-dir")
    given, rest = older.parse_known_args(argv)
    if given.model is not None or given.output_dir is not None:
        print("note: --model and --output-dir are the older spelling of MODEL and OUTPUT_DIR, the first two "
              "arguments: python examples/finetune_lora.py MODEL OUTPUT_DIR --train-file ...")
        argv = [*filter(None, [given.model]), *rest, *filter(None, [given.output_dir])]
    return build_argument_parser().parse_args(argv)


# The values each option takes (--block-size is checked by `conversion.measure.eval_block_size`).
OPTION_VALUES = {
    "max_steps": 1, "batch_size": 1, "logging_steps": 1, "warmup_steps": 0, "lora_r": 1, "max_eval_tokens": 1,
    "sample_tokens": 0, "learning_rate": POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, high_open=True),
}


class DataFileError(TextFileError):
    """A data file that cannot be used, named with the problem and the fix."""


def text_blocks(path, tokenizer, block_size):
    """The file as one token stream, cut into full blocks of `block_size` tokens (labels = inputs)."""
    token_ids = tokenizer(read_text_file(path))["input_ids"]
    if len(token_ids) < block_size:
        raise DataFileError(
            f"{path} has {len(token_ids)} tokens, fewer than one block of --block-size {block_size}; pass a longer "
            f"file or a smaller --block-size."
        )
    examples = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        examples.append({"input_ids": block, "labels": list(block)})
    return examples


def instruction_examples(path, tokenizer, block_size):
    """Prompt + response + EOS per line; the prompt tokens are masked out of the labels."""
    examples = []
    for line_number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be one object "
                f'{{"instruction": "...", "response": "..."}}.'
            ) from error
        fields = ("instruction", "response")
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in fields):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataFileError(f"{where}: needs the text fields 'instruction' and 'response' (found: {found}).")
        prompt_ids = tokenizer(INSTRUCTION_TEMPLATE.format(instruction=record["instruction"]))["input_ids"]
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[:block_size]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:block_size]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def load_examples(path, data_format, tokenizer, block_size):
    if data_format == "text":
        return text_blocks(path, tokenizer, block_size)
    return instruction_examples(path, tokenizer, block_size)


def num_predicted_tokens(examples) -> int:
    """The tokens the loss and the perplexity score (each label after the first position of its example)."""
    return sum(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in examples)


def split_train_and_eval(args, train_examples, eval_examples):
    """Holds out the last 10% of the training examples when there is no eval file; DataFileError unless both sides
    have something to score (a too small file would otherwise divide by zero in the perplexity)."""
    unit = "blocks" if args.format == "text" else "examples"
    fix = "pass a longer file" + (" or a smaller --block-size" if args.format == "text" else "")
    if eval_examples is None:
        if len(train_examples) < 2:
            raise DataFileError(
                f"{args.train_file} gives {len(train_examples)} training {unit} of --block-size {args.block_size}; "
                f"without --eval-file one is held out for the perplexity, so it needs at least 2: {fix}, or pass "
                f"--eval-file."
            )
        num_held_out = max(1, len(train_examples) // 10)
        train_examples, eval_examples = train_examples[:-num_held_out], train_examples[-num_held_out:]
    eval_examples = eval_examples[: max(1, args.max_eval_tokens // args.block_size)]
    for option, path, examples in (("--train-file", args.train_file, train_examples),
                                   ("--eval-file", args.eval_file or args.train_file, eval_examples)):
        if num_predicted_tokens(examples) == 0:
            raise DataFileError(
                f"{path} ({option}) leaves no token to predict within --block-size {args.block_size} (every response "
                f"is cut off, or there are no {unit}): {fix}."
            )
    return train_examples, eval_examples


def make_collator(pad_token_id):
    """Pads a list of examples on the right to the longest one; padding is masked out of attention and loss."""

    def collate(examples):
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids, attention_mask, labels = [], [], []
        for example in examples:
            padding = longest - len(example["input_ids"])
            input_ids.append(example["input_ids"] + [pad_token_id] * padding)
            attention_mask.append([1] * len(example["input_ids"]) + [0] * padding)
            labels.append(example["labels"] + [IGNORE_INDEX] * padding)
        return {
            "input_ids": torch.tensor(input_ids),
            "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels),
        }

    return collate


@torch.no_grad()
def perplexity_and_depth(model, eval_examples, collate, batch_size):
    """Token-weighted perplexity of the labelled tokens (eval mode: causal routing), and the mean recursion depth of
    the real tokens."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_predicted, total_depth, total_tokens = 0.0, 0, 0, 0
    for start in range(0, len(eval_examples), batch_size):
        batch = {name: tensor.to(device) for name, tensor in collate(eval_examples[start : start + batch_size]).items()}
        outputs = model(**batch, output_recursion_depth=True)
        num_predicted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # lm_loss is the language-modelling loss alone (the loss adds the router losses during training).
        total_loss += outputs.lm_loss.item() * num_predicted
        total_predicted += num_predicted
        total_depth += int(outputs.recursion_depth.sum())
        total_tokens += int(batch["attention_mask"].sum())
    return math.exp(total_loss / total_predicted), total_depth / total_tokens


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts, max_new_tokens):
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        output_ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        samples.append(tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return samples


def routers_are_constant(model):
    """True for a converted checkpoint that was not uptrained: every router's output layer has zero weights, so each
    router gives every token the same score (its bias, if any)."""
    output_layers = []
    for router in model.routers():
        linear_layers = [module for module in router.modules() if isinstance(module, torch.nn.Linear)]
        output_layers.append(linear_layers[-1])
    return bool(output_layers) and all(not layer.weight.any() for layer in output_layers)


def print_samples(title, prompts, samples):
    print(f"\n=== {title} ===")
    for prompt, sample in zip(prompts, samples):
        print(f"[prompt] {prompt}\n[sample] {sample.strip()}\n")


def lora_targets(args, model):
    """(target_modules, modules_to_save) of the LoraConfig: --target-modules, and the routers' scorers with
    --lora-routers. ValueError when a name matches no module LoRA can wrap, listing the module names that exist."""
    target_modules = list(args.target_modules)
    modules_to_save = None
    if args.lora_routers == "lora":
        target_modules += router_linear_names(model)
    elif args.lora_routers == "full":
        modules_to_save = router_linear_names(model)
    check_lora_target_modules(model, target_modules)
    return target_modules, modules_to_save


def check_arguments(args):
    """Everything that can be wrong with the input, before the model is loaded and before any write: the option
    values, MODEL (an MoR checkpoint), OUTPUT_DIR and the data files. Resolves the default --block-size in `args`;
    returns the tokenizer, the training and eval examples and the inputs OUTPUT_DIR must stay clear of."""
    check_extra_installed("peft", "peft", "examples/finetune_lora.py")
    check_option_values(args, OPTION_VALUES)
    config = read_mor_config(args.model, "MODEL")
    with torch.device("meta"):  # the model's modules, without memory: a LoRA target that matches none is refused now
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        lora_targets(args, skeleton)
    except ValueError as error:
        raise ValueError(f"--target-modules {' '.join(args.target_modules)}: {one_line(error)}") from None
    args.block_size = eval_block_size(args.block_size, context_length(config), option="--block-size")
    inputs = {"MODEL": args.model, "--train-file": args.train_file, "--eval-file": args.eval_file}
    check_output_dir_is_separate(args.output_dir, **inputs)
    check_output_dir(Path(args.output_dir).expanduser(), args.overwrite)
    tokenizer = load_tokenizer(args.model, "MODEL", "fine-tuning reads the data with it and saves it with the adapter",
                               trust_remote_code=args.trust_remote_code)
    train_examples = load_examples(args.train_file, args.format, tokenizer, args.block_size)
    eval_examples = None
    if args.eval_file:
        eval_examples = load_examples(args.eval_file, args.format, tokenizer, args.block_size)
    train_examples, eval_examples = split_train_and_eval(args, train_examples, eval_examples)
    return tokenizer, train_examples, eval_examples, inputs


def main(argv=None):
    args = parse_arguments(argv)
    set_seed(args.seed)
    try:
        tokenizer, train_examples, eval_examples, inputs = check_arguments(args)
    except (ValueError, OSError) as error:  # OSError: OutputDirExistsError
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2)
    from peft import LoraConfig, get_peft_model  # checked above: the `peft` extra

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    config = model.config
    print(choose_threads(config))
    print(
        f"Loaded {type(model).__name__}: {config.num_hidden_layers} unrolled layers, {config.num_unique_layers} unique "
        f"({config.sharing_strategy}, num_recursions={config.num_recursions}, routing={config.routing})."
    )
    unit = "blocks" if args.format == "text" else "examples"
    print(f"{len(train_examples)} training and {len(eval_examples)} eval {unit}.")
    collate = make_collator(tokenizer.pad_token_id)

    prompts = args.prompts or (DEFAULT_TEXT_PROMPTS if args.format == "text" else DEFAULT_INSTRUCTION_PROMPTS)
    model_prompts = prompts
    if args.format == "instructions":
        model_prompts = [INSTRUCTION_TEMPLATE.format(instruction=prompt) for prompt in prompts]

    perplexity_before, depth_before = perplexity_and_depth(model, eval_examples, collate, args.batch_size)
    samples_before = greedy_samples(model, tokenizer, model_prompts, args.sample_tokens)
    print(f"Before fine-tuning: eval perplexity {perplexity_before:.3f}, mean recursion depth {depth_before:.3f}")
    print_samples("Samples before fine-tuning", prompts, samples_before)

    if args.lora_routers is None and routers_are_constant(model):
        print(
            "Note: the routers of this checkpoint are constant (converted, not uptrained): every token gets the same "
            "recursion depth, and training the shared layers alone cannot change that. Pass --lora-routers to train "
            "the routers as well."
        )
    target_modules, modules_to_save = lora_targets(args, model)
    lora_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    num_lora_modules = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    print(f"{num_lora_modules} LoRA modules (one per unique layer and target; shared layers serve every recursion).")
    model.print_trainable_parameters()

    # Everything is written to a hidden staging folder that becomes OUTPUT_DIR once complete: a run that fails or is
    # interrupted leaves nothing, and --overwrite replaces an existing OUTPUT_DIR (an earlier output) only then.
    output_dir = Path(args.output_dir).expanduser()
    try:
        with staged_output_dir(output_dir, overwrite=args.overwrite, inputs=inputs) as staging:
            training_arguments = TrainingArguments(
                output_dir=str(staging),
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                warmup_steps=args.warmup_steps,
                lr_scheduler_type="linear",
                logging_steps=args.logging_steps,
                seed=args.seed,
                save_strategy="no",
                report_to="none",
                remove_unused_columns=False,
                disable_tqdm=True,  # one printed line per logging step instead of a progress bar
                dataloader_pin_memory=torch.cuda.is_available(),
            )
            trainer = Trainer(model=model, args=training_arguments, train_dataset=train_examples, data_collator=collate)
            trainer.train()

            perplexity_after, depth_after = perplexity_and_depth(model, eval_examples, collate, args.batch_size)
            samples_after = greedy_samples(model, tokenizer, model_prompts, args.sample_tokens)
            print_samples("Samples after fine-tuning", prompts, samples_after)
            print(f"Eval perplexity:      before {perplexity_before:.3f}   after {perplexity_after:.3f}")
            print(f"Mean recursion depth: before {depth_before:.3f}   after {depth_after:.3f}")

            # Trainer sets config.use_cache to TrainingArguments.use_cache (False) for training; what is saved decodes
            # with the KV cache.
            model.get_base_model().config.use_cache = True
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if args.save_merged:
                merged = model.merge_and_unload()
                merged.save_pretrained(staging / "merged")
                tokenizer.save_pretrained(staging / "merged")
    except OutputDirExistsError as error:  # OUTPUT_DIR gained other files during the run: it is kept as it is
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2)
    print(f"Saved the adapter to {output_dir}")
    if args.save_merged:
        print(f"Saved the merged model to {output_dir / 'merged'}")
    return {
        "perplexity_before": perplexity_before,
        "perplexity_after": perplexity_after,
        "depth_before": depth_before,
        "depth_after": depth_after,
        "samples_before": samples_before,
        "samples_after": samples_after,
    }


def command_line() -> int:
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command_line(command_line))

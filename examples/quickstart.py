"""Quickstart: a real pretrained Llama becomes a Mixture-of-Recursions model, learns to route, and writes a story.

Runs offline in a few CPU minutes with what ships in examples/assets (the stories260K Llama and TinyStories text):

1. convert the Llama (5 layers) into MoR: middle_cycle, 3 recursions of one shared layer, expert-choice routing;
2. uptrain it briefly (LM loss + router losses + distillation from the original, with a progress bar);
3. print the perplexity of the original, of the converted model and of the uptrained one;
4. generate a story, print each token's recursion depth and save a picture of them.

It uses one CPU thread unless OMP_NUM_THREADS says otherwise, as every command line does for a model this small:
thread start-up costs more than the matrix products it parallelizes (docs/benchmarks.md#cpu-threads).
The folder it saves is a complete MoR model: weights, config (with the KV cache on), model code, tokenizer and a model
card (README.md) with the figures of this run.

Example:

    python examples/quickstart.py                  # defaults: 300 training steps, outputs/quickstart
    python examples/quickstart.py --steps 50 --output-dir /tmp/mor-quickstart
    python examples/quickstart.py --overwrite      # again, replacing the earlier run's outputs/quickstart
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path


# What the main job needs beyond transformers and torch: Trainer needs accelerate, the progress bars tqdm and the
# picture matplotlib. All are install requirements of the package; a partial environment is told what to install.
REQUIRED_PACKAGES = ("accelerate", "tqdm", "matplotlib")
_missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
if _missing:
    print(f"error: the quickstart needs {', '.join(_missing)}, which this Python environment lacks. Install the "
          f"project with its requirements (`pip install -e .` from the repository root) or `pip install "
          f"{' '.join(_missing)}`.", file=sys.stderr)
    raise SystemExit(2)

import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, TrainingArguments  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "examples" / "assets"
DEFAULT_MODEL = ASSETS / "stories260K"
sys.path.insert(0, str(REPO_ROOT))  # run from a source checkout without installing

from conversion import cli_checks, convert_llama_to_mor  # noqa: E402
from conversion.convert_llama_to_mor import source_license  # noqa: E402
from conversion.measure import depth_histogram, full_depth, mean_depth, perplexity_and_depths, read_eval_tokens  # noqa: E402
from conversion.model_card import save_card  # noqa: E402
from conversion.output_dir import (  # noqa: E402
    OutputDirExistsError,
    check_output_dir,
    check_output_dir_is_separate,
    staged_output_dir,
)
from conversion.training.data import TokenBlocks, tokenize_texts  # noqa: E402
from conversion.training.trainer import UptrainTrainer  # noqa: E402
from show_recursion_depth import (  # noqa: E402
    describe_generated_depth,
    format_depths,
    generate_with_depths,
    plot_token_depths,
)


def display_path(path) -> str:
    """A path inside the repository relative to its root (the same on every machine), any other as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def base_model_name(model: str) -> str | None:
    """The Hub id of the source, for the card's `base_model`: the shipped checkpoint is llama2.c's stories260K,
    published in karpathy/tinyllamas; another local folder has none (the card then leaves the field out and says
    why); a Hub id is its own."""
    if Path(model).resolve() == DEFAULT_MODEL.resolve():
        return "karpathy/tinyllamas"
    return None if Path(model).exists() else model


def source_name(model: str) -> str:
    return base_model_name(model) or Path(model).name


def model_card_figures(args, llama, mor, model_dir, num_eval_tokens, perplexity, depths, steps, train_seconds):
    """The figures `conversion.model_card` renders into the saved folder's README.md (the same fields as the
    converter's and uptraining's cards)."""
    return {
        "model_name": f"{Path(args.model).name}-mor (quickstart)",
        "base_model": base_model_name(args.model),
        "source_name": source_name(args.model),
        **source_license(args.model),  # as the converter reads it (the shipped model's card says MIT)
        "provenance_note": f"Converted and uptrained with `python examples/quickstart.py` from "
                           f"`{display_path(args.model)}`.",
        "repo_id": f"path/to/{model_dir.name}",  # as the converter's card: where the folder will be loaded from
        "source_layers": llama.config.num_hidden_layers,
        "num_hidden_layers": mor.config.num_hidden_layers,
        "unique_layers": mor.config.num_unique_layers,
        "block_size": mor.config.block_size,
        "num_recursions": mor.config.num_recursions,
        "source_parameters": f"{llama.num_parameters():,}",
        "mor_parameters": f"{mor.num_parameters():,}",
        "sharing_strategy": mor.config.sharing_strategy,
        "init_strategy": "stepwise",
        "routing": mor.config.routing,
        "capacity": ", ".join(f"{c:.2f}" for c in mor.config.capacity),
        "gating": mor.config.gating,
        "kv_cache_policy": mor.config.kv_cache_policy,
        "relaxation": f"rank {mor.config.relaxation_rank}" if mor.config.relaxation_rank else "none",
        "eval_file": Path(args.eval_file).name,
        "eval_tokens": num_eval_tokens,
        "eval_block_size": args.block_size,
        "perplexity": perplexity,
        "depth_histogram": depth_histogram(depths),
        "depth_model": "after uptraining",
        "uptraining": {
            "steps": steps,
            "tokens": steps * args.batch_size * args.block_size,
            "train_data": Path(args.train_file).name,
            "wall_time": f"{train_seconds / 60:.1f} min on 1 process(es)",
            "teacher": source_name(args.model),
        },
    }


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli_checks.HelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a Llama folder (default: the shipped stories260K)")
    parser.add_argument("--train-file", default=str(ASSETS / "tinystories_train_sample.txt"),
                        help="uptraining text, stories separated by <|endoftext|> (default: the shipped TinyStories "
                             "sample)")
    parser.add_argument("--eval-file", default=str(ASSETS / "tinystories_valid_sample.txt"),
                        help="text of the perplexities and the mean depth (default: the shipped TinyStories "
                             "validation sample)")
    parser.add_argument("--output-dir", default="outputs/quickstart",
                        help="where the model folder and the picture are saved (refused if it exists, unless "
                             "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output-dir if it is an earlier output of these tools (a folder holding "
                             "anything else is refused), once this run is complete")
    parser.add_argument("--num-recursions", type=int, default=3, help="N_r, how often the shared layer is applied")
    parser.add_argument("--steps", type=int, default=300, help="uptraining steps")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks of --block-size tokens per step")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training and perplexity block")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="perplexity on the first N tokens of --eval-file")
    parser.add_argument("--prompt", default="Once upon a time", help="the start of the story")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training")
    return parser


def main(argv=None):
    args = build_argument_parser().parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    inputs = {"--model": args.model, "--train-file": args.train_file, "--eval-file": args.eval_file}
    try:  # an earlier run's folder is replaced only with --overwrite, and only once this run is complete
        check_output_dir_is_separate(output_dir, **inputs)
        check_output_dir(output_dir, args.overwrite)
    except OutputDirExistsError as error:
        print(f"error: {cli_checks.one_line(error)}", file=sys.stderr)
        raise SystemExit(2)
    with staged_output_dir(output_dir, overwrite=args.overwrite, inputs=inputs) as staging:
        results = run(args, staging, output_dir)
    print(f"\nSaved the picture to {output_dir / 'recursion_depths.png'} and the model, with its model card, to "
          f"{output_dir / 'model'} (load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)); "
          f"total time {time.perf_counter() - start:.0f}s")
    return results


def run(args, staging: Path, output_dir: Path) -> dict:
    """Converts, uptrains, measures and writes into `staging`, which becomes `output_dir` once this returns."""
    torch.manual_seed(args.seed)
    print(cli_checks.choose_threads(AutoConfig.from_pretrained(args.model)))

    print(f"1. Converting {display_path(args.model)} to MoR (middle_cycle, {args.num_recursions} recursions, "
          f"expert-choice)")
    llama = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    mor = convert_llama_to_mor(llama, num_recursions=args.num_recursions, sharing_strategy="middle_cycle")
    print(f"   {llama.num_parameters():,} parameters, {llama.config.num_hidden_layers} layers -> "
          f"{mor.num_parameters():,} parameters, {mor.config.num_unique_layers} unique layers")

    eval_tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_tokens)
    llama_ppl, _ = perplexity_and_depths(llama, eval_tokens, args.block_size, desc="perplexity")
    with full_depth(mor):
        tied_ppl, _ = perplexity_and_depths(mor, eval_tokens, args.block_size, desc="perplexity")
    print(f"   perplexity: original Llama {llama_ppl:.2f}, converted MoR (untrained routers) {tied_ppl:.2f}")

    print(f"2. Uptraining {args.steps} steps on {Path(args.train_file).name}")
    text = Path(args.train_file).read_text(encoding="utf-8")
    train_dataset = TokenBlocks(tokenize_texts(tokenizer, text.split("<|endoftext|>")), args.block_size)
    training_args = TrainingArguments(
        output_dir=str(staging / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3,
        warmup_steps=min(20, args.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = UptrainTrainer(model=mor, args=training_args, train_dataset=train_dataset, teacher=llama)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    checkpoints = Path(training_args.output_dir)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):  # Trainer creates it even when it saves nothing
        checkpoints.rmdir()
    mor.eval()
    # Trainer sets config.use_cache to TrainingArguments.use_cache (False) for training; the saved model, and the
    # story below, decode with the KV cache.
    mor.config.use_cache = True

    uptrained_ppl, depths = perplexity_and_depths(mor, eval_tokens, args.block_size, desc="perplexity")
    eval_mean_depth = mean_depth(depths)
    print(f"3. Perplexity on {eval_tokens.numel():,} tokens of {Path(args.eval_file).name}:")
    print(f"   original Llama {llama_ppl:.2f} | converted MoR {tied_ppl:.2f} | uptrained MoR {uptrained_ppl:.2f} "
          f"(mean recursion depth on this evaluation text {eval_mean_depth:.2f} of {args.num_recursions})")

    print("4. A story, with each token's recursion depth in brackets:")
    tokens, token_depths, prompt_length = generate_with_depths(mor, tokenizer, args.prompt, max_new_tokens=80)
    print(format_depths(tokens, token_depths))
    print(f"   {describe_generated_depth(token_depths, prompt_length, args.num_recursions)}")
    plot_token_depths(tokens, token_depths, args.num_recursions, staging / "recursion_depths.png", prompt_length)
    model_dir = output_dir / "model"
    mor.save_pretrained(staging / model_dir.name)
    tokenizer.save_pretrained(staging / model_dir.name)
    save_card(staging / model_dir.name, model_card_figures(
        args, llama, mor, model_dir, eval_tokens.numel(), {
            f"source ({source_name(args.model)})": llama_ppl,
            "recursive (tied) model, every token at full depth": tied_ppl,
            "MoR after uptraining": uptrained_ppl,
        }, depths, steps=trainer.state.global_step, train_seconds=train_seconds,
    ))
    return {"llama": llama_ppl, "converted": tied_ppl, "uptrained": uptrained_ppl, "mean_depth": eval_mean_depth}


if __name__ == "__main__":
    # Ctrl-C (or SIGTERM) removes the unfinished output folder and ends with one error line.
    raise SystemExit(cli_checks.run_command_line(lambda: main() and 0))

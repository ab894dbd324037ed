"""Quickstart: a real pretrained Llama becomes a Mixture-of-Recursions model, learns to route, and writes a story.

Runs offline in a few CPU minutes with what ships in examples/assets (the stories260K Llama and TinyStories text):

1. convert the Llama (5 layers) into MoR: middle_cycle, 3 recursions of one shared layer, expert-choice routing;
2. uptrain it briefly (LM loss + router losses + distillation from the original, with a progress bar);
3. print the perplexity of the original, of the converted model and of the uptrained one;
4. generate a story, print each token's recursion depth and save a picture of them.

Example:

    python examples/quickstart.py                  # defaults: 300 training steps, outputs/quickstart
    python examples/quickstart.py --steps 50 --output-dir /tmp/mor-quickstart
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TrainingArguments


ASSETS = Path(__file__).resolve().parent / "assets"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from conversion import convert_llama_to_mor  # noqa: E402
from conversion.measure import full_depth, perplexity_and_depths, read_eval_tokens  # noqa: E402
from conversion.uptrain import TokenBlocks, UptrainTrainer, tokenize_texts  # noqa: E402
from show_recursion_depth import format_depths, generate_with_depths, plot_token_depths  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "stories260K"), help="a Llama folder (default: the shipped stories260K)")
    parser.add_argument("--train-file", default=str(ASSETS / "tinystories_train_sample.txt"))
    parser.add_argument("--eval-file", default=str(ASSETS / "tinystories_valid_sample.txt"))
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--num-recursions", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="uptraining steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)

    print(f"1. Converting {args.model} to MoR (middle_cycle, {args.num_recursions} recursions, expert-choice)")
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
        output_dir=str(output_dir / "checkpoints"),
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
    trainer.train()
    mor.eval()

    uptrained_ppl, depths = perplexity_and_depths(mor, eval_tokens, args.block_size, desc="perplexity")
    mean_depth = sum(d * c for d, c in depths.items()) / sum(depths.values())
    print(f"3. Perplexity on {eval_tokens.numel():,} tokens of {Path(args.eval_file).name}:")
    print(f"   original Llama {llama_ppl:.2f} | converted MoR {tied_ppl:.2f} | uptrained MoR {uptrained_ppl:.2f} "
          f"(mean recursion depth {mean_depth:.2f} of {args.num_recursions})")

    print(f"4. A story, with each token's recursion depth in brackets:")
    tokens, token_depths, prompt_length = generate_with_depths(mor, tokenizer, args.prompt, max_new_tokens=80)
    print(format_depths(tokens, token_depths))
    output_dir.mkdir(parents=True, exist_ok=True)
    picture = output_dir / "recursion_depths.png"
    plot_token_depths(tokens, token_depths, args.num_recursions, picture, prompt_length)
    mor.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    print(f"\nSaved the picture to {picture} and the model to {output_dir / 'model'} "
          f"(load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)); "
          f"total time {time.perf_counter() - start:.0f}s")
    return {"llama": llama_ppl, "converted": tied_ppl, "uptrained": uptrained_ppl, "mean_depth": mean_depth}


if __name__ == "__main__":
    main()

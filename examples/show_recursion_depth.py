"""Generate a continuation with an MoR model and show how many recursion steps every token took.

Prints the text with each token's depth and the mean depth of the generated tokens, and saves a picture (by default
outputs/recursion_depths.png): one coloured box per token, darker = deeper.

Example:

    python examples/show_recursion_depth.py outputs/stories-mor-uptrained --prompt "Once upon a time" \\
        --max-new-tokens 60 --output outputs/depths.png
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run from a source checkout without installing

from conversion.cli_checks import (  # noqa: E402
    HelpFormatter,
    check_option_values,
    check_output_file,
    choose_threads,
    load_tokenizer,
    one_line,
    read_mor_config,
)


def generate_with_depths(model, tokenizer, prompt: str, max_new_tokens: int = 60, do_sample: bool = False, seed: int = 0):
    """Returns (token strings, their recursion depths, number of prompt tokens) for prompt + continuation."""
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    outputs = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        return_dict_in_generate=True,
        output_recursion_depth=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    token_ids = outputs.sequences[0].tolist()
    return token_strings(tokenizer, token_ids), outputs.recursion_depth[0].tolist(), inputs["input_ids"].shape[1]


def token_strings(tokenizer, token_ids) -> list[str]:
    """The text each token adds (decoding prefixes keeps the spaces that decoding tokens one by one drops)."""
    pieces, previous = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end])
        pieces.append(text[len(previous):])
        previous = text
    return pieces


def format_depths(tokens, depths) -> str:
    """`token[depth]` for every token, on lines of about 100 characters."""
    lines, line = [], ""
    for token, depth in zip(tokens, depths):
        piece = f"{token.replace(chr(10), ' ')}[{depth}]"
        if len(line) + len(piece) > 100:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join([*lines, line])


def describe_generated_depth(depths, prompt_length: int, num_recursions: int) -> str:
    """The mean depth of the generated tokens (the prompt's are left out), labelled as such wherever it is shown."""
    generated = depths[prompt_length:]
    return (f"mean depth of the {len(generated)} generated tokens: {sum(generated) / max(1, len(generated)):.2f} of "
            f"{num_recursions}")


def plot_token_depths(tokens, depths, num_recursions: int, path, prompt_length: int = 0, title: str | None = None):
    """Saves a picture of the tokens as boxes coloured by recursion depth (prompt tokens outlined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colours = plt.get_cmap("Blues")
    per_line, x, y = 110, 0.0, 0.0
    boxes = []
    for index, (token, depth) in enumerate(zip(tokens, depths)):
        text = token.replace("\n", "\\n") or " "
        width = max(1.0, len(text)) + 0.6
        if x + width > per_line:
            x, y = 0.0, y - 1.6
        boxes.append((x, y, width, text, depth, index < prompt_length))
        x += width + 0.2
    height = -y + 2.5
    figure, axis = plt.subplots(figsize=(14, 0.45 * height + 1.2))
    for x, y, width, text, depth, is_prompt in boxes:
        shade = colours(0.15 + 0.8 * depth / max(1, num_recursions))
        axis.add_patch(Rectangle((x, y), width, 1.2, facecolor=shade, edgecolor="black" if is_prompt else "none",
                                 linewidth=0.8))
        axis.text(x + width / 2, y + 0.6, text, ha="center", va="center", fontsize=8,
                  color="white" if depth / max(1, num_recursions) > 0.6 else "black")
    axis.set_xlim(0, per_line)
    axis.set_ylim(y - 0.5, 1.7)
    axis.axis("off")
    legend = [Rectangle((0, 0), 1, 1, facecolor=colours(0.15 + 0.8 * d / max(1, num_recursions)))
              for d in range(1, num_recursions + 1)]
    axis.legend(legend, [f"depth {d}" for d in range(1, num_recursions + 1)], loc="upper right", ncol=num_recursions,
                fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.25))
    generated = describe_generated_depth(depths, prompt_length, num_recursions)
    default_title = f"Recursion depth per token of this text ({generated}; prompt outlined)"
    axis.set_title(title or default_title, fontsize=10, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


# outputs/ is where the examples write (the repository ignores it), not the working directory.
DEFAULT_PICTURE = Path("outputs") / "recursion_depths.png"
# The formats matplotlib writes without other packages: the picture's format follows its name.
PICTURE_SUFFIXES = (".png", ".pdf", ".svg")


def build_argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="an MoR model folder or Hub id")
    parser.add_argument("--prompt", default="Once upon a time", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="how many tokens to generate")
    parser.add_argument("--do-sample", action="store_true", help="sample the continuation instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --do-sample)")
    parser.add_argument("--output", default=str(DEFAULT_PICTURE),
                        help=f"where to save the picture (a {', '.join(PICTURE_SUFFIXES)} file; its folder is created)")
    return parser


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)

    try:
        check_option_values(args, {"max_new_tokens": 1})
        check_output_file(args.output, "--output", PICTURE_SUFFIXES, creates_folder=True)
        # config.json, its values and the weights' headers: a mistyped folder, a truncated or invalid config.json or
        # one that does not fit the weights is refused here, before loading.
        config = read_mor_config(args.model, "MODEL")
        tokenizer = load_tokenizer(args.model, "MODEL", "it reads the prompt and writes the continuation with it")
        if not tokenizer(args.prompt)["input_ids"]:
            raise ValueError("--prompt is empty and the tokenizer adds no BOS token: there is nothing to continue. "
                             "Fix: give a prompt.")
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(choose_threads(config))
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    tokens, depths, prompt_length = generate_with_depths(
        model, tokenizer, args.prompt, args.max_new_tokens, args.do_sample, args.seed
    )
    print(format_depths(tokens, depths))
    print(f"\n{describe_generated_depth(depths, prompt_length, model.config.num_recursions)}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    plot_token_depths(tokens, depths, model.config.num_recursions, args.output, prompt_length)
    print(f"picture saved to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

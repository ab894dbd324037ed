"""Renders the project's MODEL_CARD.md template with the real figures of a conversion or uptraining run.

The figures are kept next to the weights in `mor_card.json`, so that uptraining can update them and render again.
"""

import json
import string
from pathlib import Path


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"
CARD_FIGURES_FILE = "mor_card.json"


class UnfilledPlaceholderError(ValueError):
    pass


def render_model_card(figures: dict) -> str:
    """Fills every `${name}` of the template; a placeholder without a value is an error, never left in the card."""
    template = string.Template(TEMPLATE_PATH.read_text(encoding="utf-8"))
    fields = {name: _section_text(name, figures) for name in template.get_identifiers()}
    missing = sorted(name for name, value in fields.items() if value is None)
    if missing:
        raise UnfilledPlaceholderError(f"The model card template needs values for: {', '.join(missing)}.")
    return template.substitute(fields)


def _section_text(name: str, figures: dict):
    if name == "evaluation_section":
        return evaluation_section(figures)
    if name == "depth_section":
        return depth_section(figures)
    if name == "training_status":
        return training_status(figures)
    value = figures.get(name)
    return None if value is None else str(value)


def training_status(figures: dict) -> str:
    uptraining = figures.get("uptraining")
    if not uptraining:
        return (
            "**Freshly converted, not uptrained.** The shared layers come from the source's pretrained layers; the "
            "routers start at zero (untrained), so routing decisions are not yet meaningful. Uptrain it "
            "(`python -m conversion.uptrain`) before use."
        )
    return (
        f"**Uptrained** for {uptraining['steps']} steps ({uptraining['tokens']:,} tokens of `{uptraining['train_data']}`) "
        f"in {uptraining['wall_time']}, with the LM loss plus the router losses"
        f"{' and distillation from ' + repr(uptraining['teacher']) if uptraining.get('teacher') else ''}."
    )


def evaluation_section(figures: dict) -> str:
    rows = figures.get("perplexity")
    if not rows:
        return "Not measured (the conversion ran without an evaluation text)."
    lines = [
        f"Perplexity on the first {figures['eval_tokens']:,} tokens of `{figures['eval_file']}` "
        f"(non-overlapping blocks of {figures['eval_block_size']} tokens):",
        "",
        "| model | perplexity |",
        "|---|---|",
    ]
    lines += [f"| {label} | {value:.2f} |" for label, value in rows.items()]
    return "\n".join(lines)


def depth_section(figures: dict) -> str:
    histogram = figures.get("depth_histogram")
    if not histogram:
        return "Not measured (the conversion ran without an evaluation text)."
    total = sum(histogram.values())
    mean = sum(int(depth) * count for depth, count in histogram.items()) / total
    lines = [
        f"Recursion steps taken per token on the evaluation text ({figures.get('depth_model', 'this model')}); "
        f"mean depth {mean:.2f} of {figures['num_recursions']}:",
        "",
        "| depth | tokens | share |",
        "|---|---|---|",
    ]
    for depth in sorted(histogram, key=int):
        share = histogram[depth] / total
        lines.append(f"| {depth} | {histogram[depth]:,} | {share:.1%} {'#' * round(share * 40)} |")
    return "\n".join(lines)


def save_card(folder, figures: dict) -> None:
    folder = Path(folder)
    (folder / CARD_FIGURES_FILE).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(render_model_card(figures), encoding="utf-8")


def load_card_figures(folder) -> dict:
    path = Path(folder) / CARD_FIGURES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

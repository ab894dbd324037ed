"""Renders the model card template (MODEL_CARD.md, next to this file) with the real figures of a conversion or
uptraining run.

The figures are kept next to the weights in `mor_card.json`, so that uptraining can update them and render again.
Every figure on the card says how it was measured: a perplexity row is either a number, measured as the card's
`eval_file`, `eval_tokens` and `eval_block_size` say (what a conversion writes), or a dict with its own
measurement, `{"perplexity": ..., "file": ..., "tokens": ..., "block_size": ...}` (what uptraining adds). The stored
token counts are those read from the file; the card gives those scored (`describe_measurement`).
"""

import json
import string
from pathlib import Path


# Package data (setup.py), so that an installed package renders cards too.
TEMPLATE_PATH = Path(__file__).with_name("MODEL_CARD.md")
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
    if name in ("base_model_front_matter", "source_description", "base_model_note"):
        return base_model_fields(figures)[name]
    if name == "init_note":  # which source layers a searched init chose; cards of other inits have none
        return figures.get("init_note", "")
    value = figures.get(name)
    return None if value is None else str(value)


def base_model_fields(figures: dict) -> dict[str, str]:
    """The card's `base_model` metadata names a Hub model. A source without a Hub id (a local folder: the converter
    stores `base_model: None`) gets no such field, and the card says why instead of showing a local path as one."""
    base_model = figures.get("base_model")
    if base_model:
        return {
            "base_model_front_matter": f"base_model: {base_model}",
            "source_description": f"`{base_model}`",
            "base_model_note": "",
        }
    source_name = figures.get("source_name")
    return {
        "base_model_front_matter": "# base_model is left out: the source was a local folder, not a Hub model.",
        "source_description": f"a checkpoint in a local folder{f' (`{source_name}`)' if source_name else ''}",
        "base_model_note": (
            "\nThe metadata names no `base_model`: the source was a local folder, not a Hub model, so there is no "
            "Hub id to link to."
        ),
    }


def training_status(figures: dict) -> str:
    uptraining = figures.get("uptraining")
    if not uptraining:
        return (
            "**Freshly converted, not uptrained.** The shared layers come from the source's pretrained layers; the "
            "routers start at zero (untrained), so routing decisions are not yet meaningful. Uptrain it "
            "(`mor-uptrain`, a command of the mor-transformers package) before use."
        )
    return (
        f"**Uptrained** for {uptraining['steps']} steps ({uptraining['tokens']:,} tokens of `{uptraining['train_data']}`) "
        f"in {uptraining['wall_time']}, with the LM loss plus the router losses"
        f"{' and distillation from ' + repr(uptraining['teacher']) if uptraining.get('teacher') else ''}."
        f"{router_fit_note(uptraining.get('router_fit'))}"
        f"{calibration_note(uptraining.get('router_calibration'))}"
    )


def router_fit_note(router_fit: dict | None) -> str:
    """The sentence on `--router-fit-tokens`, or nothing."""
    if not router_fit:
        return ""
    tokens = next(fit["tokens"] for step, fit in router_fit.items() if step.isdigit())
    when = (f"at step {router_fit['at_step']}, and chose who takes each recursion step in the rest of the training"
            if "at_step" in router_fit else "after training")
    return (f" Its deciding routers were fitted to let the tokens leave that lose least by stopping (the KL divergence "
            f"to the full-depth prediction, measured on {tokens:,} training tokens) {when}.")


def calibration_note(calibration: dict | None) -> str:
    """The sentence on a router threshold chosen by `--layer-budget`, or nothing."""
    if not calibration:
        return ""
    return (f" Its router threshold, {calibration['router_threshold']:.4f}, was chosen so that the training text takes "
            f"{calibration['layer_fraction']:.3f} of the source's layer applications per token (`--layer-budget "
            f"{calibration['layer_budget']}`); `config.router_threshold` trades quality for compute.")


def conversion_measurement(figures: dict) -> dict:
    """How the figures stored without their own measurement were measured: the card's `eval_*` fields."""
    return {"file": figures.get("eval_file"), "tokens": figures.get("eval_tokens"),
            "block_size": figures.get("eval_block_size")}


def perplexity_rows(figures: dict) -> dict[str, dict]:
    """Every perplexity row as `{"perplexity", "file", "tokens", "block_size"}`, whichever way it was stored."""
    rows = {}
    for label, row in (figures.get("perplexity") or {}).items():
        rows[label] = {**conversion_measurement(figures), "perplexity": row} if isinstance(row, (int, float)) else row
    return rows


def describe_measurement(measurement: dict) -> str:
    """How a figure was measured, with the tokens actually scored: `tokens` is what was read from the file, and the
    tokens after the last full block are not scored (2,000 tokens in blocks of 256 score 1,792)."""
    from .measure import scored_tokens

    if any(measurement.get(key) is None for key in ("file", "tokens", "block_size")):
        return "not recorded"
    tokens, block_size = measurement["tokens"], measurement["block_size"]
    if tokens < block_size:  # what `perplexity_and_depths` does with less than one block; the command lines refuse it
        return f"all {tokens:,} tokens of `{measurement['file']}`, as one block (shorter than {block_size} tokens)"
    return f"first {scored_tokens(tokens, block_size):,} tokens of `{measurement['file']}`, blocks of {block_size} tokens"


def evaluation_section(figures: dict) -> str:
    rows = perplexity_rows(figures)
    if not rows:
        return "Not measured (the conversion ran without an evaluation text)."
    lines = [
        "Perplexity over non-overlapping blocks of an evaluation text, each block predicted from its own start. The "
        "last column says how each figure was measured; figures measured on different tokens or block sizes are not "
        "comparable.",
        "",
        "| model | perplexity | measured on |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {row['perplexity']:.2f} | {describe_measurement(row)} |" for label, row in rows.items()]
    return "\n".join(lines)


def depth_section(figures: dict) -> str:
    histogram = figures.get("depth_histogram")
    if not histogram:
        return "Not measured (the conversion ran without an evaluation text)."
    total = sum(histogram.values())
    mean = sum(int(depth) * count for depth, count in histogram.items()) / total
    measurement = figures.get("depth_measurement") or conversion_measurement(figures)
    lines = [
        f"Recursion steps taken per token on the evaluation text ({figures.get('depth_model', 'this model')}; "
        f"{describe_measurement(measurement)}); mean depth {mean:.2f} of {figures['num_recursions']}:",
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

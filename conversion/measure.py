"""The figures a conversion or an uptraining run reports: perplexity on a text file and the recursion-depth
histogram."""

import contextlib
import math
from collections import Counter

import torch
from tqdm.auto import tqdm

from .flops import layer_applications
from .text_files import read_text_file


DEFAULT_BLOCK_SIZE = 256


def context_length(config) -> int | None:
    """The longest sequence the model was trained on (`max_position_embeddings`), or None when its config has none."""
    return getattr(config, "max_position_embeddings", None)


def eval_block_size(requested: int | None, context: int | None, option: str = "--eval-block-size") -> int:
    """The perplexity block: `requested`, or by default 256 tokens capped at the model's context.

    Blocks longer than the context would measure the model on positions it never saw, so an explicit value larger
    than the context is refused (ValueError naming `option`) rather than silently shortened.
    """
    if requested is None:
        return min(DEFAULT_BLOCK_SIZE, context) if context else DEFAULT_BLOCK_SIZE
    if requested < 2:
        raise ValueError(f"{option} {requested} is not valid: a block needs at least 2 tokens (one to predict from). "
                         f"Pass a larger value, or leave it out for min({DEFAULT_BLOCK_SIZE}, the model's context).")
    if context and requested > context:
        raise ValueError(
            f"{option} {requested} is longer than the model's context (max_position_embeddings {context}), so the "
            f"perplexity would be measured on positions it was never trained on. Pass {option} {context} or less, "
            f"or leave it out for min({DEFAULT_BLOCK_SIZE}, {context}) = {min(DEFAULT_BLOCK_SIZE, context)}."
        )
    return requested


def num_blocks(num_tokens: int, block_size: int) -> int:
    """How many blocks `perplexity_and_depths` scores: the full blocks of `block_size` tokens (the tokens after the
    last full block are not scored), or one shorter block when there is no full one."""
    return max(1, num_tokens // block_size)


def scored_tokens(num_tokens: int, block_size: int) -> int:
    """How many of `num_tokens` tokens `perplexity_and_depths` scores in blocks of `block_size`."""
    return min(num_tokens, num_blocks(num_tokens, block_size) * block_size)


def check_fills_one_block(token_ids: torch.LongTensor, block_size: int, path, max_tokens: int,
                          option: str = "--eval-file", max_option: str = "--eval-max-tokens") -> None:
    """Raises ValueError when the text `path` given by `option` (read up to `max_tokens` tokens, `max_option`) gives
    fewer tokens than one perplexity block: the figure would come from one shorter block, not from blocks of
    `block_size`."""
    if token_ids.numel() < block_size:
        limit = f" ({max_option})" if token_ids.numel() >= max_tokens else ""
        smaller = ", or a smaller --eval-block-size" if option == "--eval-file" else ""
        raise ValueError(
            f"{option} {path} gives {token_ids.numel()} tokens{limit}, fewer than one perplexity block of "
            f"{block_size}; nothing was written. Fix: give more text{smaller}, or a larger {max_option}."
        )


def read_eval_text(path, option: str = "--eval-file") -> str:
    """The text of an evaluation file (`read_text_file`; errors name `option`)."""
    return read_text_file(path, option)


def read_eval_tokens(tokenizer, path, max_tokens: int, option: str = "--eval-file") -> torch.LongTensor:
    """The first `max_tokens` tokens of a text file (a BOS token first when the tokenizer has one)."""
    text = read_eval_text(path, option)
    # Tokenizing a prefix is enough and keeps large files cheap; 8 characters per token is a generous bound.
    ids = tokenizer(text[: max_tokens * 8], add_special_tokens=False)["input_ids"][:max_tokens]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids[: max_tokens - 1]]
    if len(ids) < 2:
        raise ValueError(f"{option} {path} has too little text to measure perplexity on ({len(ids)} token); "
                         f"nothing was written. Pass a text file with at least a few sentences.")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity_and_depths(model, token_ids: torch.LongTensor, block_size: int | None = None, batch_size: int = 8,
                          desc=None):
    """Perplexity over non-overlapping blocks of `block_size` tokens (each block predicted from its own start), and,
    for MoR models, a Counter of the recursion depth of every token. `block_size` defaults to 256 tokens capped at
    the model's context (see `eval_block_size`, which the command lines use to check an explicit value)."""
    if block_size is None:
        block_size = eval_block_size(None, context_length(model.config))
    with in_eval_mode(model):
        device = next(model.parameters()).device
        count = num_blocks(token_ids.numel(), block_size)
        blocks = token_ids[: count * block_size].view(count, -1)
        total_nll, total_tokens, depths = 0.0, 0, Counter()
        is_mor = getattr(model.config, "model_type", None) == "mor"
        for start in tqdm(range(0, count, batch_size), desc=desc or "evaluating", leave=False):
            batch = blocks[start : start + batch_size].to(device)
            kwargs = {"output_recursion_depth": True} if is_mor else {}
            outputs = model(batch, use_cache=False, **kwargs)
            logits = outputs.logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            if is_mor:
                depths.update(outputs.recursion_depth.flatten().tolist())
    return math.exp(total_nll / total_tokens), depths


def mean_depth(depths: Counter, zero_is_padding: bool = True) -> float | None:
    """Mean recursion depth of the real tokens of a depth Counter, None when it has none. Depth 0 marks padding by
    default; `perplexity_and_depths` pads nothing, so for its counts a 0 is a real token that took no recursion step
    (a first step of capacity below 1), which `zero_is_padding=False` counts."""
    counted = {depth: count for depth, count in depths.items() if depth > 0 or not zero_is_padding}
    total = sum(counted.values())
    return sum(depth * count for depth, count in counted.items()) / total if total else None


def depth_histogram(depths: Counter) -> dict[str, int]:
    """Tokens per recursion depth, real tokens only, as model cards and summaries record it (JSON keys)."""
    return {str(depth): count for depth, count in sorted(depths.items()) if depth > 0}


def format_depth_histogram(histogram: dict) -> str:
    """How every command line prints a depth histogram (`depth_histogram`'s JSON form, or one with int keys): tokens
    per recursion depth, "{1: 9, 2: 5, 3: 2}" (depth 0, padding, is left out)."""
    counts = sorted((int(depth), count) for depth, count in histogram.items() if int(depth) > 0)
    return "{" + ", ".join(f"{depth}: {count}" for depth, count in counts) + "}"


@contextlib.contextmanager
def in_eval_mode(model):
    """`model` in eval mode for the block, back in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def routing_overridden(model, **fields):
    """Sets the routing fields of `model.config` (capacity, router_threshold) for the duration of the block and
    restores them after: how `full_depth` and `stopped_before` force a depth without touching the model's code."""
    config = model.config
    saved = {name: getattr(config, name) for name in fields}
    for name, value in fields.items():
        setattr(config, name, value)
    try:
        yield model
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def full_depth(model):
    """Every token takes every recursion step (capacity 1 at each step): the tied recursive model the routers act on.
    Only meaningful for expert-choice routing; other routings are left as they are."""
    if getattr(model.config, "routing", None) != "expert_choice":
        yield model
        return
    with routing_overridden(model, capacity=[1.0] * model.config.num_recursions):
        yield model


@contextlib.contextmanager
def stopped_before(model, step: int):
    """Eval mode's routing with every token stopping before recursion step `step` (0-based), a deciding step
    (capacity below 1): the steps before it taken by every token, it and the later ones by none (a router threshold
    of 1, which no sigmoid exceeds). What a token would predict had it left the recursion there."""
    capacity = model.config.capacity
    if capacity[step] >= 1.0:
        raise ValueError(f"recursion step {step} has capacity 1 ({capacity}): every token takes it, none can stop "
                         f"before it.")
    with routing_overridden(model, capacity=[1.0] * step + list(capacity[step:]), router_threshold=1.0):
        yield model


def routes_by_threshold(config) -> bool:
    """Whether eval-mode routing of `config` is set by `router_threshold`: expert-choice with a recursion step that
    decides (capacity below 1)."""
    return (getattr(config, "model_type", None) == "mor" and config.routing == "expert_choice"
            and config.sharing_strategy.endswith("cycle") and min(config.capacity) < 1.0)


def layer_fraction(model, token_ids: torch.LongTensor, block_size: int | None = None, desc=None) -> float:
    """The share of the unrolled model's layer applications (`config.num_hidden_layers`, the source's for a
    conversion) that the tokens of `token_ids` take in eval mode (`flops.layer_applications`)."""
    _, depths = perplexity_and_depths(model, token_ids, block_size, desc=desc)
    return layer_applications(model, mean_depth(depths, zero_is_padding=False)) / model.config.num_hidden_layers


# Bisection over the router logit t = log(p / (1 - p)) of the threshold p: thresholds cluster near 0 and 1 in
# probability, evenly in logits; [-8, 8] spans p = 0.0003 to 0.9997, and 12 halvings resolve it to 0.004 in logit.
THRESHOLD_LOGIT_RANGE = 8.0
THRESHOLD_BISECTIONS = 12


@torch.no_grad()
def calibrate_router_threshold(model, token_ids: torch.LongTensor, budget: float, block_size: int | None = None):
    """The lowest eval-mode `router_threshold` at which the tokens of `token_ids` take at most `budget` (a fraction)
    of the unrolled model's layer applications per token, and the fraction they take at it.

    A lower threshold sends more tokens deeper, so the lowest one within the budget spends it best. Raises
    ValueError when no threshold reaches the budget (every token takes the steps of capacity 1). Restores the
    model's threshold: the caller sets the one returned."""
    config = model.config
    configured = config.router_threshold

    def fraction_at(logit: float) -> float:
        config.router_threshold = _sigmoid(logit)
        return layer_fraction(model, token_ids, block_size, desc=f"router_threshold {config.router_threshold:.4f}")

    try:
        low, high = -THRESHOLD_LOGIT_RANGE, THRESHOLD_LOGIT_RANGE
        spent = fraction_at(low)
        if spent <= budget:
            return config.router_threshold, spent
        spent = fraction_at(high)
        if spent > budget:
            raise ValueError(
                f"no router threshold brings the model within {budget:g} of its layer applications: at threshold "
                f"{config.router_threshold:.4f} its tokens still take {spent:.3f} (the steps of capacity 1, "
                f"{config.capacity}, are taken by every token). Fix: give a budget of at least {spent:.3f}."
            )
        for _ in range(THRESHOLD_BISECTIONS):
            middle = (low + high) / 2
            middle_spent = fraction_at(middle)
            if middle_spent <= budget:
                high, spent = middle, middle_spent
            else:
                low = middle
        return _sigmoid(high), spent
    finally:
        config.router_threshold = configured


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))

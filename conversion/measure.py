"""The figures a conversion or an uptraining run reports: perplexity on a text file and the recursion-depth
histogram."""

import contextlib
import math
from collections import Counter

import torch
from tqdm.auto import tqdm


def read_eval_tokens(tokenizer, path, max_tokens: int) -> torch.LongTensor:
    """The first `max_tokens` tokens of a text file (a BOS token first when the tokenizer has one)."""
    text = open(path, encoding="utf-8").read()
    # Tokenizing a prefix is enough and keeps large files cheap; 8 characters per token is a generous bound.
    ids = tokenizer(text[: max_tokens * 8], add_special_tokens=False)["input_ids"][:max_tokens]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids[: max_tokens - 1]]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity_and_depths(model, token_ids: torch.LongTensor, block_size: int = 256, batch_size: int = 8, desc=None):
    """Perplexity over non-overlapping blocks of `block_size` tokens (each block predicted from its own start), and,
    for MoR models, a Counter of the recursion depth of every token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_blocks = max(1, token_ids.numel() // block_size)
    blocks = token_ids[: num_blocks * block_size].view(num_blocks, -1)
    total_nll, total_tokens, depths = 0.0, 0, Counter()
    is_mor = getattr(model.config, "model_type", None) == "mor"
    for start in tqdm(range(0, num_blocks, batch_size), desc=desc or "evaluating", leave=False):
        batch = blocks[start : start + batch_size].to(device)
        kwargs = {"output_recursion_depth": True} if is_mor else {}
        outputs = model(batch, use_cache=False, **kwargs)
        logits = outputs.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        if is_mor:
            depths.update(outputs.recursion_depth.flatten().tolist())
    model.train(was_training)
    return math.exp(total_nll / total_tokens), depths


@contextlib.contextmanager
def full_depth(model):
    """Every token takes every recursion step (capacity 1 at each step): the tied recursive model the routers act on.
    Only meaningful for expert-choice routing; other routings are left as they are."""
    config = model.config
    if getattr(config, "routing", None) != "expert_choice":
        yield model
        return
    capacity = config.capacity
    config.capacity = [1.0] * config.num_recursions
    try:
        yield model
    finally:
        config.capacity = capacity

"""Offline evaluation of MoR and Llama checkpoints: perplexity, few-shot multiple choice, routing statistics.

Every reported metric value comes from an `evaluate` metric module: by default the ones shipped in `metrics/` (loaded
by path, so nothing is downloaded); with `metric_source="hub"`, the Hub's "perplexity" and "accuracy" metrics (only
where the Hub is reachable).

Example:

```python
from evaluation import load_model_and_tokenizer, multiple_choice_accuracy, routing_statistics, text_file_perplexity

perplexity = text_file_perplexity("path/to/mor-checkpoint", "valid.txt", max_tokens=20_000, max_length=256, stride=128)
model, tokenizer = load_model_and_tokenizer("path/to/mor-checkpoint")
accuracy = multiple_choice_accuracy(model, tokenizer, "examples/data/tiny_stories_mc.jsonl", num_fewshot=3)
routing = routing_statistics(model, tokenizer, "valid.txt", max_tokens=20_000, max_length=256, stride=128)
```
"""

import json
import logging
import math
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mor", "llama")
LOCAL_METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"
# The metric each reported value comes from: (folder under metrics/, name on the Hub).
METRICS = {
    "perplexity": ("perplexity", "perplexity"),
    "accuracy": ("multiple_choice_accuracy", "accuracy"),
}
METRIC_SOURCES = ("local", "hub")


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def load_metric(name: str, metric_source: str = "local"):
    """The `evaluate` module for "perplexity" or "accuracy": the project's copy (by path) or the Hub's (by name)."""
    import evaluate

    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.")
    if metric_source not in METRIC_SOURCES:
        raise ValueError(f"metric_source={metric_source!r} is not valid; choose one of {', '.join(METRIC_SOURCES)}.")
    local_folder, hub_name = METRICS[name]
    if metric_source == "local":
        return evaluate.load(str(LOCAL_METRICS_DIR / local_folder))
    try:
        return evaluate.load(hub_name)
    except Exception as error:  # evaluate raises several types (ConnectionError, FileNotFoundError, ...) offline
        raise RuntimeError(
            f"Could not load the Hub metric {hub_name!r} ({type(error).__name__}: {error}). The Hub is probably not "
            f"reachable from here; use metric_source='local' (--metric-source local) for the project's own copy."
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Loading a checkpoint
# ---------------------------------------------------------------------------------------------------------------


def read_checkpoint_config(model_name_or_path: str) -> dict:
    """The `config.json` of a local folder or a Hub repository, as a dict (only that small file is read)."""
    path = Path(model_name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{model_name_or_path} is a file, not a checkpoint folder. Pass the folder that holds config.json "
                f"(a saved MoR or Llama checkpoint)."
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            found = sorted(child.name for child in path.iterdir())[:10]
            hint = ""
            if (path / "adapter_config.json").is_file():
                hint = (
                    " It holds a PEFT adapter (adapter_config.json): merge it into its base model "
                    "(merge_and_unload, then save_pretrained) and evaluate the merged folder."
                )
            raise ValueError(
                f"{model_name_or_path} has no config.json, so it is not a model checkpoint (found: "
                f"{', '.join(found) or 'an empty folder'}).{hint} Supported: folders saved by save_pretrained from an "
                f"MoR model (model_type 'mor') or a Llama model (model_type 'llama')."
            )
        return _read_json(config_file)

    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(model_name_or_path, "config.json")
    except Exception as error:
        raise ValueError(
            f"{model_name_or_path!r} is not a local folder, and its config.json could not be fetched as a Hub id "
            f"({type(error).__name__}: {error})."
        ) from error
    return _read_json(Path(config_file))


def _read_json(config_file: Path) -> dict:
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a valid JSON file ({error}): it is truncated or corrupt. Fix: copy or "
                         f"download the checkpoint again.") from None


def check_supported_checkpoint(model_name_or_path: str) -> str:
    """Returns the checkpoint's model_type if it is an MoR or Llama checkpoint; raises a ValueError otherwise.

    Only config.json is read, so an unsupported folder fails before any weights or remote code are loaded.
    """
    config = read_checkpoint_config(model_name_or_path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_name_or_path} is a {model_type!r} checkpoint (architectures: {config.get('architectures')}), "
            f"which this evaluation does not support. Supported: MoR checkpoints (model_type 'mor', e.g. from "
            f"conversion/convert_llama_to_mor.py) and Llama checkpoints (model_type 'llama')."
        )
    return model_type


def load_model_and_tokenizer(model_name_or_path: str, device: str = "cpu", trust_remote_code: bool = True):
    """Loads an MoR or Llama checkpoint (folder or Hub id) with its tokenizer, in eval mode.

    `trust_remote_code=True` lets an MoR checkpoint load through the model code saved next to its weights, without
    the project being importable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_supported_checkpoint(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def is_mor_model(model) -> bool:
    return getattr(model.config, "model_type", None) == "mor"


# ---------------------------------------------------------------------------------------------------------------
# Perplexity of a text file
# ---------------------------------------------------------------------------------------------------------------


def load_text(text_file, tokenizer, max_tokens: int | None = None) -> str:
    """The text of `text_file`, cut right after its first `max_tokens` tokens (all of it when None)."""
    text = Path(text_file).read_text(encoding="utf-8")
    if max_tokens is None:
        return text
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is not valid; it must be at least 1 (or None for the whole file).")
    # Tokenize a growing prefix rather than the whole file, which may be large.
    num_chars = 16 * max_tokens
    while True:
        prefix = text[:num_chars]
        offsets = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > max_tokens or num_chars >= len(text):
            break
        num_chars *= 2
    if len(offsets) <= max_tokens:
        return prefix
    return prefix[: offsets[max_tokens - 1][1]]


def sliding_windows(num_tokens: int, max_length: int | None, stride: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: the same rule as metrics/perplexity/perplexity.py, which must stay
    self-contained (evaluate copies it out of the project), hence this copy.

    The window feeds tokens [begin, end) and scores the predictions of tokens [first_target, end).
    """
    if max_length is None or stride is None or num_tokens <= max_length:
        end = num_tokens if max_length is None else min(num_tokens, max_length)
        return [(0, end, 1)]
    windows = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def split_text_for_hub_metric(text: str, tokenizer, tokens_per_piece: int) -> list[str]:
    """Cuts `text` into pieces of at most `tokens_per_piece` tokens, at word starts (so that each piece tokenizes
    as it did inside the text). The Hub perplexity metric has no stride: it truncates long texts, so a long text
    must reach it as pieces, each scored on its own."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = []
    start = 0
    while start < len(offsets):
        end = min(start + tokens_per_piece, len(offsets))
        cut = end
        while start + 1 < cut < len(offsets) and not text[offsets[cut][0]].isspace():
            cut -= 1
        if cut < len(offsets) and not text[offsets[cut][0]].isspace():
            cut = end  # no word starts inside this piece: cut inside the word
        pieces.append(text[offsets[start][0] : offsets[cut - 1][1]].strip())
        start = cut
    return [piece for piece in pieces if piece]


def text_file_perplexity(
    model_name_or_path: str,
    text_file,
    *,
    max_tokens: int | None = None,
    max_length: int = 256,
    stride: int | None = 128,
    batch_size: int = 8,
    add_start_token: bool = True,
    device: str = "cpu",
    metric_source: str = "local",
    trust_remote_code: bool = True,
) -> dict:
    """Token-level perplexity of the first `max_tokens` tokens of `text_file`, scored as one stream.

    Local metric: windows of `max_length` tokens (BOS included) slide by `stride`; every token is scored once, with
    at least `max_length - stride` tokens of context after the first window. Hub metric (no stride there): the text
    goes as pieces of `max_length - 1` tokens, each with its own BOS and no context from the previous piece, and the
    per-piece perplexities are combined token-weighted: exp(sum_i n_i log ppl_i / sum_i n_i).
    """
    from transformers import AutoTokenizer

    check_supported_checkpoint(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    text = load_text(text_file, tokenizer, max_tokens)
    metric = load_metric("perplexity", metric_source)

    if metric_source == "local":
        results = metric.compute(
            predictions=[text],
            model_id=str(model_name_or_path),
            batch_size=batch_size,
            add_start_token=add_start_token,
            device=device,
            max_length=max_length,
            stride=stride,
            trust_remote_code=trust_remote_code,
        )
        perplexity = results["token_perplexity"]
        num_tokens = sum(results["num_tokens"])
    else:
        # The Hub metric loads the model without trust_remote_code; importing the project registers MoR with the
        # Auto classes, which is what lets it load an MoR folder.
        try:
            import modeling_mor  # noqa: F401
        except ImportError:
            logger.warning("modeling_mor is not importable: the Hub perplexity metric can only load Llama models.")
        pieces = split_text_for_hub_metric(text, tokenizer, max_length - 1 if add_start_token else max_length)
        if batch_size > 1 and tokenizer.pad_token is None:
            # The Hub metric then borrows a pad token through `special_tokens_map_extended`, which transformers 5
            # tokenizers no longer have; one text per batch needs no padding.
            logger.warning("The tokenizer has no pad token: the Hub perplexity metric runs with batch_size=1.")
            batch_size = 1
        results = metric.compute(
            predictions=pieces,
            model_id=str(model_name_or_path),
            batch_size=batch_size,
            add_start_token=add_start_token,
            device=device,
            max_length=max_length,
        )
        # Tokens the Hub metric scores per piece: all of them with a BOS, all but the first without.
        counts = [
            min(len(tokenizer(piece, add_special_tokens=False)["input_ids"]), max_length - int(add_start_token))
            - (0 if add_start_token else 1)
            for piece in pieces
        ]
        num_tokens = sum(counts)
        log_perplexity = sum(count * math.log(ppl) for count, ppl in zip(counts, results["perplexities"]))
        perplexity = math.exp(log_perplexity / num_tokens)
        stride = None
    return {
        "perplexity": perplexity,
        "num_tokens": num_tokens,
        "max_length": max_length,
        "stride": stride,
        "metric": _metric_origin("perplexity", metric_source),
    }


def _metric_origin(name: str, metric_source: str) -> str:
    local_folder, hub_name = METRICS[name]
    if metric_source == "local":
        return f"local:metrics/{local_folder}"
    return f"hub:{hub_name}"


# ---------------------------------------------------------------------------------------------------------------
# Few-shot multiple choice
# ---------------------------------------------------------------------------------------------------------------


def load_multiple_choice_items(mc_file) -> list[dict]:
    """Reads a JSONL file with one question per line: `question` and/or `context` (text), `choices` (a list of
    strings) and `answer` (the index of the correct choice)."""
    items = []
    for line_number, line in enumerate(Path(mc_file).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        where = f"{mc_file}, line {line_number}"
        if not item.get("question") and not item.get("context"):
            raise ValueError(f"{where}: needs a 'question' or a 'context' field.")
        choices = item.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two strings.")
        answer = item.get("answer")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be the index of the correct choice (0..{len(choices) - 1}).")
        items.append(item)
    if not items:
        raise ValueError(f"{mc_file} holds no questions.")
    return items


def format_question(item: dict) -> str:
    """The prompt of one item, ending where the answer starts (evaluation/lm_eval_tasks/mor_tiny_mc uses the same)."""
    lines = []
    if item.get("context"):
        lines.append(item["context"])
    if item.get("question"):
        lines.append(f"Question: {item['question']}")
    lines.append("Answer:")
    return "\n".join(lines)


def fewshot_prompt(items: list[dict], index: int, num_fewshot: int) -> str:
    """The prompt of item `index`, after `num_fewshot` solved examples: the first items of the file other than this
    one (lm-eval's "first_n" sampler), each followed by its correct answer, separated by blank lines."""
    examples = [other for position, other in enumerate(items) if position != index][:num_fewshot]
    if len(examples) < num_fewshot:
        raise ValueError(
            f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} items; the file has {len(items)}."
        )
    solved = [f"{format_question(example)} {example['choices'][example['answer']]}" for example in examples]
    return "\n\n".join(solved + [format_question(items[index])])


def encode_context_and_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-eval splits them: the continuation's tokens are those of
    (context + continuation) after the context's, and trailing spaces of the context move to the continuation, so
    that a word keeps its usual (space-prefixed) token."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole_ids = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return context_ids, whole_ids[len(context_ids) :]


@torch.no_grad()
def choice_loglikelihoods(
    model,
    tokenizer,
    items: list[dict],
    num_fewshot: int = 0,
    batch_size: int = 8,
    add_start_token: bool = True,
    max_length: int | None = None,
    show_progress: bool = True,
) -> list[list[float]]:
    """log p(" " + choice | few-shot prompt) of every choice of every item, summed over the choice's tokens."""
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", None)
    requests = []  # (item index, choice index, token ids, number of continuation tokens)
    truncated = 0
    for item_index, item in enumerate(items):
        context = fewshot_prompt(items, item_index, num_fewshot)
        for choice_index, choice in enumerate(item["choices"]):
            context_ids, continuation_ids = encode_context_and_continuation(tokenizer, context, " " + choice)
            if add_start_token:
                context_ids = [tokenizer.bos_token_id] + context_ids
            token_ids = context_ids + continuation_ids
            if max_length is not None and len(token_ids) > max_length:
                # Keep the end: the continuation and the closest context.
                token_ids = token_ids[-max_length:]
                truncated += 1
            requests.append((item_index, choice_index, token_ids, len(continuation_ids)))
    if truncated:
        logger.warning(f"{truncated} prompts were longer than {max_length} tokens and lost their start.")

    loglikelihoods = [[0.0] * len(item["choices"]) for item in items]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(requests), batch_size), desc="multiple choice", disable=not show_progress):
        batch = requests[start : start + batch_size]
        width = max(len(token_ids) for _, _, token_ids, _ in batch)
        # Right padding keeps every real token at its true position; padding is masked out.
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, _, token_ids, _) in enumerate(batch):
            input_ids[row, : len(token_ids)] = torch.tensor(token_ids)
            attention_mask[row, : len(token_ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, (item_index, choice_index, token_ids, num_continuation) in enumerate(batch):
            length = len(token_ids)
            # The logits at position t predict token t + 1.
            positions = torch.arange(length - num_continuation - 1, length - 1)
            targets = torch.tensor(token_ids[length - num_continuation :])
            loglikelihoods[item_index][choice_index] = log_probs[row, positions, targets].double().sum().item()
    return loglikelihoods


def first_argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda index: scores[index])


def multiple_choice_accuracy(
    model,
    tokenizer,
    mc_file,
    *,
    num_fewshot: int = 0,
    batch_size: int = 8,
    add_start_token: bool = True,
    metric_source: str = "local",
    show_progress: bool = True,
) -> dict:
    """Few-shot multiple-choice accuracy: the model picks the choice with the highest log-likelihood.

    `accuracy` picks by the summed log-likelihood of the choice's tokens (lm-eval's `acc`); `accuracy_norm` by that
    sum divided by the choice's length in characters (lm-eval's `acc_norm`). Both values come from the accuracy
    metric module.
    """
    items = load_multiple_choice_items(mc_file)
    loglikelihoods = choice_loglikelihoods(
        model, tokenizer, items, num_fewshot, batch_size, add_start_token, show_progress=show_progress
    )
    references = [item["answer"] for item in items]
    predictions = [first_argmax(scores) for scores in loglikelihoods]
    predictions_norm = [
        first_argmax([score / len(choice) for score, choice in zip(scores, item["choices"])])
        for scores, item in zip(loglikelihoods, items)
    ]
    metric = load_metric("accuracy", metric_source)
    accuracy = metric.compute(predictions=predictions, references=references)["accuracy"]
    accuracy_norm = metric.compute(predictions=predictions_norm, references=references)["accuracy"]
    num_choices = [len(item["choices"]) for item in items]
    return {
        "accuracy": accuracy,
        "accuracy_norm": accuracy_norm,
        "chance_accuracy": sum(1 / count for count in num_choices) / len(items),
        "num_items": len(items),
        "num_fewshot": num_fewshot,
        "predictions": predictions,
        "metric": _metric_origin("accuracy", metric_source),
    }


# ---------------------------------------------------------------------------------------------------------------
# Routing statistics (MoR only)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_recursion_depths(
    model, token_ids: list[int], max_length: int, stride: int | None, batch_size: int = 8, show_progress: bool = True
) -> torch.LongTensor:
    """The recursion depth of every token of `token_ids` (eval-mode routing), one entry per token.

    The tokens go through the model in the perplexity windows; each token is counted once, from the first window
    that scores it (the one that gives it the most context), and the tokens of the first window all from there.
    """
    device = next(model.parameters()).device
    windows = sliding_windows(len(token_ids), max_length, stride)
    depths = []
    for start in tqdm(range(0, len(windows), batch_size), desc="routing", disable=not show_progress):
        batch = windows[start : start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (begin, end, _) in enumerate(batch):
            input_ids[row, : end - begin] = torch.tensor(token_ids[begin:end])
            attention_mask[row, : end - begin] = 1
        outputs = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_recursion_depth=True
        )
        for row, (begin, end, first_target) in enumerate(batch):
            first_counted = begin if begin == 0 else first_target
            depths.append(outputs.recursion_depth[row, first_counted - begin : end - begin].cpu())
    return torch.cat(depths)


def summarize_recursion_depths(depths: torch.Tensor, config) -> dict:
    """Mean depth, depth histogram and the share of layer computations saved against running every token at full
    depth.

    With N_r = num_recursions, B = shared layers in the recursion block, L = num_hidden_layers (the unrolled depth)
    and E = 2 unshared end layers for the middle_* strategies (0 otherwise), a token of depth d costs E + B * d layer
    applications instead of L = E + B * N_r. Reported:
      - block_compute_saved = 1 - mean_depth / N_r (share of recursion-block layer applications skipped),
      - model_compute_saved = (L - E - B * mean_depth) / L = B * (N_r - mean_depth) / L (share of all decoder-layer
        applications skipped).
    Every layer application counts the same; attention's dependence on context length, the embeddings, the LM head
    and the routers are left out.
    """
    num_recursions = config.num_recursions
    num_layers = config.num_hidden_layers
    end_layers = 2 if config.sharing_strategy.startswith("middle_") else 0
    block_size = (num_layers - end_layers) // num_recursions
    depths = depths.flatten().long()
    mean_depth = depths.double().mean().item()
    histogram = {depth: int((depths == depth).sum()) for depth in range(1, num_recursions + 1)}
    return {
        "num_tokens": depths.numel(),
        "mean_depth": mean_depth,
        "depth_histogram": histogram,
        "depth_fractions": {depth: count / depths.numel() for depth, count in histogram.items()},
        "num_recursions": num_recursions,
        "block_size": block_size,
        "num_hidden_layers": num_layers,
        "unshared_end_layers": end_layers,
        "block_compute_saved": 1.0 - mean_depth / num_recursions,
        "model_compute_saved": (num_layers - end_layers - block_size * mean_depth) / num_layers,
    }


def routing_statistics(
    model,
    tokenizer,
    text_file,
    *,
    max_tokens: int | None = None,
    max_length: int = 256,
    stride: int | None = 128,
    batch_size: int = 8,
    add_start_token: bool = True,
    show_progress: bool = True,
) -> dict | None:
    """Routing statistics of an MoR model on the same tokens the perplexity scores (None for a non-MoR model)."""
    if not is_mor_model(model):
        return None
    text = load_text(text_file, tokenizer, max_tokens)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_start_token:
        token_ids = [tokenizer.bos_token_id] + token_ids
    depths = collect_recursion_depths(model, token_ids, max_length, stride, batch_size, show_progress)
    statistics = summarize_recursion_depths(depths, model.config)
    statistics.update(routing=model.config.routing, sharing_strategy=model.config.sharing_strategy)
    return statistics

"""Perplexity, as an `evaluate` metric module that ships with the project and loads by path (no Hub access).

It follows the interface of the Hub's "perplexity" metric, `compute(predictions=texts, model_id=..., batch_size=...,
add_start_token=..., device=..., max_length=...)` returning `perplexities` and `mean_perplexity`, and adds:

- `trust_remote_code`: passed to `from_pretrained`, so that MoR checkpoints (whose model code travels with the
  weights) load in a process that has not imported the project;
- `stride`: score texts longer than `max_length` with a sliding window (every token is scored exactly once, with up
  to `max_length - stride` tokens of context carried over from the previous window) instead of truncating them;
- two extra outputs: `num_tokens` (tokens scored per text) and `token_perplexity` (exp of the mean negative
  log-likelihood over every scored token of every text, the usual corpus-level perplexity).

Without `stride` the texts are scored as the Hub metric scores them (truncated to `max_length`).
"""

import math

import datasets
import evaluate
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer


_DESCRIPTION = """
Perplexity (PPL) of a causal language model on texts: the exponentiated mean negative log-likelihood of each token
given the tokens before it. Lower is better. With `stride`, long texts are scored with a sliding window.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the texts to score.
    model_id (`str`): a model folder or Hub id loadable by `AutoModelForCausalLM`.
    batch_size (`int`, defaults to 16): windows scored per forward pass.
    add_start_token (`bool`, defaults to True): prepend the BOS token to every text, so that its first token is scored.
    device (`str`, *optional*): "cpu", "cuda" or "gpu"; defaults to "cuda" when available.
    max_length (`int`, *optional*): the most tokens one forward pass sees (the BOS token included).
    stride (`int`, *optional*): with `max_length`, slide windows of `max_length` tokens by `stride` tokens over texts
        that do not fit, instead of truncating them. Must be between 1 and `max_length - 1`.
    trust_remote_code (`bool`, defaults to False): allow the checkpoint's own model code (MoR checkpoints need it
        unless the project's `modeling_mor` package is imported).
Returns:
    perplexities (`list[float]`): one perplexity per text.
    mean_perplexity (`float`): the mean of `perplexities` (as the Hub metric reports it).
    num_tokens (`list[int]`): how many tokens were scored in each text.
    token_perplexity (`float`): exp of the mean negative log-likelihood over all scored tokens.
Examples:
    >>> perplexity = evaluate.load("metrics/perplexity")
    >>> results = perplexity.compute(predictions=["Once upon a time"], model_id="path/to/model", max_length=256)
    >>> round(results["mean_perplexity"], 2)  # doctest: +SKIP
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity--a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America},
  volume={62}, number={S1}, pages={S63--S63}, year={1977}
}
"""


def sliding_windows(num_tokens: int, max_length: int | None, stride: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over a sequence of `num_tokens` tokens.

    The window feeds tokens [begin, end) to the model and scores the predictions of tokens [first_target, end); the
    first token of a sequence is never a target (nothing precedes it). Windows start `stride` tokens apart, and each
    scores only the tokens its predecessor did not, so every token from 1 on is scored exactly once.
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        model_id,
        batch_size: int = 16,
        add_start_token: bool = True,
        device=None,
        max_length=None,
        stride=None,
        trust_remote_code: bool = False,
    ):
        device = _resolve_device(device)
        if stride is not None:
            if max_length is None:
                raise ValueError("stride needs max_length (the window size).")
            if not 1 <= stride <= max_length - 1:
                raise ValueError(
                    f"stride={stride} is not valid for max_length={max_length}: it must be between 1 and "
                    f"max_length - 1 so that consecutive windows overlap by at least the one token that gives the "
                    f"next window's first prediction its context."
                )

        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        if add_start_token and tokenizer.bos_token_id is None:
            raise ValueError(f"add_start_token=True needs a BOS token, and the tokenizer of {model_id} has none.")

        # Token ids of every text: BOS first when asked; without a stride, truncated as the Hub metric does.
        token_lists = []
        for text in predictions:
            token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if add_start_token:
                token_ids = [tokenizer.bos_token_id] + token_ids
            if stride is None and max_length is not None:
                token_ids = token_ids[:max_length]
            if len(token_ids) < 2:
                # The Hub metric asserts the same: a perplexity needs at least one predicted token.
                raise ValueError(
                    f"Text {len(token_lists)} ({text!r}) has no token to score: each text needs at least one token "
                    f"with add_start_token=True, two without."
                )
            token_lists.append(token_ids)

        windows = []  # (text index, token ids of the window, index of its first target within the window)
        for text_index, token_ids in enumerate(token_lists):
            for begin, end, first_target in sliding_windows(len(token_ids), max_length, stride):
                windows.append((text_index, token_ids[begin:end], first_target - begin))

        # Any id works for padding: padded positions are masked out of attention and out of the loss.
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        total_nll = [0.0] * len(token_lists)
        num_scored = [0] * len(token_lists)
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch"):
            batch = windows[start : start + batch_size]
            width = max(len(window_ids) for _, window_ids, _ in batch)
            # Right padding keeps every real token at its true position (position ids count from 0 in each row).
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (_, window_ids, first_target) in enumerate(batch):
                input_ids[row, : len(window_ids)] = torch.tensor(window_ids)
                attention_mask[row, : len(window_ids)] = 1
                target_mask[row, first_target : len(window_ids)] = True
            input_ids, target_mask = input_ids.to(device), target_mask.to(device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits
            # The logits at position t predict token t + 1.
            token_nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
            )
            scored = target_mask[:, 1:]
            # Summed in float64: a corpus can hold millions of tokens.
            window_nll = (token_nll.double() * scored).sum(-1)
            for row, (text_index, _, _) in enumerate(batch):
                total_nll[text_index] += window_nll[row].item()
                num_scored[text_index] += int(scored[row].sum())

        perplexities = [math.exp(nll / count) for nll, count in zip(total_nll, num_scored)]
        return {
            "perplexities": perplexities,
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "num_tokens": num_scored,
            "token_perplexity": math.exp(sum(total_nll) / sum(num_scored)),
        }


def _resolve_device(device):
    """The Hub metric's rule: "gpu" means "cuda"; no device means "cuda" when available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is not valid; use 'cpu', 'cuda' or 'gpu'.")
    return "cuda" if device == "gpu" else device

"""Offline evaluation of MoR and Llama checkpoints (see `evaluation/core.py`).

The metric values come from the `evaluate` metric modules in `metrics/` (loaded by path), or from the Hub's
"perplexity" and "accuracy" metrics with `metric_source="hub"`. `evaluation/lm_eval_tasks/` holds a local task for
the lm-evaluation-harness.
"""

from .core import (
    check_supported_checkpoint,
    choice_loglikelihoods,
    collect_recursion_depths,
    fewshot_prompt,
    load_metric,
    load_model_and_tokenizer,
    load_multiple_choice_items,
    load_text,
    multiple_choice_accuracy,
    routing_statistics,
    sliding_windows,
    summarize_recursion_depths,
    text_file_perplexity,
)


__all__ = [
    "check_supported_checkpoint",
    "choice_loglikelihoods",
    "collect_recursion_depths",
    "fewshot_prompt",
    "load_metric",
    "load_model_and_tokenizer",
    "load_multiple_choice_items",
    "load_text",
    "multiple_choice_accuracy",
    "routing_statistics",
    "sliding_windows",
    "summarize_recursion_depths",
    "text_file_perplexity",
]

"""What a training run records besides the model: OUTPUT_DIR/training_summary.json and the loss-curve picture."""

from pathlib import Path

from ..measure import depth_histogram, mean_depth
from .data import TrainingData


SUMMARY_FILE = "training_summary.json"


def training_summary(args, trainer, steps_planned, data: TrainingData, after, depths, train_seconds,
                     calibration: dict | None = None) -> dict:
    """What OUTPUT_DIR/training_summary.json records: the compute spent, the data seen and the evaluation."""
    state = trainer.state
    budget = args.max_train_flops
    if trainer.budget.reached:
        stopped_by = trainer.budget.reached
    elif state.global_step >= state.max_steps:
        stopped_by = "max steps"
    else:
        stopped_by = "end of run"
    summary = {
        "model_type": trainer.model.config.model_type,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "planned_steps": steps_planned,
        "tokens_seen": int(state.num_input_tokens_seen),
        "train_flops": state.total_flos,
        "max_train_flops": budget,
        "max_minutes": getattr(args, "max_minutes", None),
        "stopped_by": stopped_by,
        "flop_count": "conversion/flops.py: 6 * parameters touched at each token's depth + causal attention, "
                      "forward + backward" if trainer.flop_counter is not None else "Trainer: 6 * parameters * tokens",
        "wall_time_s": round(train_seconds, 2),
        "world_size": trainer.args.world_size,
        "train_data": args.dataset or [Path(p).name for p in args.train_file],
        "block_size": args.block_size,
        "eval": None,
        "router_calibration": calibration,  # --layer-budget's threshold, None when not asked for or not applied
    }
    if after is not None:
        summary["eval"] = {
            "perplexity": after,
            "file": Path(args.eval_file).name,
            "tokens": data.eval_tokens.numel(),
            "block_size": args.eval_block_size,
            "routing": "eval mode (causal)",
            "depth_histogram": depth_histogram(depths) if depths else None,
            "mean_depth": mean_depth(depths) if depths else None,
        }
    return summary


def save_loss_curve(log_history, path, title: str = "MoR uptraining") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(entry["step"], entry["lm_loss"]) for entry in log_history if "lm_loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:  # fewer steps than --logging-steps: nothing was logged
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train LM loss")
    if evaluation:
        axis.plot(*zip(*evaluation), marker="o", label="eval loss")
    for name in ("router_aux_loss", "balance_loss", "distill_loss"):
        points = [(entry["step"], entry[name]) for entry in log_history if name in entry]
        if points:
            axis.plot(*zip(*points), linestyle="--", label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True

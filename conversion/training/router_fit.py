"""Fitting the routers' decisions to what stopping costs (`mor-uptrain --router-fit-tokens N --router-fit-at F`).

Expert-choice training teaches the router that decides who takes a recursion step to predict what top-k on its own
scores chose, and those scores only learn through the gate: measured on an uptrained SmolLM2 conversion, the tokens
its routers let leave are barely cheaper to stop than random ones. The fit measures instead, on N training tokens,
every token's skip cost, the KL divergence from the model's own next-token distribution at full depth to the one it
gives when the token stops before the step, and fits each deciding router (its logit is what eval mode compares with
`router_threshold`) to tell the costliest tokens, the top capacity-fraction of each sequence by the rule top-k
already follows (`routing_mor.hierarchical_top_k`), from the rest: binary cross-entropy on the hidden states the
router reads, which the measuring forward passes record. The fit runs on features held in memory (a small logistic
regression per router, not a second training loop).

Only the deciding routers change; with `router_inference="auxiliary"` (the conversion default) they only decide, so
every token computes at a given depth what it did before. Fitted inside training (`RouterFitStage`, F below 1), the
fitted routers then choose who continues in training too (`router_selection="auxiliary"`), so that the rest of the
run teaches the model the routing it will serve: after training alone the tokens that continue lose the context the
old routers kept for them at the deeper step (docs/conversion.md#router-fit). `--layer-budget` sets the threshold on
the fitted routers.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import TrainerCallback

from modeling_mor.routing_mor import hierarchical_top_k

from ..measure import full_depth, in_eval_mode, routes_by_threshold, stopped_before


# When the fit runs by default, as a share of the training budget: of 0.3, 0.5 and after training, the one closest to
# both of the SmolLM2 recipe's targets at once (docs/conversion.md#router-fit).
DEFAULT_ROUTER_FIT_AT = 0.5
# How many training tokens the fit measures by default: the SmolLM2 recipe's (its after-training fit on 65,536 did no
# better); their skip costs took a minute of one CPU core there.
DEFAULT_ROUTER_FIT_TOKENS = 32768
ROUTER_FIT_EPOCHS = 40
ROUTER_FIT_LEARNING_RATE = 1e-3
ROUTER_FIT_BATCH_TOKENS = 512


def router_fit_obstacle(config) -> tuple[str, str] | None:
    """Why the router fit cannot run on a model of `config`, and the fix; None when it can."""
    if not routes_by_threshold(config):
        return ("it fits the routers that decide who takes an expert-choice recursion step, and this model has none "
                "(it needs routing expert_choice and a capacity below 1)", "leave the router fit options out")
    if config.router_inference != "auxiliary":
        return (f"it fits the deciding routers, and with router_inference {config.router_inference!r} they also set "
                f"the gates of the tokens that continue, which the fit would change",
                "convert with --router-inference auxiliary (the default), or leave the router fit options out")
    return None


def refuse_router_fit(given: str, reason: str, fix: str):
    """Refuses an explicitly asked router fit (the options as `given`) that cannot run: ValueError, one line naming the
    fix."""
    raise ValueError(f"{given} asks for the router fit, which cannot run: {reason}; nothing was written. Fix: {fix}.")


@torch.no_grad()
def estimated_fit_seconds(model, token_blocks: torch.LongTensor, batch_size: int = 4) -> float:
    """What `fit_decision_routers` will take on `token_blocks`, from the time of one forward pass of a batch (the
    second of two; the first warms up): one at full depth and one per deciding step for every batch, plus a tenth
    for the fit itself."""
    batch = token_blocks[:batch_size].to(model.device)
    with in_eval_mode(model), full_depth(model):
        for _ in range(2):
            started = time.perf_counter()
            model(batch, use_cache=False)
            seconds = time.perf_counter() - started
    num_batches = math.ceil(len(token_blocks) / batch_size)
    return 1.1 * seconds * num_batches * (1 + len(model.decision_routers()))


@torch.no_grad()
def measure_skip_costs(model, token_blocks: torch.LongTensor, batch_size: int = 4, desc: str = "skip costs"):
    """For each deciding recursion step: the hidden states its router reads ([tokens, hidden]) and every token's skip
    cost there ([blocks, block_size]), KL(full depth || stopped before the step) of the model's next-token
    distributions, both measured in eval mode with every token taking the steps before it."""
    routers = model.decision_routers()
    features = {step: [] for step in routers}
    costs = {step: [] for step in routers}
    first_input = {}

    def recorder(step):
        def record(module, inputs, output):
            # Stopped before `step`, this step's router is called with every token first (later ones see none).
            first_input.setdefault(step, inputs[0].detach())

        return record

    hooks = [router.register_forward_hook(recorder(step)) for step, router in routers.items()]
    try:
        with in_eval_mode(model):
            for batch in tqdm(token_blocks.split(batch_size), desc=desc):
                batch = batch.to(model.device)
                with full_depth(model):
                    full = model(batch, use_cache=False).logits.float().log_softmax(-1)
                full_probabilities = full.exp()
                for step in routers:
                    first_input.clear()
                    with stopped_before(model, step):
                        stopped = model(batch, use_cache=False).logits.float().log_softmax(-1)
                    features[step].append(first_input[step].flatten(0, 1).float().cpu())
                    costs[step].append((full_probabilities * (full - stopped)).sum(-1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return ({step: torch.cat(values) for step, values in features.items()},
            {step: torch.cat(values) for step, values in costs.items()})


def fit_decision_routers(model, token_blocks: torch.LongTensor, batch_size: int = 4, epochs: int = ROUTER_FIT_EPOCHS,
                         learning_rate: float = ROUTER_FIT_LEARNING_RATE, seed: int = 0) -> dict:
    """Measures the skip costs of `token_blocks` ([blocks, block_size]) and fits each deciding router to send on the
    top capacity-fraction of every block by skip cost, among the tokens the previous deciding step sends on (the
    hierarchy of training's top-k). Returns, per step, the tokens it was fitted on and the accuracy (at logit 0) of
    the router before and after the fit, with that of the best constant answer, and the fit's last loss."""
    features, costs = measure_skip_costs(model, token_blocks, batch_size)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    active = torch.ones_like(next(iter(costs.values())), dtype=torch.bool)
    every_token = active.clone()
    for step, router in model.decision_routers().items():
        continues = hierarchical_top_k(costs[step], active, every_token, model.config, step)
        # Eval asks this router only about the tokens the earlier steps sent on.
        inputs, targets = features[step][active.flatten()], continues[active].float()
        active = continues
        parameter = next(router.parameters())
        targets = targets.to(parameter.device)
        # Standardized channels (the residual stream has a few huge ones) fit at one learning rate; the scale is
        # folded into the router's first linear layer afterwards, so the router still reads raw hidden states.
        scale = inputs.std(0).clamp_min(1e-6).to(parameter)
        standardized = inputs.to(parameter) / scale
        first_linear = router.scorer if isinstance(router.scorer, torch.nn.Linear) else router.scorer[0]

        def accuracy() -> float:
            return ((router(standardized).squeeze(-1) > 0).float() == targets).float().mean().item()

        with torch.no_grad():
            first_linear.weight.mul_(scale)
            accuracy_before = accuracy()
        optimizer = torch.optim.AdamW(router.parameters(), lr=learning_rate, weight_decay=0.0)
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc=f"fitting the router of recursion step {step + 1}"):
                for indices in torch.randperm(len(standardized), generator=generator).split(ROUTER_FIT_BATCH_TOKENS):
                    indices = indices.to(parameter.device)
                    logits = router(standardized[indices]).squeeze(-1).float()
                    loss = F.binary_cross_entropy_with_logits(logits, targets[indices])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            accuracy_after = accuracy()
            loss = F.binary_cross_entropy_with_logits(router(standardized).squeeze(-1).float(), targets).item()
            first_linear.weight.div_(scale)
            router.zero_grad(set_to_none=True)
        share = targets.mean().item()
        report[str(step)] = {"tokens": int(targets.numel()), "accuracy_before": round(accuracy_before, 4),
                             "accuracy_after": round(accuracy_after, 4),
                             "constant_accuracy": round(max(share, 1 - share), 4), "loss": round(loss, 4)}
    return report


ROUTER_FIT_FILE = "router_fit.json"


class RouterFitStage(TrainerCallback):
    """`--router-fit-at F` below 1: the fit runs once inside training, at the end of the optimizer step that spends F
    of the run's budget (`TrainingBudget.spent_fraction`; the fit's own minutes count in a time budget, as the
    hour of a recipe does), and from the next step on the fitted routers choose who takes each step in training too
    (`router_selection="auxiliary"`), so that the rest of the run teaches the model the routing it will be served
    with: tokens that continue learn to attend over the tokens the fitted routers keep.

    Every checkpoint saved after the fit holds its report (`router_fit.json`); a run resumed from one goes on with the
    fitted routers choosing, without fitting again (Trainer restores the weights, this restores the choice). A
    checkpoint saved before the fit says that one is still to come (`{"pending_at": F}`), which is how mor-uptrain's
    default tells a run that fits from one begun without a fit. It runs before `MoveIntoPlaceAtFirstCheckpoint`, so
    the file is part of the checkpoint that moves into place."""

    def __init__(self, model, token_blocks: torch.LongTensor, at: float, batch_size: int = 4,
                 resume_checkpoint: str | None = None):
        self.model = model
        self.token_blocks = token_blocks
        self.at = at
        self.batch_size = batch_size
        self.budget = None  # the run's `TrainingBudget`, once the trainer exists
        self.report = None
        saved = Path(resume_checkpoint) / ROUTER_FIT_FILE if resume_checkpoint else None
        if saved is not None and saved.is_file():
            report = json.loads(saved.read_text())
            if "pending_at" not in report:
                self.report = report
                model.config.router_selection = "auxiliary"

    def on_step_end(self, args, state, control, **kwargs):
        if self.report is not None or self.budget.spent_fraction() < self.at:
            return
        self.report = fit_decision_routers(self.model, self.token_blocks, self.batch_size)
        self.report["at_step"] = state.global_step
        self.model.config.router_selection = "auxiliary"
        print(f"router fit at step {state.global_step}: {describe_router_fit(self.report)}; the fitted routers choose "
              f"in training from here on")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            saved = self.report if self.report is not None else {"pending_at": self.at}
            (checkpoint / ROUTER_FIT_FILE).write_text(json.dumps(saved, indent=2) + "\n")


def describe_router_fit(report: dict) -> str:
    return ", ".join(f"step {int(step) + 1}'s router tells the costliest tokens from the rest on {fit['tokens']:,} "
                     f"tokens with accuracy {fit['accuracy_before']:.1%} -> {fit['accuracy_after']:.1%} (a constant "
                     f"answer: {fit['constant_accuracy']:.1%})"
                     for step, fit in report.items() if step.isdigit())

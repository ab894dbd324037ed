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

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import TrainerCallback

from modeling_mor.routing_mor import hierarchical_top_k

from ..measure import full_depth, stopped_before


# When the fit runs by default, as a share of the training budget: measured best of 0.3, 0.5 and after training
# (docs/conversion.md#router-fit).
DEFAULT_ROUTER_FIT_AT = 0.5
ROUTER_FIT_EPOCHS = 40
ROUTER_FIT_LEARNING_RATE = 1e-3
ROUTER_FIT_BATCH_TOKENS = 512


def check_router_fit(config) -> None:
    """Refuses a model the stage cannot fit (ValueError, one line naming the fix)."""
    if getattr(config, "model_type", None) != "mor" or config.routing != "expert_choice" or min(config.capacity) >= 1.0:
        raise ValueError("--router-fit-tokens fits the routers that decide who takes an expert-choice recursion step: "
                         "this model has none (it needs routing expert_choice and a capacity below 1); nothing was "
                         "written. Fix: leave --router-fit-tokens out.")
    if config.router_inference != "auxiliary":
        raise ValueError("--router-fit-tokens fits the deciding routers, and with router_inference "
                         f"{config.router_inference!r} they also set the gates of the tokens that continue, which the "
                         "fit would change; nothing was written. Fix: convert with --router-inference auxiliary (the "
                         "default), or leave --router-fit-tokens out.")


@torch.no_grad()
def estimated_fit_seconds(model, token_blocks: torch.LongTensor, batch_size: int = 4) -> float:
    """What `fit_decision_routers` will take on `token_blocks`, from the time of one forward pass of a batch (the
    second of two; the first warms up): one at full depth and one per deciding step for every batch, plus a tenth
    for the fit itself."""
    was_training = model.training
    model.eval()
    batch = token_blocks[:batch_size].to(model.device)
    try:
        for _ in range(2):
            started = time.perf_counter()
            with full_depth(model):
                model(batch, use_cache=False)
            seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    num_batches = math.ceil(len(token_blocks) / batch_size)
    return 1.1 * seconds * num_batches * (1 + len(model.decision_routers()))


@torch.no_grad()
def measure_skip_costs(model, token_blocks: torch.LongTensor, batch_size: int = 4, desc: str = "skip costs"):
    """For each deciding recursion step: the hidden states its router reads ([tokens, hidden]) and every token's skip
    cost there ([blocks, block_size]), KL(full depth || stopped before the step) of the model's next-token
    distributions, both measured in eval mode."""
    was_training = model.training
    model.eval()
    routers = model.decision_routers()
    features = {step: [] for step in routers}
    costs = {step: [] for step in routers}
    recorded = []
    hooks = [router.register_forward_hook(lambda module, inputs, output: recorded.append(inputs[0].detach()))
             for router in routers.values()]
    try:
        for batch in tqdm(token_blocks.split(batch_size), desc=desc):
            batch = batch.to(model.device)
            with full_depth(model):
                full = model(batch, use_cache=False).logits.float().log_softmax(-1)
            for step in routers:
                recorded.clear()
                with stopped_before(model, step):
                    stopped = model(batch, use_cache=False).logits.float().log_softmax(-1)
                # The deciding router of `step` is the only one called with every token before it.
                features[step].append(recorded[-1].flatten(0, 1).float().cpu())
                costs[step].append((full.exp() * (full - stopped)).sum(-1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return ({step: torch.cat(values) for step, values in features.items()},
            {step: torch.cat(values) for step, values in costs.items()})


def fit_decision_routers(model, token_blocks: torch.LongTensor, batch_size: int = 4, epochs: int = ROUTER_FIT_EPOCHS,
                         learning_rate: float = ROUTER_FIT_LEARNING_RATE, seed: int = 0) -> dict:
    """Measures the skip costs of `token_blocks` ([blocks, block_size]) and fits each deciding router to pick the
    top capacity-fraction of every block by skip cost. Returns, per step, the share of the tokens the fitted router
    and the router before the fit send on (at logit 0) that are among them, and the fit's last loss."""
    features, costs = measure_skip_costs(model, token_blocks, batch_size)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for step, router in model.decision_routers().items():
        step_costs = costs[step]
        everyone = torch.ones_like(step_costs, dtype=torch.bool)
        continues = hierarchical_top_k(step_costs, everyone, everyone, model.config, step).flatten().float()
        inputs = features[step]
        # Standardized channels (the residual stream has a few huge ones) fit at one learning rate; the scale is
        # folded into the router's first linear layer afterwards, so the router still reads raw hidden states.
        scale = inputs.std(0).clamp_min(1e-6)
        first_linear = router.scorer if isinstance(router.scorer, torch.nn.Linear) else router.scorer[0]
        parameter = next(router.parameters())
        with torch.no_grad():
            first_linear.weight.mul_(scale.to(parameter))
            agreement_before = ((router(inputs.to(parameter) / scale.to(parameter)).squeeze(-1) > 0).float()
                                == continues).float().mean().item()
        optimizer = torch.optim.AdamW(router.parameters(), lr=learning_rate, weight_decay=0.0)
        standardized = (inputs / scale).to(parameter)
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc=f"fitting the router of recursion step {step + 1}"):
                for indices in torch.randperm(len(standardized), generator=generator).split(ROUTER_FIT_BATCH_TOKENS):
                    logits = router(standardized[indices]).squeeze(-1).float()
                    loss = F.binary_cross_entropy_with_logits(logits, continues[indices])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            logits = router(standardized).squeeze(-1).float()
            agreement = ((logits > 0).float() == continues).float().mean().item()
            first_linear.weight.div_(scale.to(parameter))
            router.zero_grad(set_to_none=True)
        report[str(step)] = {"tokens": int(continues.numel()), "agreement_before": round(agreement_before, 4),
                             "agreement_after": round(agreement, 4),
                             "loss": round(F.binary_cross_entropy_with_logits(logits, continues).item(), 4)}
    return report


class RouterFitStage(TrainerCallback):
    """`--router-fit-at F` below 1: the fit runs once inside training, at the end of the optimizer step that spends F
    of the run's budget (`TrainingBudget.spent_fraction`), and from the next step on the fitted routers choose who
    takes each step in training too (`router_selection="auxiliary"`), so that the rest of the run teaches the model
    the routing it will be served with: tokens that continue learn to attend over the tokens the fitted routers keep."""

    def __init__(self, trainer, token_blocks: torch.LongTensor, at: float, batch_size: int = 4):
        self.trainer = trainer
        self.token_blocks = token_blocks
        self.at = at
        self.batch_size = batch_size
        self.report = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.report is not None or self.trainer.budget.spent_fraction() < self.at:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.report = fit_decision_routers(model, self.token_blocks, self.batch_size)
        self.report["at_step"] = state.global_step
        model.config.router_selection = "auxiliary"
        print(f"router fit at step {state.global_step}: {describe_router_fit(self.report)}; the fitted routers choose "
              f"in training from here on")


def describe_router_fit(report: dict) -> str:
    return ", ".join(f"step {int(step) + 1} picks the costliest tokens {fit['agreement_before']:.1%} -> "
                     f"{fit['agreement_after']:.1%} right ({fit['tokens']:,} tokens)"
                     for step, fit in report.items() if step.isdigit())

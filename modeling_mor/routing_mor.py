"""MoR routing: who continues to the next recursion step, with which gate weight, and the router losses.

Everything about routing lives here; the recursion loop in `modeling_mor.py` only asks a router for a decision and
applies `apply_gate`.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_mor import MoRConfig


class MoRRouter(nn.Module):
    """A small scorer on hidden states: linear, or a two-layer MLP."""

    def __init__(self, config: MoRConfig, num_outputs: int, bias: bool = False):
        super().__init__()
        if config.router_type == "linear":
            self.scorer = nn.Linear(config.hidden_size, num_outputs, bias=bias)
        else:
            self.scorer = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size // 2, bias=False),
                nn.GELU(),
                nn.Linear(config.hidden_size // 2, num_outputs, bias=bias),
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.scorer(hidden_states)

    @property
    def output_layer(self) -> nn.Linear:
        return self.scorer if isinstance(self.scorer, nn.Linear) else self.scorer[-1]

    @torch.no_grad()
    def set_constant_output_(self, logit: float = 0.0) -> None:
        """Makes every logit `logit` (0: a neutral gate under "update" gating); gradients still flow."""
        self.output_layer.weight.zero_()
        if self.output_layer.bias is not None:
            self.output_layer.bias.fill_(logit)


def apply_gate(config: MoRConfig, hidden_states, block_output, gate):
    """The routed update of a token that takes the step (or, for token-choice, its final output).

    "output" gating is the paper's H + g * f(H); "update" gating scales the block's update f(H) - H by a weight that
    is exactly 1 for a zero router logit, so a converted checkpoint starts as the tied recursive model.
    """
    gate = gate.unsqueeze(-1).to(hidden_states.dtype)
    if config.gating == "output":
        return hidden_states + gate * block_output
    return hidden_states + gate * (block_output - hidden_states)


def hierarchical_top_k(scores, active, token_valid, config: MoRConfig, step: int, sequence_index=None):
    """Training-time expert choice: among the `active` tokens of each sequence, keep the top k_r = ceil(capacity_r *
    T) by score (T = the sequence's real tokens). A sequence is a batch row, or one of the documents a padding-free
    row packs (`sequence_index`, [batch, seq]: 0, 0, 1, 1, 1, ... as transformers' `find_packed_sequence_indices`
    gives it), so packing documents in one row selects exactly what padding them into rows does. Tokens outside
    `active` can never be selected again."""
    if sequence_index is None:
        sequence_index, num_sequences = torch.zeros_like(active, dtype=torch.long), 1
    else:
        num_sequences = int(sequence_index.max()) + 1
    per_sequence = torch.zeros(active.shape[0], num_sequences, dtype=torch.long, device=active.device)
    num_tokens = per_sequence.scatter_add(-1, sequence_index, token_valid.long())
    top_k = torch.ceil(num_tokens.to(torch.float64) * config.capacity[step] - 1e-6).long().gather(-1, sequence_index)
    masked_scores = scores.detach().float().masked_fill(~active, float("-inf"))
    order = masked_scores.argsort(dim=-1, descending=True, stable=True)
    # A stable sort by sequence keeps the score order inside each sequence.
    order = order.gather(-1, sequence_index.gather(-1, order).argsort(dim=-1, stable=True))
    sorted_position = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    sequence_sizes = per_sequence.scatter_add(-1, sequence_index, torch.ones_like(sequence_index))
    sequence_offset = (sequence_sizes.cumsum(-1) - sequence_sizes).gather(-1, sequence_index)
    rank = torch.empty_like(order).scatter_(-1, order, sorted_position) - sequence_offset
    return (rank < top_k) & active


# sigmoid(1) = 0.73: above the default threshold, so every token continues, yet close enough to it that a short
# uptraining (a few hundred optimizer steps) can teach the auxiliary routers when to stop.
FULL_DEPTH_LOGIT = 1.0


class ExpertChoiceRouting(nn.Module):
    """One router per recursion step; each step keeps the tokens it scores highest (MOR_SPEC section 2)."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.config = config
        self.routers = nn.ModuleList([MoRRouter(config, 1) for _ in range(config.num_recursions)])
        if config.router_inference == "auxiliary":
            # Only steps that make a decision (capacity < 1) need one; keys are the step numbers.
            # They only decide (no gate), so they carry a bias: a converted model can start with every token continuing.
            self.auxiliary_routers = nn.ModuleDict(
                {str(step): MoRRouter(config, 1, bias=True) for step, fraction in enumerate(config.capacity) if fraction < 1.0}
            )

    @torch.no_grad()
    def start_from_recursive_model_(self) -> None:
        """For a freshly converted model: every gate exactly neutral, and, with auxiliary routers, every token
        continuing to full depth in eval mode, so the model starts as the tied recursive model. Uptraining then
        teaches the routers (with threshold inference the zero logit sits at the threshold: tokens stop at step 1)."""
        for router in self.routers:
            router.set_constant_output_(0.0)
        for router in getattr(self, "auxiliary_routers", {}).values():
            router.set_constant_output_(FULL_DEPTH_LOGIT)

    def decision_routers(self) -> dict[int, MoRRouter]:
        """The router whose logit decides, in eval mode, who takes each deciding step (capacity < 1), by step: the
        auxiliary router with `router_inference="auxiliary"` (it only decides), else the step's own router (whose
        logit also sets the gate)."""
        auxiliary = getattr(self, "auxiliary_routers", None)
        return {
            step: auxiliary[str(step)] if auxiliary is not None else self.routers[step]
            for step, fraction in enumerate(self.config.capacity)
            if fraction < 1.0
        }

    def gate_from_logits(self, logits):
        activation = torch.sigmoid if self.config.router_activation == "sigmoid" else torch.tanh
        if self.config.gating == "output":
            return self.config.router_alpha * activation(logits.float())
        neutral = activation(torch.zeros((), device=logits.device))
        return 1.0 + self.config.router_alpha * (activation(logits.float()) - neutral)

    def forward(self, hidden_states, active, token_valid, step: int, sequence_index=None):
        """Decides which of the `active` tokens take recursion step `step` (0-based); `sequence_index` tells the
        documents of a padding-free packed row apart (see `hierarchical_top_k`).

        Returns `selected` ([batch, seq] bool), the gate weight of every token ([batch, seq] float32) and a dict of
        this step's (unweighted) router losses.
        """
        logits = self.routers[step](hidden_states).squeeze(-1).float()
        losses = {}
        if self.config.capacity[step] >= 1.0:
            # A full-capacity step makes no decision: every token still active takes it.
            selected = active
        elif self.training:
            selects_by_auxiliary = self.config.router_selection == "auxiliary"
            if self.config.router_inference == "auxiliary":
                # A selecting auxiliary router is fitted elsewhere and gets no loss here: no graph for it.
                with torch.set_grad_enabled(torch.is_grad_enabled() and not selects_by_auxiliary):
                    auxiliary_logits = self.auxiliary_routers[str(step)](hidden_states.detach()).squeeze(-1).float()
            selection_logits = auxiliary_logits if selects_by_auxiliary else logits
            selected = hierarchical_top_k(selection_logits, active, token_valid, self.config, step, sequence_index)
            # BCE teaches the router to predict, causally, what top-k decided, so eval can route token by token.
            target = selected[active].float()
            losses["router_aux_loss"] = F.binary_cross_entropy_with_logits(logits[active], target)
            if self.config.router_inference == "auxiliary" and not selects_by_auxiliary:
                losses["router_aux_loss"] = losses["router_aux_loss"] + F.binary_cross_entropy_with_logits(
                    auxiliary_logits[active], target
                )
        else:
            if self.config.router_inference == "auxiliary":
                decision_logits = self.auxiliary_routers[str(step)](hidden_states).squeeze(-1).float()
            else:
                decision_logits = logits
            selected = active & (torch.sigmoid(decision_logits) > self.config.router_threshold)
        if self.training and self.config.router_z_loss_coef > 0:
            losses["router_z_loss"] = logits[active].pow(2).mean()
        return selected, self.gate_from_logits(logits), losses


class TokenChoiceRouting(nn.Module):
    """One router before the recursions picks each token's depth (MOR_SPEC section 2)."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.config = config
        self.router = MoRRouter(config, config.num_recursions)
        # Loss-free balancing: a bias used for selection only, nudged towards an even load during training.
        self.register_buffer("selection_bias", torch.zeros(config.num_recursions), persistent=True)

    @torch.no_grad()
    def start_from_recursive_model_(self) -> None:
        """For a freshly converted model: uniform probabilities, so every gate is exactly neutral (every token then
        takes depth 1 until uptraining teaches the router)."""
        self.router.set_constant_output_(0.0)
        self.selection_bias.zero_()

    def forward(self, hidden_states, token_valid):
        """Returns the depth of every token ([batch, seq] long, 0 for padding), its gate weight and the losses."""
        logits = self.router(hidden_states).float()
        probabilities = logits.softmax(dim=-1)
        selection_scores = probabilities
        if self.config.balancing == "loss_free":
            selection_scores = probabilities + self.selection_bias
        choice = selection_scores.argmax(dim=-1)
        depth = torch.where(token_valid, choice + 1, torch.zeros_like(choice))
        chosen_probability = probabilities.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        if self.config.gating == "output":
            gate = self.config.router_alpha * chosen_probability
        else:
            gate = 1.0 + self.config.router_alpha * (chosen_probability - 1.0 / self.config.num_recursions)

        losses = {}
        if self.training:
            valid_probabilities = probabilities[token_valid]
            load = F.one_hot(choice[token_valid], self.config.num_recursions).float().mean(0)
            if self.config.balancing == "loss":
                losses["balance_loss"] = self.config.num_recursions * (load * valid_probabilities.mean(0)).sum()
            else:
                with torch.no_grad():
                    self.selection_bias += self.config.balance_update_rate * torch.sign(load.mean() - load)
            if self.config.router_z_loss_coef > 0:
                losses["router_z_loss"] = torch.logsumexp(logits[token_valid], dim=-1).pow(2).mean()
        return depth, gate, losses


def steps_every_token_takes(config: MoRConfig) -> int:
    """How many leading recursion steps every token takes, whatever its hidden state: all of them without routing,
    the first for token-choice (depths start at 1), and for expert-choice the leading full-capacity steps (a step of
    capacity 1 makes no decision). Attention at these steps runs over every token, as in a vanilla model."""
    if config.routing == "none":
        return config.num_recursions
    if config.routing == "token_choice":
        return 1
    full_steps = 0
    while full_steps < config.num_recursions and config.capacity[full_steps] >= 1.0:
        full_steps += 1
    return full_steps


def build_routing(config: MoRConfig) -> nn.Module | None:
    if config.routing == "expert_choice":
        return ExpertChoiceRouting(config)
    if config.routing == "token_choice":
        return TokenChoiceRouting(config)
    return None


ROUTER_LOSS_COEFFICIENTS = {
    "router_aux_loss": "router_aux_loss_coef",
    "balance_loss": "balance_loss_coef",
    "router_z_loss": "router_z_loss_coef",
}

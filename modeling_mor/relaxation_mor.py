"""Depth-specific relaxation of the shared layers (Relaxed Recursive Transformers; MOR_SPEC section 5).

With `config.relaxation_rank > 0`, every linear projection of a shared layer carries, for each recursion step, a
low-rank delta `B_r A_r`, and every RMSNorm a per-step weight delta, so the layer computes `W + B_r A_r` at step r.
Conversion initializes the deltas from the truncated SVD of (original layer weight - shared weight): at full rank the
converted model is the source model again.

A delta whose rank is the projection's full rank (the smaller of its two sizes; `--relaxation-rank full` gives every
projection one) is a weight of its own: such a projection stores its per-step weights merged, the first step's as the
shared weight `W` itself and every later step's as the difference to it, `relaxation_delta[r - 1] = W_r - W`. It then
holds exactly the parameters of the separate layers it replaces (a full-rank conversion has its source's count, not
one more layer per shared layer) and runs one matmul per projection at every step, where two factors would cost two
more and store twice as much.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class RelaxedLinear(nn.Linear):
    """A shared linear layer plus one delta per recursion step: `y = x (W + B_r A_r)^T + b + db_r`; or, with a
    full-rank delta (`is_dense`), the step's own weight, `W` at the first step and `W + D_r` at a later one."""

    def __init__(self, in_features, out_features, bias, num_steps: int, rank: int):
        super().__init__(in_features, out_features, bias=bias)
        # A delta of a matrix never needs more than its smaller side's rank ("full" relaxation asks for hidden_size).
        rank = min(rank, in_features, out_features)
        self.rank = rank
        self.num_steps = num_steps
        self.is_dense = rank == min(in_features, out_features)
        if self.is_dense:
            # The first step runs on `weight` itself: only the later steps store a difference.
            self.relaxation_delta = nn.Parameter(torch.zeros(num_steps - 1, out_features, in_features))
        else:
            self.relaxation_A = nn.Parameter(torch.zeros(num_steps, rank, in_features))
            self.relaxation_B = nn.Parameter(torch.zeros(num_steps, out_features, rank))
        self.relaxation_bias = nn.Parameter(torch.zeros(num_steps, out_features)) if bias else None

    def step_weight(self, recursion_step: int) -> torch.Tensor:
        """The weight a full-rank (`is_dense`) projection runs at `recursion_step`."""
        return self.weight if recursion_step == 0 else self.weight + self.relaxation_delta[recursion_step - 1]

    def forward(self, input: torch.Tensor, recursion_step: int | None = None) -> torch.Tensor:
        if recursion_step is None:
            return F.linear(input, self.weight, self.bias)
        if self.is_dense:
            output = F.linear(input, self.step_weight(recursion_step), self.bias)
        else:
            output = F.linear(input, self.weight, self.bias) + F.linear(
                F.linear(input, self.relaxation_A[recursion_step]), self.relaxation_B[recursion_step]
            )
        if self.relaxation_bias is not None:
            output = output + self.relaxation_bias[recursion_step]
        return output

    @torch.no_grad()
    def init_from_target(self, recursion_step: int, target_weight: torch.Tensor, target_bias=None) -> None:
        """Makes step `recursion_step` compute `target_weight` (and `target_bias`) as closely as its delta allows: the
        best rank-`rank` approximation of (target - shared weight); a full-rank projection's step runs the target
        itself (the first step's becomes the shared weight, the later steps' differences kept as they were)."""
        if self.relaxation_bias is not None and target_bias is not None:
            self.relaxation_bias[recursion_step] = target_bias - self.bias
        if self.is_dense:
            target = target_weight.to(self.weight.device, torch.float32)
            if recursion_step == 0:
                # The later steps' weights stay where they were.
                kept = self.relaxation_delta.float() + (self.weight.float() - target)
                self.relaxation_delta.copy_(kept.to(self.relaxation_delta.dtype))
                self.weight.copy_(target.to(self.weight.dtype))
            else:
                self.relaxation_delta[recursion_step - 1] = (target - self.weight.float()).to(self.relaxation_delta.dtype)
            return
        difference = (target_weight.float() - self.weight.float()).to(self.weight.device)
        left, singular_values, right = torch.linalg.svd(difference, full_matrices=False)
        rank = min(self.rank, singular_values.numel())
        self.relaxation_A[recursion_step].zero_()
        self.relaxation_B[recursion_step].zero_()
        # Split the singular values evenly between the factors so neither grows large.
        scale = singular_values[:rank].sqrt()
        self.relaxation_B[recursion_step, :, :rank] = (left[:, :rank] * scale).to(self.relaxation_B.dtype)
        self.relaxation_A[recursion_step, :rank] = (scale.unsqueeze(-1) * right[:rank]).to(self.relaxation_A.dtype)

    def extra_repr(self) -> str:
        dense = " (per-step weights)" if self.is_dense else ""
        return f"{super().extra_repr()}, relaxation_rank={self.rank}{dense}, steps={self.num_steps}"


class RelaxedRMSNorm(LlamaRMSNorm):
    """A shared RMSNorm plus a per-step weight delta."""

    def __init__(self, hidden_size, eps, num_steps: int):
        super().__init__(hidden_size, eps=eps)
        self.relaxation_weight = nn.Parameter(torch.zeros(num_steps, hidden_size))

    def forward(self, hidden_states: torch.Tensor, recursion_step: int | None = None) -> torch.Tensor:
        if recursion_step is None:
            return super().forward(hidden_states)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight + self.relaxation_weight[recursion_step]) * hidden_states.to(input_dtype)

    @torch.no_grad()
    def init_from_target(self, recursion_step: int, target_weight: torch.Tensor) -> None:
        self.relaxation_weight[recursion_step] = target_weight - self.weight


def relax_layer_(layer: nn.Module, num_steps: int, rank: int) -> None:
    """Replaces a freshly built decoder layer's projections and norms by their relaxed versions (same names, so
    checkpoints, conversion and PEFT target the same modules)."""
    for parent in (layer.self_attn, layer.mlp):
        for name, module in list(parent.named_children()):
            if isinstance(module, nn.Linear):
                relaxed = RelaxedLinear(module.in_features, module.out_features, module.bias is not None, num_steps, rank)
                setattr(parent, name, relaxed)
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(layer, name)
        setattr(layer, name, RelaxedRMSNorm(norm.weight.shape[0], norm.variance_epsilon, num_steps))

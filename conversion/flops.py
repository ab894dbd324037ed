"""Training FLOPs of a model, counted from the recursion depths its tokens actually take.

A forward plus backward pass costs, per token (the 6N rule of Kaplan et al., 2020, "Scaling Laws for Neural Language
Models", with its attention term counted causally):

    6 * (the parameters the token is multiplied with: every layer it passes through, each time it passes it; the
         routers that decide about it; the final norm and the LM head)
    + 12 * d_attn * (the keys it attends to, summed over the layer applications it takes)

- Layers: a vanilla model's L layers; an MoR model's unshared first and last layers (middle_* strategies) once, and
  the B shared layers once per recursion step the token takes (its depth). A relaxed shared layer's per-step deltas
  count once per step: one step uses 1 / N_r of them.
- Routers: an expert-choice step's router (and auxiliary router) for every token still active before that step (the
  tokens it decides about); the token-choice router for every token.
- Attention: d_attn = num_attention_heads * head_dim; a query at sequence position t attends to the keys at positions
  <= t that its layer holds: every real token in a vanilla or unshared layer; at recursion step r, the tokens that
  take step r (recursion-wise KV) or, under KV sharing, the tokens that took step 1 (a deeper step then reuses step
  1's keys and values: it computes queries only, so its K and V projections are not counted either). QK^T and the
  weighted sum of the values cost 2 * d_attn FLOPs per key each in the forward pass, times 3 with the backward pass.
- Not counted: the input embedding (a lookup), elementwise work (norm arithmetic, activations, softmax, rotary,
  gates), and recomputation by gradient checkpointing (these are model FLOPs, not hardware FLOPs). Kernels that
  compute full attention squares or padded rows do more work than this ideal count.

Since routed tokens skip recursion steps, the count differs between routed and unrouted models of the same shape:
that is what makes equal-compute comparisons possible.
"""

import math

import torch


def _num_parameters(module, exclude=()) -> int:
    if module is None:
        return 0
    return sum(parameter.numel() for name, parameter in module.named_parameters() if not name.endswith(exclude))


RELAXATION_PARAMETERS = ("relaxation_A", "relaxation_B", "relaxation_bias", "relaxation_weight")
# A full-rank delta stored whole is added to the shared weight before the product: it costs no multiplication per token.
MERGED_RELAXATION_PARAMETERS = ("relaxation_delta",)


def _step_parameters(module, num_recursions: int) -> float:
    """The parameters of a shared module that one recursion step multiplies each token with: the shared weights, and
    its own one of the N_r per-step low-rank relaxation deltas (relaxation_mor.py stacks them, one per step)."""
    shared = _num_parameters(module, exclude=RELAXATION_PARAMETERS + MERGED_RELAXATION_PARAMETERS)
    per_step = _num_parameters(module, exclude=MERGED_RELAXATION_PARAMETERS) - shared
    return shared + per_step / num_recursions


class FlopCounter:
    """Counts the training FLOPs (forward + backward) of batches of a model, from the tokens' recursion depths.

    Built from the model's own modules, so that every layout counts right: vanilla Llama, the four sharing strategies,
    expert- and token-choice routing, auxiliary routers, MLP routers, relaxation. See the module docstring for the
    rule."""

    def __init__(self, model):
        config = model.config
        base = getattr(model, model.base_model_prefix, model)
        self.config = config
        self.is_mor = getattr(config, "model_type", None) == "mor"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_width = config.num_attention_heads * head_dim
        head = model.get_output_embeddings()
        self.head_parameters = (head.weight.numel() if head is not None else 0) + _num_parameters(base.norm)
        if not self.is_mor:
            # Every layer of a vanilla model is applied once to every token.
            self.end_layer_parameters = sum(_num_parameters(layer) for layer in base.layers)
            self.num_end_layers = len(base.layers)
            return
        self.end_layer_parameters = _num_parameters(base.first_layer) + _num_parameters(base.last_layer)
        self.num_end_layers = 2 if config.has_unshared_ends else 0
        block = base.recursion_block
        self.num_recursions = config.num_recursions
        self.block_layers = len(block.layers)
        # One recursion step: the shared weights, and its own share of the per-step relaxation deltas.
        self.step_parameters = sum(_step_parameters(layer, config.num_recursions) for layer in block.layers)
        self.shared_key_values = config.kv_cache_policy == "shared"
        # Under KV sharing, steps after the first skip the K and V projections.
        self.key_value_parameters = sum(
            _step_parameters(projection, config.num_recursions)
            for layer in block.layers
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj)
        ) if self.shared_key_values else 0
        routing = block.routing
        self.token_router_parameters = 0
        self.step_router_parameters = [0] * config.num_recursions
        if config.routing == "token_choice":
            self.token_router_parameters = _num_parameters(routing.router)
        elif config.routing == "expert_choice":
            auxiliary = getattr(routing, "auxiliary_routers", {})
            self.step_router_parameters = [
                _num_parameters(router) + _num_parameters(auxiliary[str(step)] if str(step) in auxiliary else None)
                for step, router in enumerate(routing.routers)
            ]

    def batch_flops(self, token_valid: torch.Tensor, recursion_depth: torch.Tensor | None = None) -> float:
        """Training FLOPs of one forward + backward pass over a `[batch, seq]` batch: `token_valid` marks the real
        tokens (the attention mask), `recursion_depth` the steps each took (`output_recursion_depth=True`; required
        for MoR models, ignored otherwise)."""
        valid = token_valid.bool()
        num_tokens = int(valid.sum())
        flops = 6 * num_tokens * (self.end_layer_parameters + self.head_parameters)
        flops += 12 * self.attention_width * self.num_end_layers * _causal_keys(valid, valid)
        if not self.is_mor:
            return float(flops)
        if recursion_depth is None:
            raise ValueError("counting the FLOPs of an MoR model needs its recursion depths (output_recursion_depth=True)")
        flops += 6 * num_tokens * self.token_router_parameters
        entering = valid
        took_step_one = (recursion_depth > 0) & valid
        for step in range(self.num_recursions):
            active = (recursion_depth > step) & valid
            flops += 6 * int(entering.sum()) * self.step_router_parameters[step]
            keys = took_step_one if self.shared_key_values and step > 0 else active
            flops += self._step_flops(step, active, keys)
            entering = active
        return float(flops)

    def _step_flops(self, step: int, active: torch.Tensor, keys: torch.Tensor) -> int:
        """The block's layers at recursion step `step` (0-based) for the `active` tokens, attending to `keys`."""
        step_parameters = self.step_parameters - (self.key_value_parameters if step > 0 else 0)
        return (6 * int(active.sum()) * step_parameters
                + 12 * self.attention_width * self.block_layers * _causal_keys(active, keys))

    def block_wise_flops(self, token_valid: torch.Tensor) -> float:
        """Training FLOPs of a block-wise (teacher-forced) micro-batch: every shared layer at every recursion step,
        once per real token (its own forward and backward, on the source's hidden states, with recursion-wise keys),
        and nothing else: no end layer, router or head runs. The teacher's forward pass is not counted, as in
        distillation."""
        valid = token_valid.bool()
        # Step 0's cost at every step: each computes its own keys and values.
        return float(self.num_recursions * self._step_flops(0, valid, valid))

    def planned_batch_flops(self, batch_size: int, seq_len: int) -> float:
        """The FLOPs of a training batch of `batch_size` full sequences of `seq_len` tokens, for the depths training
        is expected to give: exact for vanilla models, routing "none" and expert-choice (its top-k keeps
        ceil(capacity_r * T) tokens per row at step r; with recursion-wise KV the count does not depend on which
        ones); for token-choice the even load its balancing aims at. Used to plan the number of steps of a FLOP
        budget (the learning-rate schedule's length); the budget itself is counted from the depths actually taken."""
        valid = torch.ones(batch_size, seq_len, dtype=torch.bool)
        depth = planned_recursion_depth(self.config, seq_len).expand(batch_size, seq_len) if self.is_mor else None
        return self.batch_flops(valid, depth)


def _causal_keys(queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Sum over the `queries` ([batch, seq] bool) of the number of `keys` at positions up to and including theirs."""
    return int((keys.long().cumsum(-1) * queries).sum())


def planned_recursion_depth(config, seq_len: int) -> torch.LongTensor:
    """`[1, seq_len]` recursion depths of one training sequence as training is expected to route it (see
    `FlopCounter.planned_batch_flops`). The tokens that go deeper are spread along the sequence (the golden-ratio
    sequence), so that the attention term under KV sharing, which depends on positions, is a typical one."""
    num_recursions = config.num_recursions
    if config.routing == "none" or config.sharing_strategy.endswith("sequence"):
        return torch.full((1, seq_len), num_recursions, dtype=torch.long)
    spread_order = torch.argsort(torch.tensor([(t * (math.sqrt(5) - 1) / 2) % 1.0 for t in range(seq_len)]))
    rank = torch.empty(seq_len, dtype=torch.long)
    rank[spread_order] = torch.arange(seq_len)
    if config.routing == "expert_choice":
        top_k = torch.tensor([config.expert_choice_top_k(step, seq_len) for step in range(num_recursions)])
        return (rank.unsqueeze(-1) < top_k).sum(-1).unsqueeze(0)
    # Token-choice: an even load over the depths 1..N_r.
    return (rank * num_recursions // seq_len + 1).unsqueeze(0)


def layer_applications(model, mean_depth: float | None = None) -> float:
    """Decoder-layer applications per token, the compute measure of the conversion recipe: a vanilla model's L layers;
    for an MoR model, its unshared end layers once and the block's layers at the tokens' `mean_depth` (middle_cycle
    and cycle; the sequence strategies cannot route, so every token takes every step), each shared layer costing what
    `FlopCounter` counts per recursion step against its shared weights (a low-rank relaxation delta adds the share of
    the matmuls its factors run; a full-rank one, merged into the weight, adds nothing). Relative to
    `config.num_hidden_layers` (the unrolled depth, the source's layer count for a conversion) it is the share of the
    source's compute a token spends in the layers."""
    config = model.config
    if getattr(config, "model_type", None) != "mor":
        return float(config.num_hidden_layers)
    if config.sharing_strategy.endswith("cycle"):
        if mean_depth is None:
            raise ValueError("the layer applications of a routed MoR model need the tokens' mean recursion depth")
        block = config.block_size * mean_depth
    else:
        block = config.num_hidden_layers - 2 * config.has_unshared_ends
    base = getattr(model, model.base_model_prefix, model)
    shared = _num_parameters(base.recursion_block.layers, exclude=RELAXATION_PARAMETERS + MERGED_RELAXATION_PARAMETERS)
    return 2 * config.has_unshared_ends + block * FlopCounter(model).step_parameters / shared

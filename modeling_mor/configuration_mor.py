"""MoR configuration: a Llama configuration plus the Mixture-of-Recursions fields."""

import math

import transformers
from huggingface_hub.dataclasses import strict
from packaging import version
from transformers.models.llama.configuration_llama import LlamaConfig


# transformers' versions this code is tested with, checked at import so that an unsupported one fails here with a clear
# message instead of deep inside a forward pass. The configuration (and routing_mor.py, which needs nothing more)
# runs on an older floor than the model: vLLM's plugin (integrations/vllm) imports them under the transformers that
# vLLM pins, and a checkpoint's remote-code config must load there too. modeling_mor.py checks the model's own floor.
CONFIG_MIN_TRANSFORMERS_VERSION = "5.16.1"
MIN_TRANSFORMERS_VERSION = "5.24.0"  # the model, the cache and the serving engine
MAX_TRANSFORMERS_VERSION = "6.0.0"  # exclusive


def check_transformers_version(minimum: str, maximum: str = MAX_TRANSFORMERS_VERSION, needed_by: str = "MoR model code"):
    """Raises an ImportError naming the installed transformers, the range `needed_by` needs, and the fix."""
    if not version.parse(minimum) <= version.parse(transformers.__version__) < version.parse(maximum):
        raise ImportError(
            f"The {needed_by} needs transformers>={minimum},<{maximum}, but transformers {transformers.__version__} "
            f"is installed. Fix: pip install 'transformers>={minimum},<{maximum}'"
        )


check_transformers_version(CONFIG_MIN_TRANSFORMERS_VERSION, needed_by="MoR configuration")

SHARING_STRATEGIES = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTINGS = ("expert_choice", "token_choice", "none")
ROUTER_TYPES = ("linear", "mlp")
ROUTER_ACTIVATIONS = ("sigmoid", "tanh")
ROUTER_INFERENCE = ("threshold", "auxiliary")
ROUTER_SELECTIONS = ("gating", "auxiliary")
BALANCING = ("loss", "loss_free")
GATINGS = ("output", "update")
KV_CACHE_POLICIES = ("recursion_wise", "shared")


def recursion_block_size(num_hidden_layers: int, num_recursions: int, sharing_strategy: str) -> int | None:
    """Number of shared layers B for an unrolled depth L, or None when L does not fit the strategy."""
    if num_recursions < 1:
        return None
    recursed_layers = num_hidden_layers - 2 if sharing_strategy.startswith("middle_") else num_hidden_layers
    if recursed_layers < num_recursions or recursed_layers % num_recursions != 0:
        return None
    return recursed_layers // num_recursions


def valid_recursion_layouts(num_hidden_layers: int) -> list[tuple[str, int]]:
    """Every (sharing_strategy, num_recursions) pair with N_r >= 2 that an L-layer model can be unrolled into."""
    return [
        (strategy, num_recursions)
        for strategy in SHARING_STRATEGIES
        for num_recursions in range(2, num_hidden_layers + 1)
        if recursion_block_size(num_hidden_layers, num_recursions, strategy) is not None
    ]


# Llama's tensor-parallel plan of one decoder layer (its `layers.*.` prefix removed): MoR's layers are Llama's.
_LLAMA_LAYER_TP_PLAN = {
    name.removeprefix("layers.*."): style
    for name, style in LlamaConfig.base_model_tp_plan.items()
    if name.startswith("layers.*.")
}


def _check_choice(field: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"MoRConfig.{field}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


@strict
class MoRConfig(LlamaConfig):
    r"""
    Configuration of a Mixture-of-Recursions model. Every Llama field keeps its Llama meaning;
    `num_hidden_layers` is the unrolled depth L (the number of layer applications), not the number of unique layers.

    MoR fields:
        num_recursions (`int`): N_r, how many times the recursion block is applied.
        sharing_strategy (`str`): "cycle", "sequence", "middle_cycle" (default) or "middle_sequence"; the middle_*
            strategies keep the first and last layers unshared.
        routing (`str`): "expert_choice" (default), "token_choice" or "none" (plain recursive model). Routing needs a
            cycle strategy, since it decides per recursion step.
        capacity (`list[float]`): expert-choice fraction of the sequence kept by each step, non-increasing in (0, 1].
            Defaults to (N_r - r + 1) / N_r.
        router_type (`str`): "linear" or "mlp".
        router_activation (`str`): G in g = alpha * G(logit): "sigmoid" or "tanh".
        router_alpha (`float`): alpha; defaults to 0.1 for expert-choice and 1.0 for token-choice.
        router_threshold (`float`): eval-mode expert-choice rule: a token continues iff sigmoid(logit) > threshold.
        router_inference (`str`): which logit eval uses for that rule: "threshold" (the router's own, trained by the
            BCE auxiliary loss) or "auxiliary" (a separate router trained by BCE on detached inputs).
        router_selection (`str`): whose scores expert-choice top-k ranks in training: "gating" (the step's own
            router, the paper's; the auxiliary router learns to predict its choice) or "auxiliary" (the auxiliary
            router, fitted elsewhere, e.g. to the skip cost by `mor-uptrain --router-fit-at`, so that training routes
            as eval will; it gets no BCE loss then). Needs router_inference "auxiliary".
        router_aux_loss_coef (`float`): weight of the expert-choice BCE loss.
        balancing (`str`): token-choice load balancing: "loss" (auxiliary loss) or "loss_free" (a selection bias).
        balance_loss_coef (`float`): weight of the token-choice balancing loss.
        balance_update_rate (`float`): loss-free balancing bias update rate u.
        router_z_loss_coef (`float`): weight of the router z-loss (0 disables it).
        gating (`str`): "output" (the paper's H + g * f(H), for training from scratch) or "update"
            (H + (1 + g - g_0) * (f(H) - H), g_0 the gate of a zero logit; a converted checkpoint starts as the tied
            recursive model when its routers start at zero).
        kv_cache_policy (`str`): "recursion_wise" (each step attends among, and caches, its own active tokens) or
            "shared" (every step attends to the keys/values of step 1).
        relaxation_rank (`int`): rank of the depth-specific low-rank delta that every shared projection gets per
            recursion step (0: none). Shared RMSNorms then also get a per-step weight delta.
    """

    model_type = "mor"

    num_recursions: int = 3
    sharing_strategy: str = "middle_cycle"
    routing: str = "expert_choice"
    capacity: list[int | float] | tuple[int | float, ...] | None = None
    router_type: str = "linear"
    router_activation: str = "sigmoid"
    router_alpha: float | None = None
    router_threshold: float = 0.5
    router_inference: str = "threshold"
    router_selection: str = "gating"
    router_aux_loss_coef: float = 1e-3
    balancing: str = "loss"
    balance_loss_coef: float = 0.1
    balance_update_rate: float = 1e-3
    router_z_loss_coef: float = 0.0
    gating: str = "output"
    kv_cache_policy: str = "recursion_wise"
    relaxation_rank: int = 0

    def __post_init__(self, **kwargs):
        if self.capacity is None:
            self.capacity = [(self.num_recursions - step) / self.num_recursions for step in range(self.num_recursions)]
        else:
            self.capacity = [float(fraction) for fraction in self.capacity]
        if self.router_alpha is None:
            self.router_alpha = 1.0 if self.routing == "token_choice" else 0.1
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # Lets a saved checkpoint load as remote code through every Auto class, whichever class saved it.
            self.auto_map = {
                "AutoConfig": "configuration_mor.MoRConfig",
                "AutoModel": "modeling_mor.MoRModel",
                "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
                "AutoModelForSequenceClassification": "modeling_mor.MoRForSequenceClassification",
                "AutoModelForTokenClassification": "modeling_mor.MoRForTokenClassification",
                "AutoModelForQuestionAnswering": "modeling_mor.MoRForQuestionAnswering",
            }
        self.validate_recursion()

    def validate_recursion(self):
        """Raises a ValueError naming the field, the value and what would be valid."""
        if not isinstance(self.num_recursions, int) or self.num_recursions < 1:
            raise ValueError(f"MoRConfig.num_recursions={self.num_recursions!r} is not valid; it must be an int >= 1.")
        _check_choice("sharing_strategy", self.sharing_strategy, SHARING_STRATEGIES)
        _check_choice("routing", self.routing, ROUTINGS)
        _check_choice("router_type", self.router_type, ROUTER_TYPES)
        _check_choice("router_activation", self.router_activation, ROUTER_ACTIVATIONS)
        _check_choice("router_inference", self.router_inference, ROUTER_INFERENCE)
        _check_choice("router_selection", self.router_selection, ROUTER_SELECTIONS)
        if self.router_selection == "auxiliary" and self.router_inference != "auxiliary":
            raise ValueError(
                f"MoRConfig.router_selection='auxiliary' ranks tokens by the auxiliary routers, which "
                f"router_inference={self.router_inference!r} does not build. Set router_inference='auxiliary'."
            )
        _check_choice("balancing", self.balancing, BALANCING)
        _check_choice("gating", self.gating, GATINGS)
        _check_choice("kv_cache_policy", self.kv_cache_policy, KV_CACHE_POLICIES)
        if self.block_size is None:
            layouts = ", ".join(f"({s!r}, {n})" for s, n in valid_recursion_layouts(self.num_hidden_layers))
            raise ValueError(
                f"MoRConfig.num_hidden_layers={self.num_hidden_layers} cannot be unrolled with "
                f"sharing_strategy={self.sharing_strategy!r} and num_recursions={self.num_recursions}: "
                f"{'L - 2' if self.sharing_strategy.startswith('middle_') else 'L'} must be a positive multiple of "
                f"num_recursions. Valid (sharing_strategy, num_recursions) pairs for this depth: {layouts or 'none'}."
            )
        if self.routing != "none" and self.sharing_strategy not in ("cycle", "middle_cycle"):
            raise ValueError(
                f"MoRConfig.routing={self.routing!r} needs sharing_strategy 'cycle' or 'middle_cycle' (routing decides "
                f"per recursion step), got sharing_strategy={self.sharing_strategy!r}. Use routing='none' for the "
                f"sequence strategies."
            )
        if len(self.capacity) != self.num_recursions:
            raise ValueError(
                f"MoRConfig.capacity={self.capacity} has {len(self.capacity)} entries; it needs one per recursion step "
                f"(num_recursions={self.num_recursions})."
            )
        if any(not 0.0 < fraction <= 1.0 for fraction in self.capacity):
            raise ValueError(f"MoRConfig.capacity={self.capacity} is not valid; every fraction must be in (0, 1].")
        if any(later > earlier for earlier, later in zip(self.capacity, self.capacity[1:])):
            raise ValueError(
                f"MoRConfig.capacity={self.capacity} increases; capacities must be non-increasing because a token "
                f"dropped at one recursion step never returns."
            )
        if not 0.0 < self.router_threshold < 1.0:
            raise ValueError(f"MoRConfig.router_threshold={self.router_threshold} is not valid; it must be in (0, 1).")
        if not isinstance(self.relaxation_rank, int) or self.relaxation_rank < 0:
            raise ValueError(f"MoRConfig.relaxation_rank={self.relaxation_rank!r} is not valid; it must be an int >= 0.")
        for field in ("router_aux_loss_coef", "balance_loss_coef", "balance_update_rate", "router_z_loss_coef"):
            if getattr(self, field) < 0:
                raise ValueError(f"MoRConfig.{field}={getattr(self, field)} is not valid; it must be >= 0.")

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of `MoRModel`, naming MoR's modules: Llama's per-layer plan (attention and MLP
        projections colwise in, rowwise out) for the unshared first/last layers and the shared block's layers, and
        the embeddings sharded on the vocabulary (tied to `lm_head`, which `MoRForCausalLM._tp_plan` shards alike).

        The routers stay replicated (not in the plan): every rank needs every routing decision, and they are tiny.
        A relaxed model's shared layers (`relaxation_rank > 0`) stay replicated too: transformers' colwise/rowwise
        styles shard every parameter of the module they name along the weight's dimension, which splits the low-rank
        factors on their rank (colwise `relaxation_A`, rowwise `relaxation_B`); the inference path, on local shards,
        then fails with a shape mismatch. A property, not a class attribute: which modules exist depends on the
        sharing strategy and the relaxation."""
        layers = [] if self.relaxation_rank > 0 else ["recursion_block.layers.*"]
        if self.has_unshared_ends:
            layers = ["first_layer", *layers, "last_layer"]
        plan = {"embed_tokens": "embedding_rowwise"}
        for layer in layers:
            plan.update({f"{layer}.{name}": style for name, style in _LLAMA_LAYER_TP_PLAN.items()})
        return plan

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan: dict[str, str]) -> None:
        # transformers before 5.24 (vLLM's pin) assigns the plan with "embed_tokens" sharded on the vocabulary when the
        # embeddings are tied, which the derived plan already does; accept that, refuse a plan that would differ.
        if plan != self.base_model_tp_plan:
            raise ValueError(
                "MoRConfig.base_model_tp_plan is derived from the sharing strategy and the relaxation, so it cannot be "
                f"set to another plan ({plan!r}). Fix: set sharing_strategy / relaxation_rank, or subclass MoRConfig."
            )

    @property
    def base_model_pp_plan(self) -> dict[str, tuple[list[str], list[str]]]:
        """Pipeline stages of `MoRModel` in forward order, each with the inputs it takes and the outputs it gives.
        The recursion block is one stage: its shared layers run once per recursion step, so splitting them across
        stages would send the activations back and forth N_r times. transformers' own pipeline parallelism
        (`DistributedConfig(pp_size=...)`) does not read this plan: it splits `base_model.layers` evenly, a list
        MoR does not have."""
        plan = {"embed_tokens": (["input_ids"], ["inputs_embeds"])}
        end_layer = (["hidden_states", "attention_mask", "position_embeddings"], ["hidden_states"])
        if self.has_unshared_ends:
            plan["first_layer"] = end_layer
        plan["recursion_block"] = (
            ["hidden_states", "token_index", "token_valid", "position_embeddings"],
            ["hidden_states", "recursion_depth", "router_losses"],
        )
        if self.has_unshared_ends:
            plan["last_layer"] = end_layer
        plan["norm"] = (["hidden_states"], ["hidden_states"])
        return plan

    @property
    def block_size(self) -> int | None:
        """B, the number of shared layers in the recursion block."""
        return recursion_block_size(self.num_hidden_layers, self.num_recursions, self.sharing_strategy)

    def unrolled_schedule(self) -> list[tuple[int, list[int]]]:
        """(recursion step, block layer positions) in the order they run: whole-block passes for the cycle
        strategies, each layer repeated N_r times in a row for the sequence strategies."""
        steps = range(self.num_recursions)
        positions = range(self.block_size)
        if self.sharing_strategy.endswith("cycle"):
            return [(step, list(positions)) for step in steps]
        return [(step, [position]) for position in positions for step in steps]

    @property
    def has_unshared_ends(self) -> bool:
        """Whether the first and last layers sit outside the recursion block (middle_* strategies)."""
        return self.sharing_strategy.startswith("middle_")

    @property
    def num_unique_layers(self) -> int:
        return self.block_size + (2 if self.has_unshared_ends else 0)

    @property
    def has_full_rank_relaxation(self) -> bool:
        """Whether every per-step relaxation delta is full rank (the rank reaches each projection's smaller side, as
        `--relaxation-rank full` asks), so that every recursion step runs a weight of its own (relaxation_mor.py
        stores them merged: the shared weight at the first step, the shared weight plus a whole delta at a later one)."""
        return self.relaxation_rank > 0 and self.relaxation_rank >= self.full_relaxation_rank

    @property
    def full_relaxation_rank(self) -> int:
        """The smallest relaxation rank that is full for every projection: the largest of their smaller sides."""
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        widths = (self.num_attention_heads * head_dim, self.num_key_value_heads * head_dim, self.intermediate_size)
        return max(min(self.hidden_size, width) for width in widths)

    def expert_choice_top_k(self, step: int, num_tokens: int) -> int:
        """k_r = ceil(capacity_r * T); the small epsilon keeps 2/3 * 6 from rounding up to 5."""
        return math.ceil(self.capacity[step] * num_tokens - 1e-6)


__all__ = ["MoRConfig", "valid_recursion_layouts", "recursion_block_size"]

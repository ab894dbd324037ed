"""Mixture-of-Recursions for causal language modelling.

A shared block of Llama layers is applied `num_recursions` times; routers (see `routing_mor.py`) give every token its
own recursion depth, and at each recursion step the block runs only on the tokens still active there: its token-wise
work on those tokens packed into one sequence, its attention per batch row (`packing_mor.py`). The KV cache that
stores only what each step needs lives in `cache_mor.py`; serving many requests at once, in `serving_mor.py`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from .configuration_mor import MIN_TRANSFORMERS_VERSION, MoRConfig, check_transformers_version


# Before the imports below, some of which an older transformers lacks: fail naming the version, not a missing name.
check_transformers_version(MIN_TRANSFORMERS_VERSION)

from transformers.cache_utils import Cache  # noqa: E402
from transformers.generation import GenerationMixin
from transformers import AutoModel
from transformers import initialization as init
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import is_flash_attention_requested
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_mor import MoRCache
from .packing_mor import ActiveTokens, CustomAttentionMask, KeyRows, RowBuckets, StepAttention, build_attention_mask
from .relaxation_mor import RelaxedLinear, RelaxedRMSNorm, relax_layer_
from .routing_mor import ROUTER_LOSS_COEFFICIENTS, MoRRouter, TokenChoiceRouting, apply_gate, build_routing
from .serving_mor import init_mor_continuous_batching, serving_in_calling_thread


logger = logging.get_logger(__name__)


@dataclass
class MoRModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    recursion_depth (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        How many recursion steps each token took (0 for padding).
    router_losses (`dict[str, torch.Tensor]`):
        The unweighted router losses of this forward pass (training only).
    """

    recursion_depth: torch.LongTensor | None = None
    router_losses: dict[str, torch.Tensor] | None = None


@dataclass
class MoRCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`): the language-modelling loss plus the weighted router losses.
    lm_loss, router_aux_loss, balance_loss, router_z_loss (`torch.FloatTensor`): each loss on its own, unweighted.
    recursion_depth (`torch.LongTensor` of shape `(batch_size, sequence_length)`): recursion steps taken per token.
    """

    lm_loss: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    recursion_depth: torch.LongTensor | None = None


class LayerOutput(NamedTuple):
    """A decoder layer's output: its hidden states, its attention weights (None under kernels that do not return
    them) and its keys and values (read by deeper steps under the shared policy). With a cache the keys/values are
    views of memory the cache reuses for its next gather of the same layer: read them before the next forward.

    Every tensor is a field of its own and callers unpack by position: reentrant gradient checkpointing returns a
    plain tuple, and only its top-level tensors stay in the autograd graph."""

    hidden_states: torch.Tensor
    attn_weights: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor


class UnrolledLayerOutput(nn.Module):
    """Where transformers' output capturing (`_can_record_outputs`) reads each unrolled layer's outputs.

    A shared layer runs on the packed tokens of a recursion step, so its own outputs are not the sequence's. While
    outputs are recorded (only then), this module is called after every unrolled layer, in the order a full-depth
    token meets them, with the whole sequence: the hidden states `[batch, seq, hidden]` (a token that did not take the
    step keeps its state) and the attention weights `[batch, heads, queries, keys]` (zero where a token did not take
    the step; None under kernels that do not return them). `layer_input` comes first so that the first call records
    the embeddings as the initial hidden state."""

    def forward(self, layer_input, hidden_states, attn_weights=None):
        return hidden_states, attn_weights


def recorded_outputs(config, kwargs) -> set[str]:
    """The outputs transformers' output capturing records in this forward ("hidden_states", "attentions"): asked for
    in the call, else by the config, as `capture_outputs` decides (which passes the call's flags on)."""
    return {name for name in ("hidden_states", "attentions") if kwargs.get(f"output_{name}", getattr(config, f"output_{name}", False))}


class MoRAttention(LlamaAttention):
    """Llama attention for a recursion step's tokens: projections on the step's active tokens packed into one
    sequence, attention per batch row (`ActiveTokens`). It can reuse the keys/values of recursion step 1 (`shared` KV
    policy), computing queries only, and reads the keys of its own rows when keys exist for more rows than take the
    step (`KeyRows`). Without `active_tokens` (the unshared first/last layers) it is Llama's attention.

    In a relaxed shared layer (`relaxed=True`) the projections take the recursion step, which picks their delta."""

    relaxed = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        recursion_step: int | None = None,
        shared_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rows: KeyRows | None = None,
        active_tokens: ActiveTokens | None = None,
        row_buckets: RowBuckets | None = None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        step_args = (recursion_step,) if self.relaxed else ()

        # Projections and rotary run token by token, on `[..., heads, head_dim]`.
        query_states = self.q_proj(hidden_states, *step_args).view(hidden_shape)
        if shared_key_value is None:
            key_states = self.k_proj(hidden_states, *step_args).view(hidden_shape)
            value_states = self.v_proj(hidden_states, *step_args).view(hidden_shape)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, unsqueeze_dim=-2)
        else:
            # A deeper step under the shared policy: queries only; keys/values are step 1's.
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
            query_states = (query_states * cos) + (rotate_half(query_states) * sin)

        if active_tokens is None:
            # The unshared first/last layers: Llama's attention, `[batch, heads, seq, head_dim]`.
            query_states = query_states.transpose(1, 2)
            key_states, value_states = key_states.transpose(1, 2), value_states.transpose(1, 2)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        else:
            # A recursion step: attention runs per batch row, `[rows, heads, width, head_dim]`.
            query_states = active_tokens.to_row_layout(query_states).transpose(1, 2)
            if shared_key_value is not None:
                key_states, value_states = shared_key_value
            elif cache is not None:
                # The recursion cache takes the step's tokens as one packed sequence, `[1, kv_heads, N, head_dim]`.
                key_states, value_states = cache.update(
                    key_states.transpose(0, 1).unsqueeze(0),
                    value_states.transpose(0, 1).unsqueeze(0),
                    self.layer_idx,
                    {"recursion_step": recursion_step},
                )
            else:
                key_states = active_tokens.to_row_layout(key_states).transpose(1, 2)
                value_states = active_tokens.to_row_layout(value_states).transpose(1, 2)
        # Returned for deeper steps (shared policy) before the selection: they select their own rows.
        unselected_key_value = (key_states, value_states)
        if key_rows is not None:
            key_states, value_states = key_rows.select(key_states, value_states)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if row_buckets is not None:
            attention_interface = partial(row_buckets.attend, attention_interface)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        if active_tokens is not None:
            attn_output = active_tokens.from_row_layout(attn_output)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output, *step_args)
        return attn_output, attn_weights, unselected_key_value


class MoRMLP(LlamaMLP):
    """Llama's MLP; in a relaxed shared layer its projections take the recursion step."""

    relaxed = False

    def forward(self, x, recursion_step: int | None = None):
        step_args = (recursion_step,) if self.relaxed else ()
        gated = self.act_fn(self.gate_proj(x, *step_args)) * self.up_proj(x, *step_args)
        return self.down_proj(gated, *step_args)


class MoRDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer that also returns its attention weights and its keys/values (`LayerOutput`).

    `relaxed=True` (a shared layer with `config.relaxation_rank > 0`) gives its projections and norms a delta per
    recursion step (see relaxation_mor.py)."""

    def __init__(self, config: MoRConfig, layer_idx: int, relaxed: bool = False):
        super().__init__(config, layer_idx)
        self.self_attn = MoRAttention(config=config, layer_idx=layer_idx)
        self.mlp = MoRMLP(config)
        self.relaxed = relaxed
        if relaxed:
            relax_layer_(self, config.num_recursions, config.relaxation_rank)
            self.self_attn.relaxed = self.mlp.relaxed = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        shared_keys: torch.Tensor | None = None,
        shared_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        recursion_step: int | None = None,
        key_rows: KeyRows | None = None,
        active_tokens: ActiveTokens | None = None,
        **kwargs,
    ):
        """`shared_keys`/`shared_values`: step 1's keys/values of this layer, read by a deeper step under the shared
        policy. They come positionally, like `hidden_states`, because reentrant gradient checkpointing backpropagates
        only into positional tensors."""
        step_args = (recursion_step,) if self.relaxed else ()
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states, *step_args)
        hidden_states, attn_weights, (keys, values) = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            recursion_step=recursion_step,
            shared_key_value=None if shared_keys is None else (shared_keys, shared_values),
            key_rows=key_rows,
            active_tokens=active_tokens,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states, *step_args)
        hidden_states = self.mlp(hidden_states, *step_args)
        hidden_states = residual + hidden_states
        return LayerOutput(hidden_states, attn_weights, keys, values)


class MoRRecursionBlock(nn.Module):
    """The shared layers, the routing, and the recursion loop that applies them to each step's active tokens."""

    def __init__(self, config: MoRConfig, first_layer_idx: int):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            [
                MoRDecoderLayer(config, first_layer_idx + position, relaxed=config.relaxation_rank > 0)
                for position in range(config.block_size)
            ]
        )
        self.routing = build_routing(config)
        self.layer_output = UnrolledLayerOutput()

    def unrolled_schedule(self) -> list[tuple[int, list[int]]]:
        """(recursion step, block layer positions) in the order they run (`MoRConfig.unrolled_schedule`)."""
        return self.config.unrolled_schedule()

    def forward(
        self,
        hidden_states,
        token_index,
        token_valid,
        position_embeddings,
        cache=None,
        sequence_index=None,
        document_start=None,
        custom_mask=None,
        **kwargs,
    ):
        """Applies the recursion steps to the tokens routed to them.

        `token_index` ([batch, seq]) is every token's index in the whole sequence (past tokens included): masks are
        built from it because each step sees a packed subset of the tokens. In a row that packs several documents,
        `sequence_index` numbers them and `document_start` is the index of each token's first document token. Returns
        the hidden states, the recursion depth of every token and the (unweighted) router losses, averaged over
        steps."""
        config = self.config
        recording = recorded_outputs(config, kwargs)
        # Under torch.compile without a cache, steps keep every token in place (static shapes, one graph); a cache
        # stores only the tokens that take each step, so cached steps pack them.
        in_place = torch.compiler.is_compiling() and cache is None
        recursion_depth = torch.zeros_like(token_index)
        router_losses: dict[str, list[torch.Tensor]] = {}
        if config.routing == "token_choice":
            chosen_depth, token_gate, losses = self.routing(hidden_states, token_valid)
            self._collect(router_losses, losses)
            recursion_input = hidden_states

        active = token_valid
        active_by_step: dict[int, ActiveTokens] = {}
        attention_by_step: dict[int, StepAttention] = {}  # built once per step, shared by its layers
        step_one_key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for step, positions in self.unrolled_schedule():
            if step not in active_by_step:
                # The first time this step runs in this forward: decide who takes it.
                if config.routing == "expert_choice":
                    active, gate, losses = self.routing(hidden_states, active, token_valid, step, sequence_index)
                    self._collect(router_losses, losses)
                elif config.routing == "token_choice":
                    active = chosen_depth > step
                recursion_depth = recursion_depth + active
                active_by_step[step] = ActiveTokens.from_mask(active, in_place)
            active_tokens = active_by_step[step]
            if active_tokens.rows.numel() == 0:
                for _ in positions:
                    self._record_layer_output(recording, hidden_states, hidden_states, None, active_tokens, None, token_index)
                continue
            shares_step_one = config.kv_cache_policy == "shared" and step > 0
            if step not in attention_by_step:
                attention_by_step[step] = self._step_attention(
                    step, active_by_step, token_index, cache, attention_by_step, hidden_states.dtype, document_start,
                    custom_mask,
                )
            step_attention = attention_by_step[step]

            block_input = active_tokens.take(hidden_states)
            block_hidden = block_input
            step_position_embeddings = tuple(active_tokens.take(part) for part in position_embeddings)
            for order, position in enumerate(positions):
                layer_input = hidden_states
                shared_key_value = step_one_key_values[position] if shares_step_one else (None, None)
                block_hidden, attn_weights, keys, values = self.layers[position](
                    block_hidden,
                    *shared_key_value,
                    attention_mask=step_attention.mask,
                    position_embeddings=step_position_embeddings,
                    cache=cache,
                    recursion_step=step,
                    key_rows=step_attention.key_rows,
                    active_tokens=active_tokens,
                    **kwargs,
                )
                if step == 0 and config.kv_cache_policy == "shared":
                    # Read by the deeper steps of this forward; a cache's gathered keys live in memory it reuses.
                    step_one_key_values[position] = (keys, values)
                if order == len(positions) - 1:
                    if config.routing == "expert_choice":
                        block_hidden = apply_gate(config, block_input, block_hidden, active_tokens.take(gate))
                    hidden_states = active_tokens.put(hidden_states, block_hidden)
                    layer_states = hidden_states
                else:
                    layer_states = active_tokens.put(hidden_states, block_hidden) if recording else None
                self._record_layer_output(
                    recording, layer_input, layer_states, attn_weights, active_tokens, step_attention, token_index
                )

        if config.routing == "token_choice":
            # Token-choice gates once, at the end: H^1 + w * f^d(H^1).
            gated = apply_gate(config, recursion_input, hidden_states, token_gate)
            hidden_states = torch.where((recursion_depth > 0).unsqueeze(-1), gated, hidden_states)
        if config.sharing_strategy.endswith("sequence"):
            recursion_depth = token_valid.long() * config.num_recursions
        mean_losses = {name: torch.stack(values).mean() for name, values in router_losses.items()}
        return hidden_states, recursion_depth, mean_losses

    def _record_layer_output(self, recording, layer_input, layer_states, attn_weights, active_tokens, step_attention, token_index):
        """Hands one unrolled layer's whole-sequence outputs to the output capturing, while it records them."""
        if not recording:
            return
        batch_size, seq_len = token_index.shape
        past_length = token_index[0, 0]
        num_keys = seq_len + int(past_length)
        if attn_weights is not None:
            attn_weights = step_attention.weights_over_sequence(
                attn_weights, active_tokens.rows, batch_size, past_length, num_keys
            )
        elif step_attention is None and "attentions" in recording and self.config._attn_implementation == "eager":
            # A step no token takes: nothing attends.
            attn_weights = layer_states.new_zeros(batch_size, self.config.num_attention_heads, seq_len, num_keys)
        self.layer_output(layer_input, layer_states, attn_weights)

    @staticmethod
    def _collect(router_losses, losses):
        for name, value in losses.items():
            router_losses.setdefault(name, []).append(value)

    def _step_attention(
        self, step, active_by_step, token_index, cache, attention_by_step, dtype, document_start=None, custom_mask=None
    ) -> StepAttention:
        """The attention mask of a recursion step and where its rows sit among the rows of the keys it reads.

        Keys are those of the step's own rows: from the cache (their tokens that took the step, past ones included),
        or without a cache the step's own tokens; under the shared policy deeper steps read step 1's keys, which
        exist for the rows that took step 1, and select their own rows among them."""
        config = self.config
        active_tokens = active_by_step[step]
        query_index = active_tokens.per_row(token_index).masked_fill(~active_tokens.valid, -1)
        batch_size = token_index.shape[0]
        if config.kv_cache_policy == "shared" and step > 0:
            key_index, key_valid = attention_by_step[0].key_layout
            # In place (compiled), every step holds every row: the same rows as step 1's keys.
            in_place = active_tokens.in_place is not None
            key_rows = None if in_place else KeyRows.of(active_tokens.rows, among=active_by_step[0].rows)
        elif cache is not None:
            key_index, key_valid = cache.prepare_recursion_step(
                step, batch_size, active_tokens.rows, query_index, active_tokens.valid, dtype
            )
            key_rows = None
        else:
            key_index, key_valid = query_index, active_tokens.valid
            key_rows = None  # the step's own tokens
        key_layout = (key_index, key_valid)
        if key_rows is not None:
            key_index, key_valid = key_rows.select(key_index, key_valid)

        plain_causal = active_tokens.is_everything and active_tokens.in_place is None
        plain_causal = plain_causal and cache is None and document_start is None and custom_mask is None
        if plain_causal and config._attn_implementation == "sdpa":
            attention_mask = None  # sdpa's causal kernel
        else:
            # Documents exist only when nothing was cached before: queries and keys are the same tokens.
            query_start = None if document_start is None else active_tokens.per_row(document_start)
            allowed_pairs = None
            if custom_mask is not None:
                allowed_pairs = custom_mask.pairs(active_tokens.rows, query_index, key_index)
            attention_mask = build_attention_mask(
                config, query_index, key_index, key_valid, dtype, query_start, allowed_pairs
            )
        return StepAttention(attention_mask, key_rows, key_layout, query_index, (key_index, key_valid))


def add_router_losses(loss, router_losses: dict, config: MoRConfig):
    """A task loss plus the router losses, each weighted by its config coefficient."""
    for name, value in router_losses.items():
        loss = loss + getattr(config, ROUTER_LOSS_COEFFICIENTS[name]) * value
    return loss


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    config: MoRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoRDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # The shared layers run on packed subsets of the tokens: every unrolled layer hands its whole-sequence outputs to
    # an `UnrolledLayerOutput`, which is what transformers' output capturing reads.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(UnrolledLayerOutput, index=0),
        "attentions": OutputRecorder(UnrolledLayerOutput, index=1),
    }

    @classmethod
    def prepare_distribute_model(cls, distributed_config, *args, **kwargs):
        """Refuses pipeline parallelism before loading (transformers' pipeline stages split a `layers` list, and
        MoR's shared block runs its layers several times); tensor parallelism goes on as transformers does it."""
        pp_size = distributed_config.get("pp_size", 1) if isinstance(distributed_config, dict) else getattr(distributed_config, "pp_size", 1)
        if (pp_size or 1) > 1:
            raise ValueError(
                f"pp_size={pp_size}: pipeline parallelism is not supported by MoR models (the shared recursion block "
                f"runs its layers several times, so it cannot be split into stages). Use tensor parallelism "
                f"(tp_plan='auto') instead."
            )
        return super().prepare_distribute_model(distributed_config, *args, **kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' deprecated alias of `is_activation_checkpointing`, without its FutureWarning: PEFT (0.21)
        still reads this name in `get_peft_model`, so every LoRA run printed the warning."""
        return self.is_activation_checkpointing

    def routers(self) -> list[nn.Module]:
        """Every router module (the step routers, the auxiliary routers, or the token-choice router)."""
        return [module for module in self.modules() if isinstance(module, MoRRouter)]

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Refuses flash attention with MoR's reason (transformers' own refusal asks to request support)."""
        if attn_implementation is not None and is_flash_attention_requested(
            requested_attention_implementation=attn_implementation.removeprefix("paged|")
        ):
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by MoR models: a recursion step attends "
                f"over a packed subset of the tokens with its own mask, which the flash-attention kernels are not "
                f"wired for yet (they need a GPU, and none was available to test them). Use 'sdpa' (the default), "
                f"'eager' (for output_attentions) or 'flex_attention'."
            )
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # transformers' `initialization` functions skip tensors a checkpoint has loaded (a module missing one key
        # keeps its other, loaded parameters).
        if isinstance(module, TokenChoiceRouting):
            init.zeros_(module.selection_bias)
        elif isinstance(module, RelaxedLinear):
            # LoRA-style: A random, B zero, so the deltas start at zero yet receive gradients (a whole delta gets its
            # gradient directly).
            if module.is_dense:
                init.zeros_(module.relaxation_delta)
            else:
                init.normal_(module.relaxation_A, mean=0.0, std=self.config.initializer_range)
                init.zeros_(module.relaxation_B)
            if module.relaxation_bias is not None:
                init.zeros_(module.relaxation_bias)
        elif isinstance(module, RelaxedRMSNorm):
            init.zeros_(module.relaxation_weight)


class MoRModel(MoRPreTrainedModel):
    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        # Unique layer indices (what the cache and PEFT see): [first], block 0..B-1, [last].
        offset = 1 if config.has_unshared_ends else 0
        self.first_layer = MoRDecoderLayer(config, 0) if config.has_unshared_ends else None
        self.recursion_block = MoRRecursionBlock(config, first_layer_idx=offset)
        self.last_layer = MoRDecoderLayer(config, offset + config.block_size) if config.has_unshared_ends else None
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.layer_output = UnrolledLayerOutput()
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoRModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
            use_cache = False
        if use_cache and cache is None:
            cache = MoRCache(self.config)
        if cache is not None:
            MoRCache.check_compatible(cache, self.config)

        batch_size, seq_len = inputs_embeds.shape[:2]
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        token_index = torch.arange(past_seen_tokens, past_seen_tokens + seq_len, device=inputs_embeds.device)
        token_index = token_index.unsqueeze(0).expand(batch_size, seq_len)
        if position_ids is None:
            position_ids = token_index
        # Every step gathers its tokens' positions row by row, so a `[1, seq]` position_ids is spelled out per row.
        position_ids = position_ids.expand(batch_size, seq_len)
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(
                f"MoR takes a 2-D attention_mask of shape [batch, past + new tokens] (1 = real token, 0 = padding) or "
                f"a custom 4-D one, [batch, 1, new tokens, past + new tokens]; got shape {tuple(attention_mask.shape)}."
            )
        custom_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            custom_mask = CustomAttentionMask.from_4d(attention_mask, past_seen_tokens, seq_len)
            attention_mask = None
        if custom_mask is not None:
            token_valid = custom_mask.token_valid()
        elif attention_mask is None:
            token_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        else:
            token_valid = attention_mask[:, -seq_len:].bool()
        # Padding-free batches (`DataCollatorWithFlattening`): one row packs documents whose positions restart at 0.
        # As for Llama, they are found from position_ids when there is no mask; unlike Llama, also in an eval forward
        # that starts an empty cache (Trainer's evaluation of such batches).
        sequence_index = document_start = None
        if attention_mask is None and custom_mask is None and past_seen_tokens == 0:
            sequence_index = find_packed_sequence_indices(position_ids)
        if sequence_index is not None:
            is_first = torch.diff(sequence_index, dim=-1, prepend=sequence_index[:, :1] - 1) != 0
            document_start = torch.where(is_first, token_index, 0).cummax(dim=-1).values

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        end_layer_mask = None
        if self.first_layer is not None:
            end_layer_mask = self._end_layer_mask(
                attention_mask, token_index, token_valid, cache, hidden_states.dtype, document_start, custom_mask
            )
            hidden_states = self._end_layer(
                self.first_layer, hidden_states, end_layer_mask, position_embeddings, cache, **kwargs
            )
        hidden_states, recursion_depth, router_losses = self.recursion_block(
            hidden_states,
            token_index,
            token_valid,
            position_embeddings,
            cache=cache,
            sequence_index=sequence_index,
            document_start=document_start,
            custom_mask=custom_mask,
            **kwargs,
        )
        if self.last_layer is not None:
            hidden_states = self._end_layer(
                self.last_layer, hidden_states, end_layer_mask, position_embeddings, cache, **kwargs
            )
        if cache is not None:
            cache.record_forward(seq_len)
        hidden_states = self.norm(hidden_states)
        return MoRModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            recursion_depth=recursion_depth,
            router_losses=router_losses or None,
        )

    def unrolled_layers(self, with_recursion_step: bool = False) -> list:
        """The decoder layers in the order a token at full depth meets them (L entries, shared layers repeated).

        With `with_recursion_step=True`, `(layer, recursion_step)` pairs; the step is None for the unshared layers."""
        block = self.recursion_block
        unrolled = [(block.layers[position], step) for step, positions in block.unrolled_schedule() for position in positions]
        if self.first_layer is not None:
            unrolled = [(self.first_layer, None), *unrolled, (self.last_layer, None)]
        return unrolled if with_recursion_step else [layer for layer, _ in unrolled]

    def unrolled_layer_forward(self, layer_inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """For each unrolled position (in `unrolled_layers` order) and its input (`[batch, seq, hidden]`, all of one
        shape, one sequence per row starting at position 0), the output of that layer on every token: causal
        attention, no cache, no routing, what the layer computes at full depth for this input. Block-wise training
        feeds each layer the source model's hidden states and compares its output with the source's next ones
        (conversion/training); the mask and the rotary embeddings are built once for all of them."""
        unrolled = self.unrolled_layers(with_recursion_step=True)
        first = next(iter(layer_inputs.values()))
        batch_size, seq_len = first.shape[:2]
        token_index = torch.arange(seq_len, device=first.device).expand(batch_size, seq_len)
        token_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=first.device)
        attention_mask = self._end_layer_mask(None, token_index, token_valid, None, first.dtype)
        position_embeddings = self.rotary_emb(first, position_ids=token_index)
        outputs = {}
        for position, hidden_states in layer_inputs.items():
            layer, recursion_step = unrolled[position]
            outputs[position], _, _, _ = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                recursion_step=recursion_step,
            )
        return outputs

    def _end_layer(self, layer, hidden_states, attention_mask, position_embeddings, cache, **kwargs):
        """An unshared first/last layer on every token, its outputs handed to the output capturing."""
        # Unpacked by position: under reentrant gradient checkpointing a layer returns a plain tuple.
        layer_states, attn_weights, _, _ = layer(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        if recorded_outputs(self.config, kwargs):
            self.layer_output(hidden_states, layer_states, attn_weights)
        return layer_states

    def _end_layer_mask(
        self, attention_mask, token_index, token_valid, cache, dtype, document_start=None, custom_mask=None
    ):
        """Mask of a layer that runs on every real token (the unshared first/last layers, and any layer under
        `unrolled_layer_forward`), like Llama's; a custom 4-D mask as it is."""
        if cache is None:
            plain_causal = attention_mask is None and document_start is None and custom_mask is None
            if plain_causal and self.config._attn_implementation == "sdpa":
                return None
            key_index = token_index
            key_valid = token_valid if custom_mask is None else torch.ones_like(token_valid)
        else:
            total = token_index.shape[1] + cache.get_seq_length()
            key_index = torch.arange(total, device=token_index.device).expand(token_index.shape[0], total)
            key_valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(key_index, dtype=torch.bool)
        allowed_pairs = None
        if custom_mask is not None:
            rows = torch.arange(token_index.shape[0], device=token_index.device)
            allowed_pairs = custom_mask.pairs(rows, token_index, key_index)
        return build_attention_mask(self.config, token_index, key_index, key_valid, dtype, document_start, allowed_pairs)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.model = MoRModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def start_routing_from_recursive_model_(self) -> None:
        """Resets the routers of a freshly converted model so that it starts as the tied recursive model: every gate
        is exactly neutral and, with expert-choice and auxiliary routers (the conversion default), every token takes
        every recursion step in eval mode. See `start_from_recursive_model_` in routing_mor.py."""
        routing = self.model.recursion_block.routing
        if routing is not None:
            routing.start_from_recursive_model_()

    def decision_routers(self) -> dict:
        """Expert-choice routing's deciding routers by recursion step (0-based): the module whose logit eval mode
        compares with `router_threshold` (see `ExpertChoiceRouting.decision_routers`). Empty for other routings."""
        routing = self.model.recursion_block.routing
        return routing.decision_routers() if self.config.routing == "expert_choice" else {}

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds a MoRCache instead of a DynamicCache, and checks a cache the user passes."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            MoRCache.check_compatible(user_cache, self.config)
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by MoR models: "
                f"tokens leave the recursion at different depths, so the cache is a MoRCache that grows per recursion "
                f"step. Leave cache_implementation unset (or pass cache=MoRCache(model.config))."
            )
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = MoRCache(self.config)
        if generation_config.is_assistant:
            model_kwargs["cache"].activate_past_recording()

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """generate() compiles the forward only for static caches; MoRCache grows by the tokens each recursion step
        takes, so a requested compile_config is refused instead of being ignored with a warning."""
        if generation_config.compile_config is not None and not generation_config.disable_compile:
            raise ValueError(
                "compile_config is not supported by MoR models: a decode step stores a data-dependent number of "
                "keys per recursion step (MoRCache), which cannot be one static graph. torch.compile(model) compiles "
                "the uncached forward as one graph; for cached decoding, leave compile_config unset."
            )
        return False

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' continuous-batching entry point (also behind `generate_batch` and
        `continuous_batching_context_manager`), served by MoR's depth-wise batch processor (serving_mor.py): one pass
        of the shared block serves tokens of many requests at different recursion steps, with paged per-step KV."""
        return init_mor_continuous_batching(self, generation_config, continuous_batching_config, workload_hints)

    def generate_batch(self, inputs, *args, **kwargs):
        """transformers' `generate_batch` (same arguments, same results: a dict of `GenerationOutput` in input order),
        with MoR's engine run in the calling thread, which only waits for the results: on CPU a background thread
        doing the work makes OpenMP throttle its workers (see `MoRContinuousBatchingManager`)."""
        with serving_in_calling_thread():
            return super().generate_batch(inputs, *args, **kwargs)

    def generate(self, *args, output_recursion_depth: bool = False, **kwargs):
        """`GenerationMixin.generate`, plus `output_recursion_depth=True` (with `return_dict_in_generate=True`): the
        output then carries `recursion_depth`, `[batch, sequence]`, the recursion steps taken by every token of the
        returned sequences (prompt included; 0 for padding)."""
        if output_recursion_depth and not kwargs.get("return_dict_in_generate", False):
            raise ValueError("output_recursion_depth=True needs return_dict_in_generate=True in generate().")
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if isinstance(prompt, torch.Tensor) and prompt.shape[-1] == 0 and kwargs.get("inputs_embeds") is None:
            # As generate_batch words it (serving_mor.py); the masking code would fail on it with an IndexError.
            raise ValueError(f"empty prompt: generate() needs at least one input token (input_ids of shape "
                             f"{list(prompt.shape)}). Fix: give a non-empty prompt, or start from the BOS token.")
        outputs = super().generate(*args, **kwargs)
        if output_recursion_depth:
            outputs["recursion_depth"] = self.recursion_depth_of(outputs.sequences, kwargs.get("attention_mask"))
        return outputs

    @torch.no_grad()
    def recursion_depth_of(self, sequences: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Recursion depth of every token of `sequences`. Eval-mode routing is causal, so this one uncached pass
        gives exactly the depths taken during cached decoding (tests/test_generation.py checks it)."""
        if attention_mask is not None:
            # generate() repeats every prompt row for num_return_sequences (and beams) with repeat_interleave.
            attention_mask = attention_mask.repeat_interleave(sequences.shape[0] // attention_mask.shape[0], dim=0)
            generated = sequences.shape[1] - attention_mask.shape[1]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(sequences.shape[0], generated)], dim=1)
        outputs = self.model(sequences, attention_mask=attention_mask, use_cache=False)
        return outputs.recursion_depth

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_recursion_depth: bool = False,
        **kwargs,
    ) -> MoRCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Language-modelling labels; the returned `loss` adds the weighted router losses to the LM loss.
        output_recursion_depth (`bool`, *optional*):
            Return `recursion_depth`, how many recursion steps each token took.

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/mor-checkpoint", trust_remote_code=True)
        >>> outputs = model(input_ids, output_recursion_depth=True)
        >>> outputs.recursion_depth  # [batch, seq]
        ```"""
        outputs: MoRModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # this forward makes the tuple; also when the config says return_dict=False
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = lm_loss = None
        router_losses = outputs.router_losses or {}
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = add_router_losses(lm_loss, router_losses, self.config)

        return MoRCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            router_aux_loss=router_losses.get("router_aux_loss"),
            balance_loss=router_losses.get("balance_loss"),
            router_z_loss=router_losses.get("router_z_loss"),
            recursion_depth=outputs.recursion_depth if output_recursion_depth else None,
        )


class MoRHeadMixin:
    """What transformers' generic heads need from MoR: their base model found by `AutoModel.from_config`, and the
    weighted router losses in their training loss (as MoRForCausalLM's), so that fine-tuning a head keeps teaching
    the routers the eval-mode routing rule."""

    def __init__(self, config: MoRConfig):
        # A checkpoint's remote code loads configuration_mor.py twice, in two module folders named by different
        # hashes, so the config a head receives may be of another MoRConfig class than the one this file imports:
        # register the config's own class before the generic `__init__` asks AutoModel for it.
        AutoModel.register(type(config), MoRModel, exist_ok=True)
        super().__init__(config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        start_positions=None,
        end_positions=None,
        use_cache=None,
        **kwargs,
    ):
        # Named arguments (not *args) because Trainer keeps the dataset columns that forward's signature names.
        targets = dict(labels=labels, start_positions=start_positions, end_positions=end_positions)
        kwargs.update({name: value for name, value in targets.items() if value is not None})
        router_losses = {}

        def keep_router_losses(module, inputs, outputs):
            router_losses.update(getattr(outputs, "router_losses", None) or {})

        # The generic forward keeps only the base model's hidden states; a hook on it reads the router losses.
        handle = self.model.register_forward_hook(keep_router_losses)
        try:
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            handle.remove()
        if getattr(outputs, "loss", None) is not None:
            outputs.loss = add_router_losses(outputs.loss, router_losses, self.config)
        return outputs


class MoRForSequenceClassification(MoRHeadMixin, GenericForSequenceClassification, MoRPreTrainedModel): ...


class MoRForTokenClassification(MoRHeadMixin, GenericForTokenClassification, MoRPreTrainedModel): ...


class MoRForQuestionAnswering(MoRHeadMixin, GenericForQuestionAnswering, MoRPreTrainedModel): ...


__all__ = [
    "MoRPreTrainedModel",
    "MoRModel",
    "MoRForCausalLM",
    "MoRForSequenceClassification",
    "MoRForTokenClassification",
    "MoRForQuestionAnswering",
]

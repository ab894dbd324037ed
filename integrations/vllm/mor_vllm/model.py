"""Mixture-of-Recursions for vLLM: every token takes its own number of recursion steps.

The model is the one `modeling_mor` defines for transformers (MOR_SPEC.md), built from vLLM's layers so that vLLM's
kernels, paged KV cache, scheduler, prefix caching and tensor parallelism apply. The configuration and the routing
are the project's own files (`configuration_mor.py`, `routing_mor.py`, the same source), so a router decides here
exactly as it does in `generate()`.

Compute follows the routing: at each recursion step the shared layers' projections, norms and MLP run only on the
tokens that take the step (`RecursionStepTokens`). Attention runs through vLLM's `Attention`, whose kernels attend
over every token of a sequence; MoR's semantics at a step are kept as follows:

- Steps every token takes (no routing, the first step of token-choice, the leading full-capacity steps of
  expert-choice) attend as a vanilla layer does.
- Recursion-wise KV caching: a step attends among the tokens that took it. On vLLM's CPU backend a step stores the
  keys and values of those tokens only, in KV cache groups of its own inside vLLM's allocator, and attends over them
  only (routed_kv.py, step_attention.RoutedStepStorage). On other backends its `Attention` has a head a few
  dimensions wider than the model's (`padded_head_size`); queries carry 1 in the first extra dimension and keys carry
  0 for a token that took the step or `KEY_MASK_VALUE` for one that did not, so the latter's scores are about -2000
  below any real score and their softmax weight underflows to exactly zero; there every token owns a (masked) slot in
  the step's cache.
- Shared KV caching: deeper steps reuse the keys/values of step 1 (computing queries only), read from step 1's
  `Attention` of the same block layer, which is called again without keys; they hold no KV cache of their own.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm import ir
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.platforms import current_platform
from vllm.v1.attention.selector import get_attn_backend
from vllm.v1.kv_cache_interface import AttentionSpec

from .checks import UnsupportedMoRCheckpoint, check_servable, has_step_deltas
from .configuration_mor import MoRConfig
from .routed_kv import RoutedTokenCounts, stores_routed_tokens
from .routing_mor import apply_gate, build_routing, steps_every_token_takes
from .step_attention import RoutedStepStorage, StepRequests, batch_requests


# A key of a token that did not take the step scores KEY_MASK_VALUE * scale lower (about -2000 at head_dim 64):
# exp() of that is exactly 0 in float32. A power of two, so that bfloat16 and float16 caches hold it exactly.
KEY_MASK_VALUE = -16384.0


def padded_head_size(head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """The smallest head size above `head_dim` (a multiple of 8) that vLLM's attention backend on this platform takes:
    the room for the key-mask dimension of a recursion-wise step."""
    for size in range(head_dim + 8 - head_dim % 8, head_dim + 129, 8):
        try:
            backend = get_attn_backend(size, dtype, kv_cache_dtype)
        except (ValueError, NotImplementedError):
            continue
        if backend.supports_head_size(size):
            return size
    raise UnsupportedMoRCheckpoint(
        f"vLLM's attention backend takes no head size between {head_dim + 1} and {head_dim + 128}, needed for the "
        f"recursion-wise KV policy's key mask (head_dim={head_dim}). Serve a checkpoint with "
        f"kv_cache_policy='shared' and a full-capacity first step, or use transformers' generate_batch."
    )


@dataclass
class RecursionStepTokens:
    """The tokens taking one recursion step, among the `num_tokens` tokens of vLLM's batch.

    `index` lists them in batch order (None: every token takes the step); `key_mask` holds, for every token of the
    batch, 0 if it takes the step and KEY_MASK_VALUE if not (None when the step needs no mask)."""

    num_tokens: int
    index: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    # The requests with a token at the step (step_attention.py), found at the step's first attention; None: the
    # attention takes every request's rows.
    requests: StepRequests | None = None
    requests_found: bool = False
    # Routed-token KV (routed_kv.py): where the step's tokens are stored and what its attention reads; None in
    # vLLM's profiling runs, which have no attention metadata.
    storage: RoutedStepStorage | None = None

    def requests_of(self, attn: Attention) -> StepRequests | None:
        if not self.requests_found:
            self.requests, self.requests_found = StepRequests.of(attn.layer_name, self.index), True
        return self.requests

    @classmethod
    def of(cls, index: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> "RecursionStepTokens":
        key_mask = torch.full((num_tokens,), KEY_MASK_VALUE, dtype=dtype, device=index.device)
        return cls(num_tokens, index, key_mask.index_fill_(0, index, 0.0))

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The step's rows of a `[num_tokens, ...]` tensor."""
        return tensor if self.index is None else tensor.index_select(0, self.index)

    def put(self, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`tensor` with the step's rows replaced by `rows`."""
        return rows if self.index is None else tensor.index_copy(0, self.index, rows)


def per_step_deltas(checkpoint_name: str, delta: torch.Tensor, num_steps: int) -> torch.Tensor:
    """A full-rank projection's `relaxation_delta`, one per recursion step. relaxation_mor.RelaxedLinear stores the
    per-step weights merged, the first step's as the shared weight and the later steps' differences to it
    (`num_steps - 1` deltas): the first step's delta is then zero. Checkpoints saved before it stored a delta for
    every step, from a shared weight between them; both load."""
    if delta.shape[0] == num_steps - 1:
        return torch.cat([delta.new_zeros(1, *delta.shape[1:]), delta])
    if delta.shape[0] == num_steps:
        return delta
    raise UnsupportedMoRCheckpoint(
        f"the checkpoint's {checkpoint_name} holds {delta.shape[0]} per-step deltas, and num_recursions="
        f"{num_steps} needs {num_steps - 1} (or {num_steps}, as older checkpoints store them): do the config and the "
        f"weights belong to the same checkpoint?"
    )


class StepDelta(nn.Module):
    """A relaxed projection's per-step delta (relaxation_mor.RelaxedLinear's parameters): `x A_r^T B_r^T + b_r`, or
    `x D_r^T + b_r` for a full-rank delta (`per_step_deltas`: zero at the first step of a checkpoint that stores its
    per-step weights merged)."""

    def __init__(self, num_steps: int, rank: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        rank = min(rank, in_features, out_features)
        self.is_dense = rank == min(in_features, out_features)
        if self.is_dense:
            self.relaxation_delta = nn.Parameter(torch.zeros(num_steps, out_features, in_features), requires_grad=False)
        else:
            self.relaxation_A = nn.Parameter(torch.zeros(num_steps, rank, in_features), requires_grad=False)
            self.relaxation_B = nn.Parameter(torch.zeros(num_steps, out_features, rank), requires_grad=False)
        self.relaxation_bias = nn.Parameter(torch.zeros(num_steps, out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.is_dense:
            delta = x @ self.relaxation_delta[step].t()
        else:
            delta = (x @ self.relaxation_A[step].t()) @ self.relaxation_B[step].t()
        return delta if self.relaxation_bias is None else delta + self.relaxation_bias[step]


def step_projection(config: MoRConfig, build) -> nn.Module:
    """A projection of a shared layer: one vLLM parallel linear layer (`build("")`), or, for a checkpoint whose
    relaxation is full rank, one per recursion step (`build(".r")`) holding that step's merged weight W + D_r
    (`StepWeightMerger`): each step then runs one product per projection, as the source's layer did, and its weights
    shard under tensor parallelism like any Llama layer's."""
    if config.has_full_rank_relaxation:
        return nn.ModuleList([build(f".{step}") for step in range(config.num_recursions)])
    return build("")


def at_step(projection: nn.Module, step: int) -> nn.Module:
    """The layer a `step_projection` runs at recursion step `step`."""
    return projection[step] if isinstance(projection, nn.ModuleList) else projection


class StepWeightMerger:
    """Loads a full-rank relaxed checkpoint's block projections as per-step weights (`step_projection`). The shared
    tensor ("weight", "bias") and its per-step deltas ("relaxation_delta", "relaxation_bias") arrive in any order;
    once both have, `add` returns each step's sum W + D_r (b + db_r) under the step's checkpoint-style name
    ("...q_proj.{r}.weight"), which `vllm_parameter_name` maps like any projection's."""

    DELTA_OF = {"weight": "relaxation_delta", "bias": "relaxation_bias"}
    SHARED_OF = {delta: shared for shared, delta in DELTA_OF.items()}

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    @classmethod
    def takes(cls, checkpoint_name: str) -> bool:
        parts = checkpoint_name.rsplit(".", 2)
        return (".recursion_block.layers." in checkpoint_name and len(parts) == 3 and parts[1].endswith("_proj")
                and (parts[2] in cls.DELTA_OF or parts[2] in cls.SHARED_OF))

    def add(self, checkpoint_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        projection, parameter = checkpoint_name.rsplit(".", 1)
        shared = self.SHARED_OF.get(parameter, parameter)
        arrived = self.pending.setdefault((projection, shared), {})
        arrived[parameter] = tensor
        if len(arrived) < 2:
            return []
        del self.pending[(projection, shared)]
        base, deltas = arrived[shared], arrived[self.DELTA_OF[shared]]
        if shared == "weight":
            deltas = per_step_deltas(f"{projection}.relaxation_delta", deltas, self.num_steps)
        return [(f"{projection}.{step}.{shared}", base + deltas[step]) for step in range(deltas.shape[0])]

    def check_complete(self) -> None:
        if self.pending:
            (projection, shared), arrived = next(iter(self.pending.items()))
            raise UnsupportedMoRCheckpoint(
                f"the checkpoint holds {projection}.{next(iter(arrived))} without its "
                f"{projection}.{self.DELTA_OF[shared] if shared in arrived else shared}: a full-rank relaxed layer "
                f"needs both. Is it a complete checkpoint saved by this project's MoRForCausalLM?"
            )


class StepRMSNorm(RMSNorm):
    """vLLM's RMSNorm; in a relaxed layer with a per-step weight delta (relaxation_mor.RelaxedRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float, num_relaxed_steps: int = 0):
        super().__init__(hidden_size, eps=eps)
        self.relaxation_weight = None
        if num_relaxed_steps:
            self.relaxation_weight = nn.Parameter(torch.zeros(num_relaxed_steps, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.relaxation_weight is None:
            return super().forward(x)
        return ir.ops.rms_norm(x, self.weight + self.relaxation_weight[step], self.variance_epsilon)


class RecursionStepAttention(Attention):
    """vLLM's Attention for a shared layer at one recursion step, with routed-token KV (routed_kv.py): its KV cache
    spec puts it in the step's own KV cache groups; `routed`: the step stores only the tokens routed to it."""

    def __init__(self, *args, recursion_step: int, routed: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.recursion_step = recursion_step
        self.routed = routed

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        from .routed_kv import RecursionStepSpec

        spec = super().get_kv_cache_spec(vllm_config)
        attention_fields = {field.name: getattr(spec, field.name) for field in dataclasses.fields(AttentionSpec)}
        return RecursionStepSpec(**attention_fields, recursion_step=self.recursion_step, routed=self.routed)


class MoRBlockAttention(nn.Module):
    """The attention of a shared layer: its projections run on a step's tokens; each step that stores keys has its
    own vLLM `Attention` (named by the step's unrolled layer index). Where not every token takes the step, it stores
    only the step's tokens (routed-token KV, CPU backend) or masks the others' slots (other backends)."""

    def __init__(self, config: MoRConfig, vllm_config: VllmConfig, attention_prefixes: dict[int, str], prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.shares_step_one = config.kv_cache_policy == "shared"
        self.qkv_proj = step_projection(config, lambda suffix: QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.qkv_proj{suffix}",
        ))
        self.o_proj = step_projection(config, lambda suffix: RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.o_proj{suffix}",
        ))
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.relaxation = nn.ModuleDict()
        if has_step_deltas(config):
            sizes = {
                "q_proj": (config.hidden_size, config.num_attention_heads * self.head_dim),
                "k_proj": (config.hidden_size, config.num_key_value_heads * self.head_dim),
                "v_proj": (config.hidden_size, config.num_key_value_heads * self.head_dim),
                "o_proj": (config.num_attention_heads * self.head_dim, config.hidden_size),
            }
            for name, (in_features, out_features) in sizes.items():
                self.relaxation[name] = StepDelta(
                    config.num_recursions, config.relaxation_rank, in_features, out_features, config.attention_bias
                )

        full_steps = steps_every_token_takes(config)
        cache_dtype = vllm_config.cache_config.cache_dtype
        # Recursion-wise steps not every token takes: on the CPU backend they store only their routed tokens
        # (routed_kv.py); on other backends every token keeps a slot, masked where it skipped the step.
        self.stores_routed_tokens = stores_routed_tokens(config, current_platform)
        later_steps = {step for step in attention_prefixes if step >= full_steps}
        self.routed_steps = later_steps if self.stores_routed_tokens else set()
        self.masked_steps = set() if self.stores_routed_tokens else later_steps
        self.padded_head_size = (
            padded_head_size(self.head_dim, torch.get_default_dtype(), cache_dtype) if self.masked_steps else None
        )

        def step_attention(step: int, attention_prefix: str) -> Attention:
            arguments = dict(
                num_heads=self.num_heads,
                head_size=self.padded_head_size if step in self.masked_steps else self.head_dim,
                scale=self.head_dim**-0.5,
                num_kv_heads=self.num_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config,
                prefix=attention_prefix,
            )
            if self.stores_routed_tokens:
                return RecursionStepAttention(**arguments, recursion_step=step, routed=step in self.routed_steps)
            return Attention(**arguments)

        # Keyed by the step as a string (ModuleDict); under the shared policy only step 1 ("0") stores keys.
        self.attn = nn.ModuleDict(
            {str(step): step_attention(step, attention_prefix) for step, attention_prefix in attention_prefixes.items()}
        )

    def project(self, positions, hidden_states, step: int):
        """The step's queries, keys and values (rotary applied), `[tokens, heads * head_dim]` each."""
        qkv, _ = at_step(self.qkv_proj, step)(hidden_states)
        if self.relaxation:
            qkv = qkv + torch.cat([self.relaxation[name](hidden_states, step) for name in ("q_proj", "k_proj", "v_proj")], -1)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def attend(self, q, k, v, step: int, step_tokens: RecursionStepTokens) -> torch.Tensor:
        if self.shares_step_one and step > 0:
            # Queries only: the keys/values are those step 1 stored.
            return self._attend(self.attn["0"], 0 in self.masked_steps, q, None, None, step_tokens)
        if step in self.routed_steps:
            return self._attend_routed(self.attn[str(step)], q, k, v, step_tokens)
        return self._attend(self.attn[str(step)], step in self.masked_steps, q, k, v, step_tokens)

    def output(self, attn_output, step: int) -> torch.Tensor:
        output, _ = at_step(self.o_proj, step)(attn_output)
        if self.relaxation:
            output = output + self.relaxation["o_proj"](attn_output, step)
        return output

    def write_untaken_step(self, step: int, step_tokens: RecursionStepTokens) -> None:
        """No token of the batch takes the step: every token's key slot for it is still written, masked, since later
        tokens' attention reads it (their outputs here are dropped)."""
        if (self.shares_step_one and step > 0) or step in self.routed_steps:
            return  # deeper steps of the shared policy store nothing; a routed step stores its routed tokens only
        attn, num_tokens = self.attn[str(step)], step_tokens.num_tokens
        keys = step_tokens.key_mask.new_zeros(num_tokens, self.num_kv_heads, attn.head_size)
        keys[:, :, self.head_dim] = KEY_MASK_VALUE
        values = torch.zeros_like(keys)
        queries = keys.new_zeros(num_tokens, self.num_heads * attn.head_size)
        attn(queries, keys.view(num_tokens, -1), values.view(num_tokens, -1))

    def _attend(self, attn: Attention, masked: bool, q, k, v, step_tokens: RecursionStepTokens) -> torch.Tensor:
        """vLLM attention for the step's tokens. vLLM's metadata describes every token of the batch, so the step's
        rows are placed among them (zeros elsewhere; those outputs are dropped), widened by the mask dimension where
        the attention is masked."""
        if step_tokens.index is None and not masked:
            return attn(q, k, v)
        width, head_dim = attn.head_size, self.head_dim
        requests = step_tokens.requests_of(attn)
        if requests is None:
            query_rows, token_rows = step_tokens.num_tokens, step_tokens.index
        else:
            query_rows, token_rows = requests.rows.numel(), requests.token_rows
        queries = q.new_zeros(query_rows, self.num_heads, width)
        queries[token_rows, :, :head_dim] = q.view(-1, self.num_heads, head_dim)
        if masked:
            queries[:, :, head_dim] = 1.0
        keys = values = None
        if k is not None:
            keys, values = self._step_keys_values(k, v, width, masked, step_tokens)
        with contextlib.nullcontext() if requests is None else requests.attending(attn):
            output = attn(queries.view(query_rows, -1), keys, values)
        return output.view(query_rows, self.num_heads, width)[token_rows, :, :head_dim].reshape(-1, self.q_size)

    def _attend_routed(self, attn: Attention, q, k, v, step_tokens: RecursionStepTokens) -> torch.Tensor:
        """vLLM attention over what a routed step stores (routed_kv.py): its tokens' keys and values are written at
        their compacted slots, and each attends over its request's stored tokens up to itself."""
        storage = step_tokens.storage
        if storage is None:  # vLLM's profiling run: no metadata, its attention computes nothing
            return attn(q, k, v)
        num_stored = storage.request.numel()  # the step's actual tokens (vLLM may pad the batch after them)
        if num_stored == 0:  # only padding rows took the step: nothing to store or attend
            return q.new_zeros(q.shape[0], self.q_size)
        with storage.attending(attn):
            output = attn(q[:num_stored], k[:num_stored], v[:num_stored])
        if num_stored < q.shape[0]:
            output = torch.cat([output, output.new_zeros(q.shape[0] - num_stored, output.shape[1])])
        return output

    def _step_keys_values(self, k, v, width: int, masked: bool, step_tokens: RecursionStepTokens):
        """Every batch token's key/value slot for the step: the step's tokens' own, the others zero (and masked)."""
        num_tokens, head_dim, index = step_tokens.num_tokens, self.head_dim, step_tokens.index
        keys = k.new_zeros(num_tokens, self.num_kv_heads, width)
        keys[index, :, :head_dim] = k.view(-1, self.num_kv_heads, head_dim)
        if masked:
            keys[:, :, head_dim] = step_tokens.key_mask.unsqueeze(-1)
        values = v.new_zeros(num_tokens, self.num_kv_heads, width)
        values[index, :, :head_dim] = v.view(-1, self.num_kv_heads, head_dim)
        return keys.view(num_tokens, -1), values.view(num_tokens, -1)


class MoRMLP(nn.Module):
    """Llama's MLP with vLLM's parallel layers; relaxed, with a per-step delta on each projection."""

    def __init__(self, config: MoRConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.gate_up_proj = step_projection(config, lambda suffix: MergedColumnParallelLinear(
            hidden, [intermediate] * 2, bias=config.mlp_bias, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.gate_up_proj{suffix}",
        ))
        self.down_proj = step_projection(config, lambda suffix: RowParallelLinear(
            intermediate, hidden, bias=config.mlp_bias, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.down_proj{suffix}",
        ))
        self.act_fn = SiluAndMul()
        self.relaxation = nn.ModuleDict()
        if has_step_deltas(config):
            sizes = {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
            for name, (in_features, out_features) in sizes.items():
                self.relaxation[name] = StepDelta(
                    config.num_recursions, config.relaxation_rank, in_features, out_features, config.mlp_bias
                )

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        gate_up, _ = at_step(self.gate_up_proj, step)(x)
        if self.relaxation:
            gate_up = gate_up + torch.cat([self.relaxation["gate_proj"](x, step), self.relaxation["up_proj"](x, step)], -1)
        activated = self.act_fn(gate_up)
        output, _ = at_step(self.down_proj, step)(activated)
        if self.relaxation:
            output = output + self.relaxation["down_proj"](activated, step)
        return output


def compile_for_token_counts(forward):
    """`forward` compiled for any token count (the rows of its tensor arguments are the pass's tokens).

    Dynamo specializes a size of 1 (its 0/1 specialization): a graph traced on many tokens would be traced and compiled
    again the first time a pass brings a single token, a second or two in the middle of serving. So the first call
    made without attention metadata (vLLM's profiling run, where attention computes and stores nothing) also traces
    the one-token graph, on `first_row_copy` of each tensor argument."""
    compiled = torch.compile(forward, dynamic=True, fullgraph=True)
    one_token_traced = False

    @functools.wraps(forward)
    def forward_compiled(*args):
        nonlocal one_token_traced
        output = compiled(*args)
        if not one_token_traced and args[0].shape[0] > 1 and get_forward_context().attn_metadata is None:
            compiled(*(first_row_copy(arg) if isinstance(arg, torch.Tensor) else arg for arg in args))
            one_token_traced = True
        return output

    return forward_compiled


def first_row_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the tensor's first row, a view of that copy where the tensor is a view: Dynamo guards whether an
    argument is a view, so the one-token graph is traced on what a one-token pass will pass."""
    row = tensor[:1].clone()
    return row.view(row.shape) if tensor._is_view() else row


class MoRDecoderLayer(nn.Module):
    """A shared layer of the recursion block, applied to one step's tokens."""

    def __init__(self, config: MoRConfig, vllm_config: VllmConfig, attention_prefixes: dict[int, str], prefix: str):
        super().__init__()
        relaxed_steps = config.num_recursions if config.relaxation_rank > 0 else 0
        self.self_attn = MoRBlockAttention(config, vllm_config, attention_prefixes, prefix=f"{prefix}.self_attn")
        self.mlp = MoRMLP(config, vllm_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = StepRMSNorm(config.hidden_size, config.rms_norm_eps, relaxed_steps)
        self.post_attention_layernorm = StepRMSNorm(config.hidden_size, config.rms_norm_eps, relaxed_steps)

    def forward(self, positions, hidden_states, step: int, step_tokens: RecursionStepTokens) -> torch.Tensor:
        q, k, v = self.attention_input(positions, hidden_states, step)
        attn_output = self.self_attn.attend(q, k, v, step, step_tokens)
        return self.layer_output(hidden_states, attn_output, step)

    def attention_input(self, positions, hidden_states, step: int):
        """The token-wise work before attention: the norm, the projections and rotary."""
        return self.self_attn.project(positions, self.input_layernorm(hidden_states, step), step)

    def layer_output(self, hidden_states, attn_output, step: int) -> torch.Tensor:
        """The token-wise work after attention: the output projection, the norm, the MLP and both residuals."""
        hidden_states = hidden_states + self.self_attn.output(attn_output, step)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states, step), step)

    def compile_token_wise(self) -> None:
        """torch.compile the work before and after attention. A step's token count depends on the routing, so
        vLLM's whole-model compile cannot trace the recursion loop; the loop and attention stay eager, and these
        pieces compile once for every block layer (their parameters are graph inputs) and any token count."""
        self.attention_input = compile_for_token_counts(self.attention_input)
        self.layer_output = compile_for_token_counts(self.layer_output)


class MoRRecursionBlock(nn.Module):
    """The shared layers, the project's routing, and the recursion loop over each step's tokens."""

    def __init__(self, config: MoRConfig, vllm_config: VllmConfig, first_unrolled_index: int, prefix: str):
        super().__init__()
        self.config = config
        # The unrolled index of every (step, position): it names the step's Attention ("model.layers.{i}..."), one
        # integer per name, in the order a full-depth token meets the layers, as vLLM's KV cache binding expects.
        unrolled = [(step, position) for step, positions in config.unrolled_schedule() for position in positions]
        stored_steps = [0] if config.kv_cache_policy == "shared" else range(config.num_recursions)
        layers = []
        for position in range(config.block_size):
            attention_prefixes = {
                step: f"model.layers.{first_unrolled_index + unrolled.index((step, position))}.self_attn.attn"
                for step in stored_steps
            }
            layers.append(MoRDecoderLayer(config, vllm_config, attention_prefixes, prefix=f"{prefix}.layers.{position}"))
        self.layers = nn.ModuleList(layers)
        self.routing = build_routing(config)
        self.full_steps = steps_every_token_takes(config)
        # Tokens per recursion depth since the model was built (index d: tokens that took d steps), read by the
        # benchmark through LLM.apply_model; eval routing is causal, so a token's depth does not depend on its batch.
        self.register_buffer("depth_counts", torch.zeros(config.num_recursions + 1, dtype=torch.long), persistent=False)
        # Routed-token KV (routed_kv.py): the tokens each step stored per request, kept across forward passes.
        self.routed_token_counts = None
        if layers[0].self_attn.stores_routed_tokens:
            self.routed_token_counts = RoutedTokenCounts(config.num_recursions)
            self.routed_layer_name = layers[0].self_attn.attn[str(self.full_steps)].layer_name

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        config = self.config
        num_tokens = hidden_states.shape[0]
        device = hidden_states.device
        forward_counts = None
        batch = batch_requests(self.routed_layer_name) if self.routed_token_counts is not None else None
        if batch is not None:
            request_of_token, context_lens, num_actual_tokens = batch
            forward_counts = self.routed_token_counts.begin(context_lens)
        if config.routing == "token_choice":
            chosen_depth, token_gate, _ = self.routing(hidden_states, torch.ones(num_tokens, dtype=torch.bool, device=device))
            recursion_input = hidden_states
        active = torch.arange(num_tokens, device=device)
        depth = torch.zeros(num_tokens, dtype=torch.long, device=device)
        steps: dict[int, RecursionStepTokens] = {}
        gates: dict[int, torch.Tensor] = {}
        for step, positions_in_pass in config.unrolled_schedule():
            if step not in steps:
                # The first time this step runs: decide who takes it, as generate() does (routing_mor.py).
                if config.routing == "expert_choice":
                    candidates = torch.ones_like(active, dtype=torch.bool)
                    selected, gates[step], _ = self.routing(hidden_states[active], candidates, candidates, step)
                    active, gates[step] = active[selected], gates[step][selected]
                elif config.routing == "token_choice":
                    active = active[chosen_depth[active] > step]
                if step < self.full_steps:
                    steps[step] = RecursionStepTokens(num_tokens)
                elif self.routed_token_counts is not None:
                    # Routed-token KV: no key mask to build, the step's storage says where its tokens go.
                    steps[step] = RecursionStepTokens(num_tokens, index=active)
                    if forward_counts is not None:
                        storage = RoutedStepStorage(
                            active[active < num_actual_tokens], request_of_token, forward_counts.stored_before[:, step]
                        )
                        steps[step].storage = storage
                        forward_counts.routed[:, step] = storage.routed
                else:
                    steps[step] = RecursionStepTokens.of(active, num_tokens, hidden_states.dtype)
                depth.index_add_(0, active, torch.ones_like(active))
            step_tokens = steps[step]
            if step_tokens.index is not None and step_tokens.index.numel() == 0:
                for position in positions_in_pass:
                    self.layers[position].self_attn.write_untaken_step(step, step_tokens)
                continue
            block_input = step_tokens.take(hidden_states)
            step_positions = step_tokens.take(positions)
            block_hidden = block_input
            for position in positions_in_pass:
                block_hidden = self.layers[position](step_positions, block_hidden, step, step_tokens)
            if config.routing == "expert_choice":
                block_hidden = apply_gate(config, block_input, block_hidden, gates[step])
            hidden_states = step_tokens.put(hidden_states, block_hidden)
        if config.routing == "token_choice":
            # Token-choice gates once, at the end: H^1 + w * f^d(H^1).
            hidden_states = apply_gate(config, recursion_input, hidden_states, token_gate)
        self.depth_counts += torch.bincount(depth, minlength=config.num_recursions + 1)
        if forward_counts is not None:
            self.routed_token_counts.end(forward_counts)
        return hidden_states


class MoRModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config)
        offset = 1 if config.has_unshared_ends else 0
        # The unshared first/last layers are Llama's layers; their Attention is named by their unrolled index.
        self.first_layer = self.last_layer = None
        if config.has_unshared_ends:
            self.first_layer = LlamaDecoderLayer(vllm_config=vllm_config, prefix="model.layers.0")
            self.last_layer = LlamaDecoderLayer(vllm_config=vllm_config, prefix=f"model.layers.{config.num_hidden_layers - 1}")
        self.recursion_block = MoRRecursionBlock(config, vllm_config, offset, prefix=f"{prefix}.recursion_block")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.compiles_pieces = vllm_config.compilation_config.mode != CompilationMode.NONE
        if self.compiles_pieces:
            # vLLM's compile mode (its default on a GPU; on the CPU only where the user chose it, checks.py). Its own
            # compile traces a whole forward, which routing makes data-dependent, so the model compiles what has static
            # structure: the end layers and the block layers' token-wise work (MoRDecoderLayer.compile_token_wise).
            for layer in self.recursion_block.layers:
                layer.compile_token_wise()
            for layer in (self.first_layer, self.last_layer):
                if layer is not None:
                    layer.forward = compile_for_token_counts(layer.forward)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if self.compiles_pieces:
            # vLLM passes a view of its positions buffer. The compiled pieces would then meet a view at the steps every
            # token takes and a fresh tensor (the step's rows) at routed ones, and Dynamo keeps a graph for each: it
            # guards whether a tensor is a view, and the size of its base.
            positions = positions.clone()
        if self.first_layer is not None:
            hidden_states, residual = self.first_layer(positions, hidden_states, None)
            hidden_states = hidden_states + residual
        hidden_states = self.recursion_block(positions, hidden_states)
        if self.last_layer is not None:
            hidden_states, residual = self.last_layer(positions, hidden_states, None)
            hidden_states = hidden_states + residual
        return self.norm(hidden_states)


class MoRForCausalLM(nn.Module):
    """vLLM's causal LM for checkpoints saved by the project (`architectures: ["MoRForCausalLM"]`)."""

    # The checkpoint's q/k/v and gate/up projections load into vLLM's merged layers.
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel_config = vllm_config.parallel_config
        check_servable(config, parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size)
        self.config = config
        self.model = MoRModel(vllm_config=vllm_config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads the checkpoint's tensors by their transformers names (`vllm_parameter_name`)."""
        params = dict(self.named_parameters())
        params.update(self.named_buffers())  # token-choice's selection_bias
        loaded = set()
        num_steps = self.config.num_recursions
        merger = StepWeightMerger(num_steps) if self.config.has_full_rank_relaxation else None
        for checkpoint_name, tensor in weights:
            if self.config.tie_word_embeddings and checkpoint_name == "lm_head.weight":
                continue
            if merger is not None and merger.takes(checkpoint_name):
                for step_name, step_tensor in merger.add(checkpoint_name, tensor):
                    loaded.add(self._load_tensor(params, step_name, step_tensor))
                continue
            if checkpoint_name.endswith(".relaxation_delta"):  # a full-rank delta of a low-rank relaxed checkpoint
                tensor = per_step_deltas(checkpoint_name, tensor, num_steps)
            loaded.add(self._load_tensor(params, checkpoint_name, tensor))
        if merger is not None:
            merger.check_complete()
        return loaded

    @staticmethod
    def _load_tensor(params: dict, checkpoint_name: str, tensor: torch.Tensor) -> str:
        """Loads one tensor by its transformers name into its parameter; returns the parameter's name."""
        name, shard = vllm_parameter_name(checkpoint_name)
        if name not in params:
            raise UnsupportedMoRCheckpoint(
                f"the checkpoint holds {checkpoint_name!r}, which this MoR model has no place for: is it a "
                f"checkpoint saved by this project's MoRForCausalLM?"
            )
        param = params[name]
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            weight_loader(param, tensor)
        else:
            weight_loader(param, tensor, shard)
        return name


# transformers' projections that vLLM merges: (its name, the merged layer, the shard).
MERGED_PROJECTIONS = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]


def vllm_parameter_name(checkpoint_name: str) -> tuple[str, str | int | None]:
    """A checkpoint tensor's parameter in this model, and its shard in a merged layer (None when not merged).

    A relaxed projection's deltas stay apart: "...self_attn.q_proj.relaxation_A" loads into
    "...self_attn.relaxation.q_proj.relaxation_A"; a relaxed norm's "relaxation_weight" keeps its name."""
    parts = checkpoint_name.rsplit(".", 2)
    if len(parts) == 3 and parts[2].startswith("relaxation_") and parts[1].endswith("_proj"):
        module_path, projection, parameter = parts
        return f"{module_path}.relaxation.{projection}.{parameter}", None
    for original, merged, shard in MERGED_PROJECTIONS:
        if original in checkpoint_name:
            return checkpoint_name.replace(original, merged), shard
    return checkpoint_name, None


def depth_counts_of(model: MoRForCausalLM) -> list[int]:
    """Tokens per recursion depth the model has run since it was built (`LLM.apply_model(depth_counts_of)`)."""
    return model.model.recursion_block.depth_counts.tolist()

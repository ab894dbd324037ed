"""Attention of a recursion step over only the requests, or only the stored tokens, it concerns.

vLLM's attention metadata describes every request of the batch, so a deeper recursion step that one token in five
takes would still read every request's keys. For the CPU backend (CPUAttentionMetadata) a step's attention gets a
metadata of its own:

- `StepRequests` (steps whose keys are stored for every token: the shared policy's deeper steps, which read step 1's
  keys): the requests with at least one token at the step, their query rows, sequence lengths and block tables, and
  the kernel's work schedule recomputed for them; the other requests' keys are not read.
- `RoutedStepStorage` (recursion-wise steps that store only their routed tokens, routed_kv.py): the step's tokens
  are written at compacted slots of the step's block tables, and each attends over its request's stored tokens.

Other backends read the whole batch at every step (correct, only slower): `StepRequests.of` returns None for them,
and the model says so once in the log.
"""

import contextlib
from dataclasses import dataclass, replace

import torch
from vllm import envs
from vllm.forward_context import get_forward_context


try:
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
except ImportError:  # a vLLM build without the CPU backend
    CPUAttentionMetadata = None


@dataclass
class StepRequests:
    """The requests that have a token at a recursion step, among the batch's requests.

    `rows` are the batch rows (tokens) of those requests, in batch order: the query rows the step's attention takes.
    `token_rows` places each of the step's tokens among `rows`. `requests` indexes the batch's requests."""

    requests: torch.Tensor
    rows: torch.Tensor
    token_rows: torch.Tensor
    _metadata: dict

    @classmethod
    def of(cls, layer_name: str, token_index: torch.Tensor) -> "StepRequests | None":
        """From the batch's metadata of the attention layer `layer_name`; None where the backend is not handled (the
        step then attends with every request) or nothing would be saved (every request has a token at the step)."""
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):  # micro-batches or speculative decoding: keep vLLM's metadata
            return None
        metadata = metadata.get(layer_name)
        if CPUAttentionMetadata is None or not isinstance(metadata, CPUAttentionMetadata) or metadata.encoder_cache is not None:
            return None
        query_start = metadata.query_start_loc.long()
        num_tokens = int(query_start[-1])
        if token_index.numel() == 0 or metadata.num_actual_tokens != num_tokens:
            # No token takes the step (the attention still writes every masked key), or padded rows: whole batch.
            return None
        request_of_row = torch.searchsorted(query_start[1:], torch.arange(num_tokens, device=query_start.device), right=True)
        requests = torch.unique(request_of_row[token_index])
        if requests.numel() == query_start.numel() - 1:
            return None
        kept = torch.zeros(query_start.numel() - 1, dtype=torch.bool, device=query_start.device)
        kept[requests] = True
        rows = kept[request_of_row].nonzero().squeeze(-1)
        return cls(requests, rows, torch.searchsorted(rows, token_index), {})

    def metadata_for(self, layer) -> "CPUAttentionMetadata":
        """The layer's metadata restricted to these requests; computed once per step and group of layers (layers
        that share a metadata object share its restriction)."""
        metadata = get_forward_context().attn_metadata[layer.layer_name]
        key = (id(metadata), layer.head_size)
        if key not in self._metadata:
            query_lengths = metadata.query_start_loc.diff()[self.requests]
            query_start = torch.zeros(self.requests.numel() + 1, dtype=metadata.query_start_loc.dtype)
            torch.cumsum(query_lengths, 0, out=query_start[1:])
            seq_lens = metadata.seq_lens[self.requests]
            schedule = kernel_schedule(layer, metadata, self.requests, query_start, seq_lens)
            self._metadata[key] = replace(
                metadata,
                num_actual_tokens=self.rows.numel(),
                max_query_len=int(query_lengths.max()),
                query_start_loc=query_start,
                max_seq_len=int(seq_lens.max()),
                seq_lens=seq_lens,
                block_table=metadata.block_table[self.requests],
                slot_mapping=metadata.slot_mapping[self.rows],
                scheduler_metadata=schedule,
            )
        return self._metadata[key]

    @contextlib.contextmanager
    def attending(self, layer):
        """While the layer attends, vLLM's metadata for it is the restricted one."""
        metadata = get_forward_context().attn_metadata
        batch_metadata = metadata[layer.layer_name]
        metadata[layer.layer_name] = self.metadata_for(layer)
        try:
            yield
        finally:
            metadata[layer.layer_name] = batch_metadata


def kernel_schedule(layer, metadata, requests: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor):
    """The CPU attention kernel's work schedule for `requests` of the batch with these query rows and key lengths."""
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests.numel(),
        num_heads=layer.num_heads,
        num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_size,
        seq_lens=seq_lens,
        dtype=layer.dtype,
        query_start_loc=query_start,
        causal=metadata.causal,
        sliding_window_size=-1 if layer.sliding_window is None else layer.sliding_window,
        isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None if metadata.dynamic_causal is None else metadata.dynamic_causal[requests],
        kv_cache_dtype=layer.kv_cache_dtype,
    )


def batch_requests(layer_name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """From vLLM's metadata of the attention layer `layer_name`: each actual token's request (batch order), each
    request's context length (its tokens computed before this forward pass), and the number of actual tokens. None
    where the forward pass has no metadata (vLLM's profiling and warm-up runs)."""
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict):
        return None
    metadata = metadata[layer_name]
    query_start = metadata.query_start_loc.long()
    num_tokens = metadata.num_actual_tokens
    request_of_token = torch.searchsorted(query_start[1:], torch.arange(num_tokens, device=query_start.device), right=True)
    context_lens = metadata.seq_lens.long() - query_start.diff()
    return request_of_token, context_lens, num_tokens


class RoutedStepStorage:
    """A routed recursion step's KV storage in one forward pass (routed_kv.py): the step's tokens are written at
    compacted slots (a request's j-th stored token at slot j of the step's block table) and its attention reads the
    stored tokens only: per request, its stored tokens so far plus its routed tokens of this pass, with the causal
    mask aligned at the end (a routed token sees the stored tokens up to itself).

    `token_index`: the step's tokens among the batch's actual tokens (sorted); `request_of_token`: each actual
    token's request; `stored_before`: per request, the tokens the step stored before this pass."""

    def __init__(self, token_index: torch.Tensor, request_of_token: torch.Tensor, stored_before: torch.Tensor):
        request = request_of_token[token_index]
        routed = torch.bincount(request, minlength=stored_before.numel())
        first_of_request = torch.cumsum(routed, 0) - routed
        self.stored_slot = stored_before[request] + torch.arange(request.numel()) - first_of_request[request]
        self.request = request
        self.routed = routed
        self.requests = routed.nonzero().squeeze(-1)
        self.query_start = torch.zeros(self.requests.numel() + 1, dtype=torch.int32)
        torch.cumsum(routed[self.requests], 0, out=self.query_start[1:])
        self.seq_lens = (stored_before + routed)[self.requests].to(torch.int32)
        self._metadata = {}

    def metadata_for(self, layer) -> tuple["CPUAttentionMetadata", torch.Tensor]:
        """The layer's metadata and slot mapping for the step's stored tokens; computed once per step and KV cache
        group (layers of one group share vLLM's metadata object, and so its block tables)."""
        metadata = get_forward_context().attn_metadata[layer.layer_name]
        key = (id(metadata), layer.head_size)
        if key not in self._metadata:
            block_size = layer.kv_cache.shape[2]
            blocks = metadata.block_table[self.request, self.stored_slot // block_size].long()
            slot_mapping = blocks * block_size + self.stored_slot % block_size
            schedule = kernel_schedule(layer, metadata, self.requests, self.query_start, self.seq_lens)
            routed = self.routed[self.requests]
            self._metadata[key] = (
                replace(
                    metadata,
                    num_actual_tokens=self.request.numel(),
                    max_query_len=int(routed.max()),
                    query_start_loc=self.query_start,
                    max_seq_len=int(self.seq_lens.max()),
                    seq_lens=self.seq_lens,
                    block_table=metadata.block_table[self.requests],
                    slot_mapping=slot_mapping,
                    scheduler_metadata=schedule,
                ),
                slot_mapping,
            )
        return self._metadata[key]

    @contextlib.contextmanager
    def attending(self, layer):
        """While the layer attends, vLLM's metadata and KV write slots for it are the step's."""
        context = get_forward_context()
        batch_metadata = context.attn_metadata[layer.layer_name]
        batch_slots = context.slot_mapping.get(layer.layer_name)
        context.attn_metadata[layer.layer_name], context.slot_mapping[layer.layer_name] = self.metadata_for(layer)
        try:
            yield
        finally:
            context.attn_metadata[layer.layer_name] = batch_metadata
            context.slot_mapping[layer.layer_name] = batch_slots

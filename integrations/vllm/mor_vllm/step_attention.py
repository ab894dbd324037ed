"""Attention of a recursion step over only the requests that have a token at that step.

vLLM's attention metadata describes every request of the batch, so a deeper recursion step that one token in five
takes would still read every request's keys. For the CPU backend (CPUAttentionMetadata) the step's attention gets a
metadata of its own, for the requests with at least one token at the step: their query rows, sequence lengths and
block tables, and the kernel's work schedule recomputed for them; the other requests' keys are not read. Every
token's key is still written to the cache (the write uses the batch's slot mapping, not this metadata).

Other backends read the whole batch at every step (correct, only slower): `StepRequests.of` returns None for them,
and the model says so once in the log.
"""

import contextlib
from dataclasses import dataclass, replace

import torch
from vllm import envs
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger


logger = init_logger(__name__)

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
            schedule = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=self.requests.numel(),
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
                dynamic_causal=None if metadata.dynamic_causal is None else metadata.dynamic_causal[self.requests],
                kv_cache_dtype=layer.kv_cache_dtype,
            )
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

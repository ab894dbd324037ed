"""A recursion step's tokens, packed, and the attention over them.

A recursion step runs on the tokens routed to it: its token-wise work on those tokens packed into one sequence, its
attention per batch row (`ActiveTokens`). Packing makes the usual lower triangle meaningless, so masks are built from
each token's index in the sequence (`build_attention_mask`). The model's recursion loop (modeling_mor.py) and the
serving engine's block passes (serving_mor.py) both run the shared layers on tokens packed this way.
"""

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import create_block_mask


@dataclass
class ActiveTokens:
    """The tokens taking a recursion step, in two layouts.

    Token-wise work (projections, MLP, norms, gates) runs on the active tokens alone, packed into one sequence `[N,
    ...]` in (row, position) order (`take` / `put`): the matmuls then cost exactly the tokens routed to the step.
    Attention runs per batch row, on the active tokens packed to the left of their rows, `[rows, width, ...]`
    (`per_row`, `to_row_layout`, `from_row_layout`); `valid` marks the real entries, since rows hold different
    numbers of active tokens. Rows without any active token are left out of both.

    Under torch.compile (`in_place`) the layouts keep every token in its place instead: shapes then do not depend on
    the routing, so the forward compiles as one graph; the step computes every token and keeps the active ones.
    """

    rows: torch.LongTensor
    index: torch.LongTensor
    valid: torch.BoolTensor
    token_rows: torch.LongTensor
    token_index: torch.LongTensor
    is_everything: bool  # every token of the batch is in the layouts, in place
    rows_are_full: bool  # every row holds `width` tokens (decoding, training top-k): the two layouts are one reshape
    in_place: torch.BoolTensor | None = None  # the active tokens, when inactive ones are computed and dropped

    @classmethod
    def from_mask(cls, active: torch.BoolTensor, in_place: bool = False) -> "ActiveTokens":
        batch_size, seq_len = active.shape
        device = active.device
        if in_place:
            index = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
            rows = torch.arange(batch_size, device=device)
            token_rows = rows.repeat_interleave(seq_len)
            return cls(rows, index, active, token_rows, index.reshape(-1), True, True, in_place=active)
        if bool(active.all()):
            index = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
            rows = torch.arange(batch_size, device=device)
            token_rows = rows.repeat_interleave(seq_len)
            return cls(rows, index, active, token_rows, index.reshape(-1), True, True)
        if seq_len == 1:  # a decode step: the active rows, one token each
            rows = active[:, 0].nonzero().squeeze(-1)
            index = torch.zeros(rows.numel(), 1, dtype=torch.long, device=device)
            return cls(rows, index, torch.ones_like(index, dtype=torch.bool), rows, index.squeeze(-1), False, True)
        counts = active.sum(-1)
        rows = counts.nonzero().squeeze(-1)
        row_active = active[rows]
        width = int(counts.max())
        # A stable sort of "inactive" puts each row's active tokens first, in sequence order.
        index = torch.argsort((~row_active).to(torch.int8), dim=-1, stable=True)[:, :width]
        valid = torch.arange(width, device=device) < counts[rows].unsqueeze(-1)
        # Row-major order of `valid` is (row, position) order: the packed sequence and the rows hold the same tokens.
        token_rows, token_index = active.nonzero(as_tuple=True)
        return cls(rows, index, valid, token_rows, token_index, False, bool(valid.all()))

    @classmethod
    def from_row_counts(cls, counts: torch.LongTensor) -> "ActiveTokens":
        """Tokens already packed row after row (`counts[i]` tokens of row i, in sequence order), as continuous
        batching holds them: every row takes the step, each with its own number of tokens."""
        device = counts.device
        rows = torch.arange(counts.numel(), device=device)
        width = int(counts.max())
        index = torch.arange(width, device=device).expand(counts.numel(), width)
        valid = index < counts.unsqueeze(-1)
        token_rows, token_index = valid.nonzero(as_tuple=True)
        return cls(rows, index, valid, token_rows, token_index, False, bool(valid.all()))

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The active tokens of a `[batch, seq, ...]` tensor, packed into one sequence: `[N, ...]`."""
        if self.is_everything:
            return tensor.reshape(-1, *tensor.shape[2:])
        return tensor[self.token_rows, self.token_index]

    def put(self, tensor: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Writes the packed `tokens` back into a copy of `tensor` (out of place, so autograd sees it)."""
        if self.in_place is not None:
            return torch.where(self.in_place.unsqueeze(-1), tokens.reshape(tensor.shape), tensor)
        if self.is_everything:
            return tokens.reshape(tensor.shape)
        return tensor.index_put((self.token_rows, self.token_index), tokens)

    def per_row(self, tensor: torch.Tensor) -> torch.Tensor:
        """The active tokens of a `[batch, seq, ...]` tensor, packed to the left of their rows: `[rows, width, ...]`
        (padding entries hold whatever token their index points at; `valid` tells them apart)."""
        if self.is_everything:
            return tensor
        return tensor[self.rows.unsqueeze(-1), self.index]

    def to_row_layout(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, ...]` packed tokens to `[rows, width, ...]`, zero in the padding entries."""
        if self.rows_are_full:
            return tokens.reshape(*self.index.shape, *tokens.shape[1:])
        per_row_states = tokens.new_zeros((*self.index.shape, *tokens.shape[1:]))
        return per_row_states.index_put((self.valid,), tokens)

    def from_row_layout(self, per_row_states: torch.Tensor) -> torch.Tensor:
        """`[rows, width, ...]` to the `[N, ...]` packed tokens (drops the padding entries)."""
        if self.rows_are_full:
            return per_row_states.reshape(-1, *per_row_states.shape[2:])
        return per_row_states[self.valid]


class RowBuckets(NamedTuple):
    """Ranges of rows that attend with their own query and key widths.

    Continuous batching packs rows of very different sizes into one pass: one-token decode rows next to a prefill
    chunk of a hundred tokens. In one padded call every row would score the widest row's queries against the longest
    row's keys (most of a mixed pass's time); each range `(first row, end row, query width, key width)` attends alone
    instead, over the slices of the padded layouts. Attention weights are not returned. `stopwatch` (anything with
    `add(seconds)`) is told how long the kernels took."""

    ranges: tuple[tuple[int, int, int, int], ...]
    stopwatch: object | None = None

    @classmethod
    def of(cls, query_counts: list[int], key_widths: list[int], stopwatch=None) -> "RowBuckets":
        """Rows ordered so that equal query counts are contiguous: one range per run of equal counts (decode rows
        share one), each as wide as its widest row's keys."""
        ranges, first = [], 0
        for row in range(1, len(query_counts) + 1):
            if row == len(query_counts) or query_counts[row] != query_counts[first]:
                ranges.append((first, row, query_counts[first], max(key_widths[first:row])))
                first = row
        return cls(tuple(ranges), stopwatch)

    def attend(self, attention_interface, module, query, key, value, attention_mask, **kwargs):
        """`attention_interface` on every range; the output in the padded layout, `[rows, width, heads, head_dim]`
        (zeros where a row has no query)."""
        started = time.perf_counter()
        output = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        for first, end, query_width, key_width in self.ranges:
            mask = attention_mask[first:end, :, :query_width, :key_width] if attention_mask is not None else None
            range_output, _ = attention_interface(
                module,
                query[first:end, :, :query_width],
                key[first:end, :, :key_width],
                value[first:end, :, :key_width],
                mask,
                **kwargs,
            )
            output[first:end, :query_width] = range_output
        if self.stopwatch is not None:
            self.stopwatch.add(time.perf_counter() - started)
        return output, None


@dataclass
class KeyRows:
    """Which rows of the keys/values a recursion step attends to: those of the rows taking the step.

    Under the shared policy a deeper step reuses step 1's keys, which exist for the rows that took step 1 (with or
    without a cache); `positions` indexes the step's rows among them. Selection uses `index_select`: advanced
    indexing of strided views was measured several times slower."""

    positions: torch.LongTensor

    @classmethod
    def of(cls, rows: torch.LongTensor, among: torch.LongTensor) -> "KeyRows | None":
        """The selection of `rows` among the key rows `among`; None when they are the same rows. Both are sorted
        batch indices, and `rows` are among the key rows: a token that stops never continues."""
        return None if torch.equal(among, rows) else cls(torch.searchsorted(among, rows))

    def select(self, *tensors):
        """The selected rows of each batch-first tensor (keys and values, or the key layout)."""
        return tuple(tensor.index_select(0, self.positions) for tensor in tensors)


class StepAttention(NamedTuple):
    """What every layer of a recursion step shares: its attention mask, the key rows it reads (None when they are
    exactly its rows), the key layout `(key_index, key_valid)` of every key row (read again by deeper steps under
    the shared policy), the sequence index of each of its queries (-1 in padding entries) and the layout of the keys
    they read, which place its attention weights in the whole sequence when they are recorded."""

    mask: torch.Tensor | None
    key_rows: KeyRows | None
    key_layout: tuple[torch.LongTensor, torch.BoolTensor]
    query_index: torch.LongTensor
    read_key_layout: tuple[torch.LongTensor, torch.BoolTensor]  # key_layout with key_rows selected

    def weights_over_sequence(self, attn_weights, rows, batch_size, past_length, num_keys):
        """The step's attention weights, `[rows, heads, width, key width]` in its packed layout, placed in the whole
        sequence as Llama returns them: `[batch, heads, queries, keys]` (queries are the forward's tokens, keys the
        past and new ones), zero where a token did not take the step."""
        query_len = num_keys - past_length
        weights = attn_weights.new_zeros(batch_size, attn_weights.shape[1], query_len, num_keys)
        key_index, key_valid = self.read_key_layout
        pairs = (self.query_index >= 0).unsqueeze(-1) & key_valid.unsqueeze(1)
        row, query, key = pairs.nonzero(as_tuple=True)
        query_position = self.query_index[row, query] - past_length
        weights[rows[row], :, query_position, key_index[row, key]] = attn_weights[row, :, query, key]
        return weights


class CustomAttentionMask(NamedTuple):
    """A custom 4-D attention mask (packed sequences, shared prefixes, tree attention) as the pairs it allows:
    `allowed[b, i, j]`, query `past_length + i` of row b may attend to the key of sequence index j. As for Llama,
    which uses such a mask as it is, it replaces causality; a recursion step reads its rows and columns for the
    step's queries and keys. A token whose own key the mask hides is padding: it takes no recursion step."""

    allowed: torch.BoolTensor  # [batch, queries, past + queries]
    past_length: int

    @classmethod
    def from_4d(cls, attention_mask: torch.Tensor, past_length: int, seq_len: int) -> "CustomAttentionMask":
        """Reads a `[batch, 1, queries, past + queries]` mask: boolean (True = attend) or additive (0 = attend, the
        dtype's minimum or -inf = masked), the two forms transformers' attention functions take."""
        batch_size = attention_mask.shape[0]
        expected = (batch_size, 1, seq_len, past_length + seq_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"A 4-D attention_mask must be [batch, 1, queries, past + queries] = {expected}; got "
                f"{tuple(attention_mask.shape)}."
            )
        mask = attention_mask[:, 0]
        if mask.dtype == torch.bool:
            return cls(mask, past_length)
        if not mask.is_floating_point():
            raise ValueError(
                f"A 4-D attention_mask is boolean (True = attend) or additive floats (0 = attend, the dtype's minimum "
                f"or -inf = masked); got dtype {mask.dtype}."
            )
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            raise ValueError(
                "A 4-D attention_mask may only hold 0 (attend) and the dtype's minimum or -inf (masked): MoR reads it "
                "as the pairs it allows, so additive biases of other values would be lost."
            )
        return cls(allowed, past_length)

    def token_valid(self) -> torch.BoolTensor:
        """`[batch, queries]`: the tokens that may attend to their own key."""
        queries = torch.arange(self.allowed.shape[1], device=self.allowed.device)
        return self.allowed[:, queries, self.past_length + queries]

    def pairs(self, rows, query_index, key_index) -> torch.BoolTensor:
        """`[rows, queries, keys]`: whether each query (`query_index`, sequence indices of batch rows `rows`) may
        attend to each key (`key_index`); -1 entries read an arbitrary pair (their keys or outputs are dropped)."""
        queries = (query_index - self.past_length).clamp(min=0)
        keys = key_index.clamp(min=0)
        return self.allowed[rows[:, None, None], queries[:, :, None], keys[:, None, :]]


def build_attention_mask(config, query_index, key_index, key_valid, dtype, query_start=None, allowed_pairs=None):
    """A `[batch, 1, queries, keys]` mask from each query's and key's position in the sequence.

    Packed layouts make the usual "lower triangle" meaningless, so causality is decided from the tokens' sequence
    indices. `query_start` (same layout as `query_index`), where a row packs several documents (padding-free
    training), is the index of the first token of each query's document: documents are contiguous, so a query sees
    the keys from there to itself. `allowed_pairs` (`[batch, queries, keys]`, from a `CustomAttentionMask`) replaces
    both.
    """
    if allowed_pairs is not None:
        allowed = allowed_pairs & key_valid.unsqueeze(1)
    else:
        allowed = (key_index.unsqueeze(1) <= query_index.unsqueeze(-1)) & key_valid.unsqueeze(1)
    if query_start is not None:
        allowed = allowed & (key_index.unsqueeze(1) >= query_start.unsqueeze(-1))
    # A query that sees no key (a packing slot or a padding token) would turn softmax into NaN; its output is dropped.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    allowed = allowed.unsqueeze(1)
    if config._attn_implementation == "flex_attention":
        # A block mask whose mask_mod reads the allowed pairs (an additive score mask crashes flex on CPU).
        def mask_mod(batch_idx, head_idx, query_idx, key_idx):
            return allowed[batch_idx, 0, query_idx, key_idx]

        batch_size, _, num_queries, num_keys = allowed.shape
        return create_block_mask(mask_mod, batch_size, None, num_queries, num_keys, device=allowed.device)
    if config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed

"""MoRCache: a KV cache that stores, for each recursion step, only the tokens that took that step.

Layout. The unshared first/last layers (middle_* strategies) cache every token like Llama (`ChunkGrownLayer`). For
the recursion block, every (block layer, recursion step) pair has its own storage of shape
`[batch, kv_heads, S_r, head_dim]`, where each batch row is packed to the left: row b holds `n_b,r` tokens (the ones
of that row that took step r), and `S_r = max_b n_b,r`. All layers of a step share one `RecursionStepLayout`, which
records the sequence index of every stored token (what masks are built from) and each row's length. Under the
"shared" policy only step 1 is stored; the model hands its keys/values to the deeper steps.

The number of tokens seen (`get_seq_length`, what `generate` asks) is kept separately from what each step holds.

Continuous batching (`serving_mor.py`) stores keys/values in pages instead: `PagedKVStorage` holds, for every
request, one page table per token set (the end layers' tokens: every token; and, per stored recursion step, the
tokens that took it), in fixed-size pages from a pool, and `PagedKVView` is what the layers of one engine pass write
to and read from.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .configuration_mor import MoRConfig


def grown_capacity(needed: int, current: int) -> int:
    """Storage grows in chunks of GROWTH_CHUNK slots, so that decoding does not copy the whole cache at every token
    (a DynamicLayer concatenates once per token); the unused tail is at most GROWTH_CHUNK - 1 slots."""
    if needed <= current:
        return current
    return -(-needed // GROWTH_CHUNK) * GROWTH_CHUNK


GROWTH_CHUNK = 32


def grown_storage(storage: torch.Tensor, allocated: int) -> torch.Tensor:
    """`[batch, kv_heads, slots, head_dim]` storage with `allocated` slots, the old ones copied. The new slots are
    zeroed: attention masks them, but a masked slot holding NaN would still poison its row (0 * NaN). Measured 4x
    faster than concatenating a block of zeros along the slot dimension."""
    grown = storage.new_empty((*storage.shape[:2], allocated, storage.shape[3]))
    grown[:, :, : storage.shape[2]].copy_(storage)
    grown[:, :, storage.shape[2] :].zero_()
    return grown


class RecursionStepLayout:
    """Which tokens each batch row holds at one recursion step: their sequence indices, packed to the left."""

    def __init__(self):
        self.index_buffer: torch.LongTensor | None = None  # [batch, allocated], -1 in free slots
        self.lengths: torch.LongTensor | None = None  # [batch]
        self.capacity = 0  # slots in use: the largest row's length
        self.write_plan = None

    @property
    def token_index(self) -> torch.LongTensor | None:
        """`[batch, capacity]` sequence index of every stored token, -1 where a row holds fewer tokens."""
        return None if self.index_buffer is None else self.index_buffer[:, : self.capacity]

    def prepare(self, batch_size, rows, query_index, query_valid):
        """Appends this forward's tokens of the step (per-row layout `[rows, width]`, `query_valid` marking real
        entries) and returns the key layout of the step afterwards, `(key_index, key_valid)`, for every batch row:
        the attention of the rows taking the step selects its rows (`KeyRows` in modeling_mor.py)."""
        device = query_index.device
        if self.index_buffer is None:
            self.index_buffer = torch.full((batch_size, 0), -1, dtype=torch.long, device=device)
            self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        counts = query_valid.sum(-1)
        start = self.lengths[rows]
        new_lengths = self.lengths.index_add(0, rows, counts)
        self.capacity = max(self.capacity, int(new_lengths.max()))
        allocated = grown_capacity(self.capacity, self.index_buffer.shape[1])
        if allocated > self.index_buffer.shape[1]:
            free = torch.full((batch_size, allocated - self.index_buffer.shape[1]), -1, dtype=torch.long, device=device)
            self.index_buffer = torch.cat([self.index_buffer, free], dim=1)
        slots = start.unsqueeze(-1) + torch.arange(query_index.shape[1], device=device)
        write_rows = rows.unsqueeze(-1).expand_as(slots)[query_valid]
        write_slots = slots[query_valid]
        self.index_buffer[write_rows, write_slots] = query_index[query_valid]
        self.lengths = new_lengths
        self.write_plan = (write_rows, write_slots)  # row-major over query_valid: the packed tokens' order
        key_valid = torch.arange(self.capacity, device=device) < self.lengths.unsqueeze(-1)
        return self.token_index, key_valid

    def tokens_held(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.sum())

    def keep_tokens_before(self, num_tokens: int) -> None:
        """Drops every stored token whose sequence index is `num_tokens` or more (each row's newest ones)."""
        if self.index_buffer is None:
            return
        self.index_buffer = self.index_buffer.masked_fill(self.index_buffer >= num_tokens, -1)
        self.lengths = (self.index_buffer >= 0).sum(-1)
        self.capacity = int(self.lengths.max()) if self.lengths.numel() else 0

    def select_rows(self, indices) -> None:
        if self.index_buffer is not None:
            self.index_buffer = self.index_buffer[indices]
            self.lengths = self.lengths[indices]
            self.capacity = int(self.lengths.max()) if self.lengths.numel() else 0

    def repeat_rows(self, repeats: int) -> None:
        if self.index_buffer is not None:
            self.index_buffer = self.index_buffer.repeat_interleave(repeats, dim=0)
            self.lengths = self.lengths.repeat_interleave(repeats, dim=0)

    def nbytes(self) -> int:
        return 0 if self.index_buffer is None else self.index_buffer.nbytes + self.lengths.nbytes


class SlotStorage:
    """`keys`/`values` storage `[batch, kv_heads, slots, head_dim]` of a MoRCache layer, grown GROWTH_CHUNK slots at
    a time. Beam search and batch expansion apply whenever storage exists, even with no token held (after a crop to
    0), so that every layer of a MoRCache keeps the same rows (transformers' DynamicLayer skips them when empty)."""

    def start_storage(self, batch_size: int, key_states, value_states) -> None:
        shape = (batch_size, key_states.shape[1], 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.is_initialized = True

    def reserve_slots(self, needed: int) -> None:
        allocated = grown_capacity(needed, self.keys.shape[2])
        if allocated > self.keys.shape[2]:
            self.keys = grown_storage(self.keys, allocated)
            self.values = grown_storage(self.values, allocated)

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, indices.to(self.keys.device))
            self.values = self.values.index_select(0, indices.to(self.values.device))

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class ChunkGrownLayer(SlotStorage, DynamicLayer):
    """A DynamicLayer (every token of every row, in sequence order) whose storage grows GROWTH_CHUNK slots at a time.

    Used for the unshared first/last layers: a DynamicLayer concatenates, i.e. copies, its whole storage at every
    decoded token. Like the recursion layers, it writes new tokens in place into storage that earlier forwards
    returned views of, so a cache serves inference: backpropagating through two forwards that share one cache fails
    (training runs without a cache)."""

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.start_storage(key_states.shape[0], key_states, value_states)
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_length = self.length + key_states.shape[-2]
        self.reserve_slots(new_length)
        self.keys[:, :, self.length : new_length] = key_states
        self.values[:, :, self.length : new_length] = value_states
        self.length = new_length
        return self.keys[:, :, :new_length], self.values[:, :, :new_length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        # The dropped slots stay allocated and are written again.
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)


class MoRRecursionLayer(SlotStorage, CacheLayerMixin):
    """Keys/values of one block layer at one recursion step, stored per batch row for that step's tokens only."""

    is_croppable = True
    is_sliding = False

    def __init__(self, layout: RecursionStepLayout):
        super().__init__()
        self.layout = layout

    def lazy_initialization(self, key_states, value_states) -> None:
        self.start_storage(self.layout.index_buffer.shape[0], key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        """Writes the keys/values of the step's tokens, packed into one sequence (`[1, kv_heads, N, head_dim]`, in
        (row, position) order), into their rows' next free slots, and returns a view of the step's storage in use,
        every batch row of it (the attention selects the rows taking the step)."""
        write_rows, write_slots = self.layout.write_plan
        if key_states.shape[0] != 1 or key_states.shape[2] != write_rows.numel():
            raise ValueError(
                f"A recursion layer of MoRCache takes the step's {write_rows.numel()} tokens packed into one sequence, "
                f"[1, kv_heads, {write_rows.numel()}, head_dim]; got {tuple(key_states.shape)}."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.reserve_slots(self.layout.capacity)
        self.keys[write_rows, :, write_slots] = key_states[0].transpose(0, 1)
        self.values[write_rows, :, write_slots] = value_states[0].transpose(0, 1)
        return self.keys[:, :, : self.layout.capacity], self.values[:, :, : self.layout.capacity]

    def get_seq_length(self) -> int:
        return self.layout.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layout.capacity + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # MoRCache.crop drops tokens by sequence index, through the step layouts shared by the layers.
        raise NotImplementedError("Crop a MoRCache as a whole: MoRCache.crop(tokens_to_remove).")


class MoRCache(Cache):
    """The KV cache of a `MoRForCausalLM`, built as `MoRCache(config)`; `config.kv_cache_policy` picks the policy.

    `generate()` builds one by default. `nbytes()` and `tokens_held_per_step()` report its size.
    """

    def __init__(self, config: MoRConfig):
        self.config = config
        num_stored_steps = 1 if config.kv_cache_policy == "shared" else config.num_recursions
        self.step_layouts = [RecursionStepLayout() for _ in range(num_stored_steps)]
        offset = 1 if config.has_unshared_ends else 0
        layers = []
        self._slot_of = {}  # (unique layer index, recursion step or None) -> index in self.layers
        if config.has_unshared_ends:
            self._slot_of[(0, None)] = len(layers)
            layers.append(ChunkGrownLayer())
        for position in range(config.block_size):
            for step in range(num_stored_steps):
                self._slot_of[(offset + position, step)] = len(layers)
                layers.append(MoRRecursionLayer(self.step_layouts[step]))
        if config.has_unshared_ends:
            self._slot_of[(offset + config.block_size, None)] = len(layers)
            layers.append(ChunkGrownLayer())
        super().__init__(layers=layers)
        self._seen_tokens = 0

    @staticmethod
    def check_compatible(cache, config: MoRConfig) -> None:
        """Raises a clear error for a cache this model cannot use (a plain DynamicCache, another config's cache)."""
        if not isinstance(cache, MoRCache):
            raise TypeError(
                f"MoR models need a MoRCache, got {type(cache).__name__}: a per-layer cache cannot hold keys for "
                f"tokens that exit at different recursion depths. Pass `cache=MoRCache(model.config)` or let the "
                f"model build one (use_cache=True)."
            )
        fields = ("num_recursions", "sharing_strategy", "num_hidden_layers", "kv_cache_policy")
        mismatched = [f for f in fields if getattr(cache.config, f) != getattr(config, f)]
        if mismatched:
            details = ", ".join(f"{f}: cache {getattr(cache.config, f)!r} vs model {getattr(config, f)!r}" for f in mismatched)
            raise ValueError(f"This MoRCache was built for a different model config ({details}). Build it as MoRCache(model.config).")

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: dict | None = None, *args, **kwargs):
        recursion_step = (cache_kwargs or {}).get("recursion_step")
        return self.layers[self._slot_of[(layer_idx, recursion_step)]].update(key_states, value_states)

    def prepare_recursion_step(self, step: int, batch_size: int, rows, query_index, query_valid):
        """Records which tokens take recursion step `step` in this forward; returns the key layout of that step."""
        return self.step_layouts[step].prepare(batch_size, rows, query_index, query_valid)

    def record_forward(self, num_new_tokens: int) -> None:
        self._seen_tokens += num_new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def tokens_held_per_step(self) -> list[int]:
        """Tokens stored at each recursion step, summed over the batch (one entry for the shared policy)."""
        return [layout.tokens_held() for layout in self.step_layouts]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: keys and values (with their chunked growth room) and the step
        layouts' index tensors."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
        return total + sum(layout.nbytes() for layout in self.step_layouts)

    def reset(self) -> None:
        super().reset()
        for index, layout in enumerate(self.step_layouts):
            self.step_layouts[index].__init__()
        self._seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` tokens (a negative number, as for transformers' caches; 0 does
        nothing). Tokens are dropped by sequence index at every recursion step, whatever depth they took."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"MoRCache.crop takes a negative number of tokens to remove, got {tokens_to_remove}. To keep the "
                f"first N tokens, call crop(N - cache.get_seq_length())."
            )
        removed = min(-tokens_to_remove, self._seen_tokens)
        if removed == 0:
            return
        keep = self._seen_tokens - removed
        for layer in self.layers:
            if isinstance(layer, DynamicLayer):
                layer.crop(-removed)
        for layout in self.step_layouts:
            layout.keep_tokens_before(keep)  # the freed slots stay allocated and are written again
        self._seen_tokens = keep

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)
        for layout in self.step_layouts:
            layout.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        for layout in self.step_layouts:
            layout.repeat_rows(repeats)


class PagePool:
    """Keys/values of `num_layers` layers in `num_pages` pages of `page_size` token slots, and the free pages.

    A page serves one token set of one request in every layer that stores that set, so one page table (and one list
    of sequence indices, `slot_token_index`) serves all of them. Freed pages are reused, last freed first."""

    def __init__(self, num_layers, num_pages, page_size, kv_heads, head_dim, dtype, device):
        # Token-major pages, [page, slot, kv_heads, head_dim]: the pages a row reads, gathered with index_select,
        # are its keys in slot order without a further copy (a view transposes them to [kv_heads, slots, head_dim]).
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        # Uninitialised: a page is zeroed when it is taken (`take_page`), so memory is touched only as it is used.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        # Sequence index of the token in every slot (-1: free); attention masks are built from it.
        self.slot_token_index = torch.full((num_pages, page_size), -1, dtype=torch.long, device=device)
        self.page_size = page_size
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, -1, -1))

    def take_page(self) -> int:
        """A free page, zeroed: attention masks its unused slots, but a masked slot holding NaN would still poison
        its row (0 * NaN)."""
        page = self.free_pages.pop()
        self.keys[:, page].zero_()
        self.values[:, page].zero_()
        return page

    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free_pages)

    def bytes_per_page(self) -> int:
        return 2 * self.keys[:, 0].nbytes  # keys and values of every layer


class PageTable:
    """The pages of one token set of one request, and how many tokens it holds (packed in sequence order)."""

    __slots__ = ("pages", "length")

    def __init__(self):
        self.pages: list[int] = []
        self.length = 0


END_LAYERS = "end_layers"


class PagedKVStorage:
    """Paged keys/values of every request served by continuous batching, for one MoR model.

    Token sets: `END_LAYERS` (the unshared first and last layers, middle_* strategies: every token) and one per
    stored recursion step (the tokens that took step r; only step 1 under the "shared" policy). Each has its pool:
    an end-layer page stores its tokens for 2 layers, a step page for the B block layers."""

    def __init__(self, config: MoRConfig, num_pages: int, page_size: int, dtype, device):
        self.config = config
        self.page_size = page_size
        self.num_stored_steps = 1 if config.kv_cache_policy == "shared" else config.num_recursions
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads
        self.pools: dict = {}
        if config.has_unshared_ends:
            self.pools[END_LAYERS] = PagePool(2, num_pages, page_size, kv_heads, head_dim, dtype, device)
        # The steps share one pool: a deep step holds fewer tokens, so its pages serve the shallower steps.
        step_pool = PagePool(config.block_size, num_pages * self.num_stored_steps, page_size, kv_heads, head_dim, dtype, device)
        for step in range(self.num_stored_steps):
            self.pools[step] = step_pool
        self.tables: dict[str, dict] = {}  # request id -> token set -> PageTable
        self.device = device

    def token_sets(self) -> list:
        return list(self.pools)

    def add_request(self, request_id: str) -> None:
        self.tables[request_id] = {token_set: PageTable() for token_set in self.pools}

    def free_request(self, request_id: str) -> None:
        """Returns every page of the request to its pool."""
        for token_set, table in self.tables.pop(request_id, {}).items():
            pool = self.pools[token_set]
            pool.slot_token_index[table.pages] = -1
            pool.free_pages.extend(reversed(table.pages))

    def pages_needed(self, request_id: str, token_set, num_tokens: int) -> int:
        table = self.tables[request_id][token_set]
        return max(0, -(-(table.length + num_tokens) // self.page_size) - len(table.pages))

    def unique_pools(self) -> list[PagePool]:
        return list(self.pools_by_id.values())

    @property
    def pools_by_id(self) -> dict:
        return {id(pool): pool for pool in self.pools.values()}

    def tokens_held_by(self, request_id: str) -> dict:
        return {token_set: table.length for token_set, table in self.tables[request_id].items()}

    def pages_held_by(self, request_id: str) -> dict:
        return {token_set: len(table.pages) for token_set, table in self.tables[request_id].items()}

    def append(self, request_id: str, token_set, token_index: list[int]) -> tuple[list[int], list[int]]:
        """Reserves slots for tokens (sequence indices, increasing) at the end of a request's token set; returns
        their (page, offset) pairs. The caller checked with `pages_needed` that the pool has the pages."""
        table = self.tables[request_id][token_set]
        pool = self.pools[token_set]
        pages, offsets = [], []
        for index in token_index:
            if table.length == len(table.pages) * self.page_size:
                table.pages.append(pool.take_page())
            pages.append(table.pages[-1])
            offsets.append(table.length % self.page_size)
            table.length += 1
        pool.slot_token_index[pages, offsets] = torch.tensor(token_index, dtype=torch.long, device=self.device)
        return pages, offsets

    def read_layout(self, request_ids: list[str], token_sets: list) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The page table of each row (`[rows, max pages]`, padded with page 0) and the sequence index of every slot
        it reads (`[rows, max pages * page_size]`, -1 where nothing is stored)."""
        tables = [self.tables[request_id][token_set] for request_id, token_set in zip(request_ids, token_sets)]
        width = max(len(table.pages) for table in tables)
        page_table = torch.zeros(len(tables), width, dtype=torch.long)
        used = torch.zeros(len(tables), width, dtype=torch.bool)
        for row, table in enumerate(tables):
            page_table[row, : len(table.pages)] = torch.tensor(table.pages, dtype=torch.long)
            used[row, : len(table.pages)] = True
        page_table, used = page_table.to(self.device), used.to(self.device)
        pool = self.pools[token_sets[0]]
        key_index = pool.slot_token_index[page_table].masked_fill(~used.unsqueeze(-1), -1)
        return page_table, key_index.reshape(len(tables), -1)

    def tokens_held(self) -> dict:
        """Tokens stored per token set, summed over requests."""
        held = {token_set: 0 for token_set in self.pools}
        for tables in self.tables.values():
            for token_set, table in tables.items():
                held[token_set] += table.length
        return held

    def pages_held(self) -> dict:
        held = {token_set: 0 for token_set in self.pools}
        for tables in self.tables.values():
            for token_set, table in tables.items():
                held[token_set] += len(table.pages)
        return held

    def memory_report(self) -> dict:
        """Bytes of keys/values in the pages in use next to the ideal: exactly the tokens stored, per token set."""
        report = {"pages_held": self.pages_held(), "tokens_held": self.tokens_held()}
        held_bytes = ideal_bytes = 0
        for token_set, pool in self.pools.items():
            per_slot = pool.bytes_per_page() // self.page_size
            held_bytes += report["pages_held"][token_set] * pool.bytes_per_page()
            ideal_bytes += report["tokens_held"][token_set] * per_slot
        report.update(kv_bytes_held=held_bytes, kv_bytes_ideal=ideal_bytes)
        report["held_over_ideal"] = held_bytes / ideal_bytes if ideal_bytes else 1.0
        return report


class PagedKVView:
    """What the layers of one continuous-batching pass read and write: each row of the pass is one request's tokens
    (the layers' `active_tokens` rows), and every layer writes the row's new keys/values into the slots reserved for
    them and reads the row's whole token set. Used as the layers' `cache`.

    `write_mask` leaves out tokens whose keys are not stored (deeper steps under the "shared" policy, which read step
    1's keys: their keys are computed with the others' in one projection and dropped)."""

    def __init__(self, storage: PagedKVStorage, token_set_of_layer, write_pages, write_offsets, write_mask, page_table):
        self.storage = storage
        self.token_set_of_layer = token_set_of_layer  # layer index -> (pool, layer row in the pool)
        self.write_pages = write_pages
        self.write_offsets = write_offsets
        self.write_mask = write_mask
        self.page_table = page_table

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: dict | None = None):
        """`key_states`: the pass's tokens packed, `[1, kv_heads, N, head_dim]`; returns every row's keys/values,
        `[rows, kv_heads, slots, head_dim]` (the slots `read_layout` describes)."""
        pool, layer_row = self.token_set_of_layer[layer_idx]
        keys, values = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [N, kv_heads, head_dim]
        if self.write_mask is not None:
            keys, values = keys[self.write_mask], values[self.write_mask]
        layer_keys, layer_values = pool.keys[layer_row], pool.values[layer_row]
        if self.write_pages.numel():
            layer_keys[self.write_pages, self.write_offsets] = keys
            layer_values[self.write_pages, self.write_offsets] = values
        rows = self.page_table.shape[0]
        pages = self.page_table.reshape(-1)
        # [rows * pages, page_size, kv_heads, head_dim] -> [rows, kv_heads, pages * page_size, head_dim] (a view)
        read_keys = layer_keys.index_select(0, pages).reshape(rows, -1, *keys.shape[1:]).transpose(1, 2)
        read_values = layer_values.index_select(0, pages).reshape(rows, -1, *keys.shape[1:]).transpose(1, 2)
        return read_keys, read_values


__all__ = ["MoRCache", "PagedKVStorage", "PagedKVView"]

"""MoR's KV caches: per recursion step, only the tokens that took that step, in pages.

One storage design serves `generate()` and continuous batching: `PagedKVStorage` holds, for every sequence (a batch
row of `MoRCache`, a request of the serving engine, `serving_mor.py`), one page table per *token set*: per stored
recursion step, the tokens that took it (only step 1 under the "shared" policy, whose deeper steps read step 1's
keys), and, for the engine, the unshared end layers' tokens (every token). A page holds `page_size` tokens of its set
in every layer that stores the set, so the layers of a step share one table and one list of the tokens' sequence
indices (`slot_token_index`), what attention masks are built from. Pages come from a pool: fixed for the engine
(requests wait for pages), grown by doubling for `MoRCache`.

`MoRCache` keeps the unshared first/last layers (middle_* strategies) like Llama, every token of every row
(`ChunkGrownLayer`). The number of tokens seen (`get_seq_length`, what `generate` asks) is kept separately from what
each step holds.
"""

import math
import time

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


class ChunkGrownLayer(DynamicLayer):
    """A DynamicLayer (every token of every row, in sequence order) whose storage grows GROWTH_CHUNK slots at a time.

    Used for the unshared first/last layers: a DynamicLayer concatenates, i.e. copies, its whole storage at every
    decoded token. The storage, `[batch, kv_heads, slots, head_dim]`, is `key_storage` / `value_storage`; `keys` /
    `values` are the slots in use. Like the recursion layers, it writes new tokens in place into storage that earlier
    forwards returned views of, so a cache serves inference: backpropagating through two forwards that share one
    cache fails (training runs without a cache). Beam search and batch expansion apply whenever storage exists, even
    with no token held (after a crop to 0), so that every layer of a MoRCache keeps the same rows (transformers'
    DynamicLayer skips them when empty)."""

    key_storage = value_storage = None
    length = 0

    @property
    def keys(self):
        return None if self.key_storage is None else self.key_storage[:, :, : self.length]

    @keys.setter
    def keys(self, tensor):  # CacheLayerMixin and offloading assign whole tensors
        self.key_storage = tensor
        self.length = 0 if tensor is None else tensor.shape[2]

    @property
    def values(self):
        return None if self.value_storage is None else self.value_storage[:, :, : self.length]

    @values.setter
    def values(self, tensor):
        self.value_storage = tensor

    def reserve_slots(self, needed: int) -> None:
        allocated = grown_capacity(needed, self.key_storage.shape[2])
        if allocated > self.key_storage.shape[2]:
            self.key_storage = grown_storage(self.key_storage, allocated)
            self.value_storage = grown_storage(self.value_storage, allocated)

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            self.key_storage = self.key_storage.index_select(0, indices.to(self.key_storage.device))
            self.value_storage = self.value_storage.index_select(0, indices.to(self.value_storage.device))

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_storage = self.key_storage.repeat_interleave(repeats, dim=0)
            self.value_storage = self.value_storage.repeat_interleave(repeats, dim=0)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        shape = (key_states.shape[0], key_states.shape[1], 0, key_states.shape[-1])
        self.key_storage = key_states.new_zeros(shape)
        self.value_storage = value_states.new_zeros(shape)
        self.length = 0
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_length = self.length + key_states.shape[-2]
        self.reserve_slots(new_length)
        self.key_storage[:, :, self.length : new_length] = key_states
        self.value_storage[:, :, self.length : new_length] = value_states
        self.length = new_length
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.key_storage = self.value_storage = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # The dropped slots stay allocated and are written again.
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)


# A growable pool (MoRCache's) grows by at least a sixteenth of its pages: at most 1/16 of it is unused room, and the
# copies of the growths add up to about 16 times the final pool (a small part of decoding's time:
# benchmarks/decode_throughput.py --baseline-code).
POOL_GROWTH_DIVISOR = 16


class PagePool:
    """Keys/values of `num_layers` layers in pages of `page_size` token slots, and the free pages.

    Token-major pages, `[page, slot, kv_heads, head_dim]`: the pages a row reads, gathered with index_select, are its
    keys in slot order without a further copy (a view transposes them to `[kv_heads, slots, head_dim]`). Freed pages
    are reused, lowest first. A growable pool doubles when it runs out (MoRCache); a fixed one never does (serving).

    `kv_heads=None` allocates the pages at the first write, with the head count of the keys written: under tensor
    parallelism a process holds only its share of the heads."""

    def __init__(self, num_layers, num_pages, page_size, kv_heads, head_dim, dtype, device, growable=False):
        self.num_layers, self.head_dim, self.dtype, self.device = num_layers, head_dim, dtype, device
        self.keys = self.values = None
        self.slot_token_index = torch.full((num_pages, page_size), -1, dtype=torch.long, device=device)
        self.page_size = page_size
        self.num_pages = num_pages
        self.growable = growable
        self.free_pages = list(range(num_pages - 1, -1, -1))
        if kv_heads is not None:
            self.allocate(kv_heads)

    def allocate(self, kv_heads: int) -> None:
        shape = (self.num_layers, self.num_pages, self.page_size, kv_heads, self.head_dim)
        # Uninitialised: a page is zeroed when it is taken (`take_page`), so memory is touched only as it is used.
        self.keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.values = torch.empty(shape, dtype=self.dtype, device=self.device)
        taken = sorted(set(range(self.num_pages)) - set(self.free_pages))
        self.keys[:, taken] = 0
        self.values[:, taken] = 0

    def check_writable(self, keys: torch.Tensor) -> None:
        """Allocates the pages for `keys` (`[N, kv_heads, head_dim]`) at the first write; refuses another shape."""
        if self.keys is None:
            self.allocate(keys.shape[1])
        if keys.shape[1:] != self.keys.shape[3:]:
            raise ValueError(
                f"keys of shape [tokens, kv_heads, head_dim] = {tuple(keys.shape)} do not fit this cache's pages of "
                f"{tuple(self.keys.shape[3:])} (kv_heads, head_dim): one cache serves one model (and one tensor-"
                f"parallel rank); build a new MoRCache."
            )

    def reserve(self, pages: int) -> None:
        """Makes `pages` pages free. A growable pool grows by what is missing, and by at least 1/POOL_GROWTH_DIVISOR
        of its size, since each growth copies the pool; a fixed one raises."""
        missing = pages - len(self.free_pages)
        if missing <= 0:
            return
        if not self.growable:
            raise RuntimeError("the KV page pool is exhausted")
        self._grow(max(missing, -(-self.num_pages // POOL_GROWTH_DIVISOR)))

    def take_page(self) -> int:
        """A free page, zeroed: attention masks its unused slots, but a masked slot holding NaN would still poison
        its row (0 * NaN)."""
        self.reserve(1)
        page = self.free_pages.pop()
        if self.keys is not None:
            self.keys[:, page].zero_()
            self.values[:, page].zero_()
        return page

    def _grow(self, extra_pages: int) -> None:
        def grown(tensor, fill=None):
            shape = list(tensor.shape)
            axis = 1 if tensor.dim() == 5 else 0
            shape[axis] = extra_pages
            tail = tensor.new_full(shape, fill) if fill is not None else tensor.new_empty(shape)
            return torch.cat([tensor, tail], dim=axis)

        if self.keys is not None:
            self.keys, self.values = grown(self.keys), grown(self.values)
        self.slot_token_index = grown(self.slot_token_index, -1)
        self.free_pages = list(range(self.num_pages + extra_pages - 1, self.num_pages - 1, -1)) + self.free_pages
        self.num_pages += extra_pages

    def copy_pages(self, source: list[int], destination: list[int]) -> None:
        source = torch.tensor(source, dtype=torch.long, device=self.device)
        destination = torch.tensor(destination, dtype=torch.long, device=self.device)
        if self.keys is not None:
            self.keys[:, destination] = self.keys[:, source]
            self.values[:, destination] = self.values[:, source]
        self.slot_token_index[destination] = self.slot_token_index[source]

    def free(self, pages: list[int]) -> None:
        if pages:
            self.slot_token_index[pages] = -1
            self.free_pages.extend(pages)
            self.free_pages.sort(reverse=True)

    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free_pages)

    def bytes_per_page(self) -> int:
        return 0 if self.keys is None else 2 * self.keys[:, 0].nbytes  # keys and values of every layer

    def nbytes(self) -> int:
        """Every page, used or free, and the index of sequence positions."""
        return self.bytes_per_page() * self.num_pages + self.slot_token_index.nbytes


class PageTable:
    """The pages of one token set of one sequence, and how many tokens it holds (packed in sequence order)."""

    __slots__ = ("pages", "length")

    def __init__(self, pages=None, length=0):
        self.pages: list[int] = pages if pages is not None else []
        self.length = length


END_LAYERS = "end_layers"


class PagedKVStorage:
    """Paged keys/values of many sequences of one MoR model (see the module docstring).

    Token sets: one per stored recursion step (0-based; only 0 under the "shared" policy), in one pool of the B block
    layers (a deep step holds fewer tokens, so its pages serve the shallower steps), and, with `end_layers=True` and
    unshared ends, `END_LAYERS`, a pool of the 2 end layers. Sequences are named by any hashable id."""

    def __init__(
        self, config, num_pages: int, page_size: int, dtype, device, end_layers=True, growable=False, kv_heads="config"
    ):
        self.config = config
        self.page_size = page_size
        self.num_stored_steps = 1 if config.kv_cache_policy == "shared" else config.num_recursions
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads if kv_heads == "config" else kv_heads  # None: from the first write
        self.pools: dict = {}
        if end_layers and config.has_unshared_ends:
            self.pools[END_LAYERS] = PagePool(2, num_pages, page_size, kv_heads, head_dim, dtype, device, growable)
        step_pool = PagePool(
            config.block_size, num_pages * self.num_stored_steps, page_size, kv_heads, head_dim, dtype, device, growable
        )
        for step in range(self.num_stored_steps):
            self.pools[step] = step_pool
        self.pools_by_id = {id(pool): pool for pool in self.pools.values()}  # the distinct pools
        self.tables: dict = {}  # sequence id -> token set -> PageTable
        self.device = device
        self.gather_buffers = GatherBuffers()

    def unique_pools(self) -> list[PagePool]:
        return list(self.pools_by_id.values())

    def add_sequence(self, sequence_id) -> None:
        self.tables[sequence_id] = {token_set: PageTable() for token_set in self.pools}

    def free_sequence(self, sequence_id) -> None:
        """Returns every page of the sequence to its pool."""
        for token_set, table in self.tables.pop(sequence_id, {}).items():
            self.pools[token_set].free(table.pages)

    def pages_needed(self, sequence_id, token_set, num_tokens: int) -> int:
        table = self.tables[sequence_id][token_set]
        return max(0, -(-(table.length + num_tokens) // self.page_size) - len(table.pages))

    def append(self, sequence_id, token_set, token_index: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserves slots at the end of a sequence's token set for tokens (their sequence indices, increasing);
        returns each token's (page, offset) and records the indices. The pool must have the pages (a fixed pool:
        the caller checked `pages_needed`)."""
        table = self.tables[sequence_id][token_set]
        pool = self.pools[token_set]
        count = token_index.numel()
        while len(table.pages) * self.page_size < table.length + count:
            table.pages.append(pool.take_page())
        slots = torch.arange(table.length, table.length + count)
        pages = torch.tensor(table.pages, dtype=torch.long)[slots // self.page_size].to(self.device)
        offsets = (slots % self.page_size).to(self.device)
        pool.slot_token_index[pages, offsets] = token_index.to(self.device)
        table.length += count
        return pages, offsets

    def read_layout(self, sequence_ids: list, token_sets: list) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The page table of each row (`[rows, max pages]`, padded with page 0) and the sequence index of every slot
        it reads (`[rows, max pages * page_size]`, -1 where nothing is stored)."""
        tables = [self.tables[sequence_id][token_set] for sequence_id, token_set in zip(sequence_ids, token_sets)]
        width = max(1, max(len(table.pages) for table in tables))
        page_table = torch.zeros(len(tables), width, dtype=torch.long)
        used = torch.zeros(len(tables), width, dtype=torch.bool)
        for row, table in enumerate(tables):
            page_table[row, : len(table.pages)] = torch.tensor(table.pages, dtype=torch.long)
            used[row, : len(table.pages)] = True
        page_table, used = page_table.to(self.device), used.to(self.device)
        pool = self.pools[token_sets[0]]
        key_index = pool.slot_token_index[page_table].masked_fill(~used.unsqueeze(-1), -1)
        return page_table, key_index.reshape(len(tables), -1)

    def slots_read(self, sequence_ids: list, token_sets: list) -> list[int]:
        """The slots each row of `read_layout` reads before its padding (its pages times the page size)."""
        return [
            len(self.tables[sequence_id][token_set].pages) * self.page_size
            for sequence_id, token_set in zip(sequence_ids, token_sets)
        ]

    def select_sequences(self, sources: list) -> None:
        """Sequence i becomes a copy of sequence `sources[i]` (beam search, batch expansion): the first copy takes
        the source's pages, further copies get pages of their own; sources not selected are freed."""
        old_tables, self.tables = self.tables, {}
        taken = set()
        for new_id, source in enumerate(sources):
            tables = {}
            for token_set, table in old_tables[source].items():
                if source not in taken:
                    tables[token_set] = table
                    continue
                pool = self.pools[token_set]
                pages = [pool.take_page() for _ in table.pages]
                pool.copy_pages(table.pages, pages)
                tables[token_set] = PageTable(pages, table.length)
            taken.add(source)
            self.tables[new_id] = tables
        for source, tables in old_tables.items():
            if source not in taken:
                for token_set, table in tables.items():
                    self.pools[token_set].free(table.pages)

    def keep_tokens_before(self, num_tokens: int) -> None:
        """Drops every stored token whose sequence index is `num_tokens` or more (each sequence's newest ones)."""
        for tables in self.tables.values():
            for token_set, table in tables.items():
                if not table.pages:
                    continue
                pool = self.pools[token_set]
                kept = int(((pool.slot_token_index[table.pages] >= 0) & (pool.slot_token_index[table.pages] < num_tokens)).sum())
                pages_kept = -(-kept // self.page_size)
                pool.free(table.pages[pages_kept:])
                table.pages = table.pages[:pages_kept]
                table.length = kept
                if kept % self.page_size:
                    pool.slot_token_index[table.pages[-1], kept % self.page_size :] = -1

    def tokens_held_by(self, sequence_id) -> dict:
        return {token_set: table.length for token_set, table in self.tables[sequence_id].items()}

    def pages_held_by(self, sequence_id) -> dict:
        return {token_set: len(table.pages) for token_set, table in self.tables[sequence_id].items()}

    def tokens_held(self) -> dict:
        """Tokens stored per token set, summed over sequences."""
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
            held_bytes += report["pages_held"][token_set] * pool.bytes_per_page()
            ideal_bytes += report["tokens_held"][token_set] * pool.bytes_per_page() // self.page_size
        report.update(kv_bytes_held=held_bytes, kv_bytes_ideal=ideal_bytes)
        report["held_over_ideal"] = held_bytes / ideal_bytes if ideal_bytes else 1.0
        return report


class GatherBuffers:
    """Reusable outputs of `gather_pages`, one pair per key (a layer, or one for a whole serving pass).

    A gather copies every row's pages, several MiB per layer; a fresh tensor of that size is mapped and unmapped by
    the allocator on every call, and its page faults cost more than the copy (measured: an engine decode pass took
    1.4x as long). Without autograd, a layer's gathered keys are written into the buffer of its key, grown by an
    eighth when too small (a row's keys grow a page at a time; the old contents are dead, so a growth copies
    nothing); a buffer may only be shared by layers whose gathered keys are not read once the next one gathers."""

    def __init__(self):
        self.buffers: dict = {}

    def take(self, key, shape, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two tensors of `shape` (keys, values) backed by the buffers of `key`; None under autograd, where a fresh
        tensor is needed for the graph."""
        if torch.is_grad_enabled():
            return None
        numel = math.prod(shape)
        held = self.buffers.get(key)
        if held is None or held[0].numel() < numel or held[0].dtype != like.dtype or held[0].device != like.device:
            size = max(numel, (9 * held[0].numel()) // 8 if held is not None else 0)
            held = (like.new_empty(size), like.new_empty(size))
            self.buffers[key] = held
        return held[0][:numel].view(shape), held[1][:numel].view(shape)

    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self.buffers.values())


def gather_pages(pool: PagePool, layer_row: int, page_table: torch.LongTensor, buffers=None):
    """Every row's keys/values in one layer: `[rows, kv_heads, pages * page_size, head_dim]` (a transposed view).
    `buffers`: `(GatherBuffers, key)` to gather into reused memory."""
    rows = page_table.shape[0]
    pages = page_table.reshape(-1)
    source_keys, source_values = pool.keys[layer_row], pool.values[layer_row]
    out = None if buffers is None else buffers[0].take(buffers[1], (pages.numel(), *source_keys.shape[1:]), source_keys)
    keys_out, values_out = (None, None) if out is None else out
    keys = torch.index_select(source_keys, 0, pages, out=keys_out)
    values = torch.index_select(source_values, 0, pages, out=values_out)
    shape = (rows, -1, *source_keys.shape[2:])
    return keys.reshape(shape).transpose(1, 2), values.reshape(shape).transpose(1, 2)


def write_pages(pool: PagePool, layer_row: int, pages, offsets, keys, values) -> None:
    """Writes tokens' keys/values (`[N, kv_heads, head_dim]`) into their slots."""
    if pages.numel():
        pool.check_writable(keys)
        pool.keys[layer_row][pages, offsets] = keys
        pool.values[layer_row][pages, offsets] = values


class PagedKVView:
    """What the layers of one continuous-batching pass read and write: each row of the pass is one request's tokens
    (the layers' `active_tokens` rows), and every layer writes the row's new keys/values into the slots reserved for
    them and reads the row's whole token set. Used as the layers' `cache`.

    `write_mask` leaves out tokens whose keys are not stored (deeper steps under the "shared" policy, which read step
    1's keys: their keys are computed with the others' in one projection and dropped)."""

    def __init__(
        self, layer_storage, write_pages, write_offsets, write_mask, page_table, gather_buffers=None, stopwatch=None
    ):
        self.layer_storage = layer_storage  # layer index -> (pool, layer row in the pool)
        self.gather_buffers = gather_buffers  # one pair for every layer: a layer's keys are dead once it attended
        self.stopwatch = stopwatch  # anything with `add(seconds)`: told how long the writes and gathers took
        self.write_pages = write_pages
        self.write_offsets = write_offsets
        self.write_mask = write_mask
        self.page_table = page_table

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: dict | None = None):
        """`key_states`: the pass's tokens packed, `[1, kv_heads, N, head_dim]`; returns every row's keys/values,
        `[rows, kv_heads, slots, head_dim]` (the slots `read_layout` describes)."""
        started = time.perf_counter()
        pool, layer_row = self.layer_storage[layer_idx]
        keys, values = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [N, kv_heads, head_dim]
        if self.write_mask is not None:
            keys, values = keys[self.write_mask], values[self.write_mask]
        write_pages(pool, layer_row, self.write_pages, self.write_offsets, keys, values)
        buffers = None if self.gather_buffers is None else (self.gather_buffers, "pass")
        gathered = gather_pages(pool, layer_row, self.page_table, buffers)
        if self.stopwatch is not None:
            self.stopwatch.add(time.perf_counter() - started)
        return gathered


class RecursionStepPlan:
    """What the block layers of one recursion step share in one forward of a MoRCache: the rows taking the step,
    the slots their new tokens go to, and the pages each of those rows reads."""

    def __init__(self, rows, write_pages, write_offsets, page_table):
        self.rows = rows
        self.write_pages = write_pages
        self.write_offsets = write_offsets
        self.page_table = page_table


class MoRRecursionLayer(CacheLayerMixin):
    """Keys/values of one block layer at one recursion step, in the cache's pages: each batch row holds its tokens
    that took the step. `update` returns the keys of the rows taking the step in this forward only."""

    is_croppable = True
    is_sliding = False

    def __init__(self, cache: "MoRCache", step: int, position: int):
        self.cache = cache
        self.step = step
        self.position = position
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Writes the step's tokens, packed into one sequence (`[1, kv_heads, N, head_dim]`, in (row, position)
        order), into their slots; returns the keys/values of the rows taking the step, `[rows, kv_heads, slots,
        head_dim]`, over the slots `MoRCache.prepare_recursion_step` described (without autograd, views of memory
        the cache reuses at its next gather of this block position: `keys`/`values` give copies)."""
        plan = self.cache.step_plans[self.step]
        if key_states.shape[0] != 1 or key_states.shape[2] != plan.write_pages.numel():
            raise ValueError(
                f"A recursion layer of MoRCache takes the step's {plan.write_pages.numel()} tokens packed into one "
                f"sequence, [1, kv_heads, {plan.write_pages.numel()}, head_dim]; got {tuple(key_states.shape)}."
            )
        self.is_initialized = True
        pool = self.cache.storage.pools[self.step]
        keys, values = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        write_pages(pool, self.position, plan.write_pages, plan.write_offsets, keys, values)
        # Under the shared policy deeper steps read step 1's gathered keys of every block position, so each position
        # gathers into a buffer of its own; under the recursion-wise policy a layer's gathered keys are dead once it
        # attended, and every layer gathers into one buffer.
        key = self.position if self.cache.config.kv_cache_policy == "shared" else "every layer"
        return gather_pages(pool, self.position, plan.page_table, (self.cache.storage.gather_buffers, key))

    @property
    def keys(self) -> torch.Tensor | None:
        """Every row's keys at this step, position-aligned as a DynamicLayer's: `[batch, kv_heads, tokens seen,
        head_dim]`, zeros where a token did not take the step (a copy built from the pages, which hold only the
        tokens that took it; None before anything is stored). What transformers' utilities read."""
        return self._held()[0]

    @property
    def values(self) -> torch.Tensor | None:
        """Every row's values at this step, laid out as `keys`."""
        return self._held()[1]

    def _held(self):
        storage = self.cache.storage
        if storage is None:
            return None, None
        if storage.pools[self.step].keys is None:
            return None, None
        rows = sorted(storage.tables)
        page_table, key_index = storage.read_layout(rows, [self.step] * len(rows))
        keys, values = gather_pages(storage.pools[self.step], self.position, page_table)
        row, slot = (key_index >= 0).nonzero(as_tuple=True)
        shape = (len(rows), keys.shape[1], self.get_seq_length(), keys.shape[3])
        aligned_keys, aligned_values = keys.new_zeros(shape), values.new_zeros(shape)
        # [tokens, kv_heads, head_dim] on both sides: each stored token goes to its sequence index in its row.
        aligned_keys[row, :, key_index[row, slot]] = keys[row, :, slot]
        aligned_values[row, :, key_index[row, slot]] = values[row, :, slot]
        return aligned_keys, aligned_values

    def get_seq_length(self) -> int:
        """The tokens seen, as every layer of the cache (the positions of `keys`), whatever this step holds."""
        return self.cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # MoRCache.crop drops tokens by sequence index, through the page tables shared by the layers.
        raise NotImplementedError("Crop a MoRCache as a whole: MoRCache.crop(tokens_to_remove).")

    def batch_select_indices(self, indices) -> None:
        pass  # the rows are MoRCache's page tables: MoRCache.batch_select_indices moves them

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass


# Pages of MoRCache: 16 tokens, a few percent of a row's tokens unused at each step at most. The pool starts empty and
# grows to what each forward needs (`PagePool.reserve`).
CACHE_PAGE_SIZE = 16


class MoRCache(Cache):
    """The KV cache of a `MoRForCausalLM`, built as `MoRCache(config)`; `config.kv_cache_policy` picks the policy.

    `generate()` builds one by default. Each batch row holds, at each stored recursion step, exactly its tokens that
    took the step, in pages (`PagedKVStorage`); `nbytes()`, `memory_report()` and `tokens_held_per_step()` report
    its size.
    """

    def __init__(self, config: MoRConfig, page_size: int = CACHE_PAGE_SIZE):
        self.config = config
        self.page_size = page_size
        self.storage = None  # built by the first forward, which knows the batch, dtype and device
        self.step_plans: dict[int, RecursionStepPlan] = {}
        num_stored_steps = 1 if config.kv_cache_policy == "shared" else config.num_recursions
        offset = 1 if config.has_unshared_ends else 0
        layers = []
        self._slot_of = {}  # (unique layer index, recursion step or None) -> index in self.layers
        if config.has_unshared_ends:
            self._slot_of[(0, None)] = len(layers)
            layers.append(ChunkGrownLayer())
        for position in range(config.block_size):
            for step in range(num_stored_steps):
                self._slot_of[(offset + position, step)] = len(layers)
                layers.append(MoRRecursionLayer(self, step, position))
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

    def _start_storage(self, batch_size: int, dtype, device) -> None:
        self.storage = PagedKVStorage(
            self.config, 0, self.page_size, dtype, device, end_layers=False, growable=True,
            kv_heads=None,  # a tensor-parallel rank holds only its share of the heads
        )
        for row in range(batch_size):
            self.storage.add_sequence(row)

    def prepare_recursion_step(self, step: int, batch_size: int, rows, query_index, query_valid, dtype=torch.float32):
        """Records which tokens take recursion step `step` in this forward (`query_index`: their sequence indices in
        the per-row layout `[rows, width]` of the rows taking it, `query_valid` marking real entries); returns the
        key layout of those rows afterwards, `(key_index, key_valid)`, `[rows, slots]`."""
        if self.storage is None:
            self._start_storage(batch_size, dtype, query_index.device)
        counts = query_valid.sum(-1).tolist()
        # The step's pages for every row at once: a growth copies the pool.
        self.storage.pools[step].reserve(
            sum(self.storage.pages_needed(row, step, count) for row, count in zip(rows.tolist(), counts))
        )
        write_pages, write_offsets = [], []
        for row, index, valid in zip(rows.tolist(), query_index, query_valid):
            pages, offsets = self.storage.append(row, step, index[valid])
            write_pages.append(pages)
            write_offsets.append(offsets)
        page_table, key_index = self.storage.read_layout(rows.tolist(), [step] * rows.numel())
        self.step_plans[step] = RecursionStepPlan(rows, torch.cat(write_pages), torch.cat(write_offsets), page_table)
        return key_index, key_index >= 0

    def record_forward(self, num_new_tokens: int) -> None:
        self._seen_tokens += num_new_tokens
        self.step_plans = {}  # read within a forward only

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def tokens_held_per_step(self) -> list[int]:
        """Tokens stored at each recursion step, summed over the batch (one entry for the shared policy)."""
        num_stored_steps = 1 if self.config.kv_cache_policy == "shared" else self.config.num_recursions
        if self.storage is None:
            return [0] * num_stored_steps
        held = self.storage.tokens_held()
        return [held[step] for step in range(num_stored_steps)]

    def _held_bytes(self) -> dict[str, int]:
        """Bytes of everything the cache keeps, by part."""
        end_layers = [layer for layer in self.layers if isinstance(layer, ChunkGrownLayer) and layer.is_initialized]
        pools = self.storage.unique_pools() if self.storage is not None else []
        return {
            "end_layer_bytes": sum(layer.key_storage.nbytes + layer.value_storage.nbytes for layer in end_layers),
            "end_layer_ideal_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in end_layers),
            "pages_in_use_bytes": sum(pool.bytes_per_page() * pool.pages_in_use() for pool in pools),
            "free_pages_bytes": sum(pool.bytes_per_page() * len(pool.free_pages) for pool in pools),
            "page_index_bytes": sum(pool.slot_token_index.nbytes for pool in pools),
            "gather_buffer_bytes": self.storage.gather_buffers.nbytes() if self.storage is not None else 0,
        }

    def nbytes(self) -> int:
        """Bytes of everything the cache keeps: the end layers' storage (with its chunked growth room), the pages of
        the pool, used or free, with their index of sequence positions, and the memory gathers reuse
        (`GatherBuffers`)."""
        parts = self._held_bytes()
        parts.pop("end_layer_ideal_bytes")
        return sum(parts.values())

    def memory_report(self) -> dict:
        """`nbytes()` by part, next to the routed-token ideal: the keys/values of exactly the tokens the cache
        stores, at each stored recursion step the tokens that took it (in every block layer, as
        `PagedKVStorage.memory_report` counts them) and every token in the unshared end layers."""
        report = self._held_bytes()
        pages_ideal = self.storage.memory_report()["kv_bytes_ideal"] if self.storage is not None else 0
        report["kv_bytes_ideal"] = ideal = pages_ideal + report.pop("end_layer_ideal_bytes")
        report.update(tokens_held_per_step=self.tokens_held_per_step(), nbytes=self.nbytes())
        report["held_over_ideal"] = report["nbytes"] / ideal if ideal else 1.0
        return report

    def reset(self) -> None:
        super().reset()
        self.storage = None
        self.step_plans = {}
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
        if self.storage is not None:
            self.storage.keep_tokens_before(keep)
        self._seen_tokens = keep

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)
        if self.storage is not None:
            self.storage.select_sequences(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        if self.storage is not None:
            rows = len(self.storage.tables)
            self.storage.select_sequences([row for row in range(rows) for _ in range(repeats)])


__all__ = ["MoRCache", "PagedKVStorage", "PagedKVView"]

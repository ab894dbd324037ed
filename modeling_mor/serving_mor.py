"""Continuous depth-wise batching: serving many requests with transformers' continuous-batching API.

`model.generate_batch(...)`, `model.init_continuous_batching(...)` and `model.continuous_batching_context_manager(...)`
are transformers' entry points; for an MoR model they build a `MoRContinuousBatchingManager` (transformers' manager,
its request states, outputs, queues and background thread) whose batch processor is MoR's own,
`DepthwiseBatchProcessor` (MOR_SPEC section 4):

- Every request has at most one *token group* in flight: its next prefill chunk, or its newest sampled token.
- One engine iteration runs the first (unshared) layer on the groups that enter, then ONE pass of the shared
  recursion block over every group still recursing, each at its own recursion step (the weights are the same at
  every step), then the last layer, the norm and the LM head on the groups whose tokens have all exited, and samples.
  A token that exits leaves the block at once and its request's next token enters the next iteration, so every block
  pass holds one group of every request that is decoding, whatever depth the others are at.
- Keys/values live in pages (`PagedKVStorage`, cache_mor.py): per request, one page table for the end layers and one
  per stored recursion step, holding exactly the tokens that took that step. A request that cannot get pages waits;
  if nothing can move, the newest request gives its pages back and is recomputed later (its tokens so far become its
  prompt), so no request is dropped.

In eval mode routing is causal, token by token, so a request's tokens do not depend on what else is in the batch:
greedy results equal `generate()` on the prompt alone (tests/test_serving.py).
"""

import copy
import threading
import time
import zlib
from collections import OrderedDict
from contextlib import contextmanager

import torch
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import RequestState, RequestStatus
from transformers.generation.continuous_batching.utils import drain_queue
from transformers.utils import logging

from .cache_mor import END_LAYERS, PagedKVStorage, PagedKVView
from .packing_mor import ActiveTokens, RowBuckets, build_attention_mask
from .routing_mor import apply_gate


logger = logging.get_logger(__name__)

# Requests in flight per slot: a token takes one block pass per recursion step, and its request waits for the last and
# first layers between two tokens, so more requests than slots keep every block pass full (MOR_SPEC section 4).
IN_FLIGHT_PER_SLOT = 2

# Pages of 4 tokens: per request and token set at most 3 slots are unused (1.5 on average), which holds 1.01x-1.03x
# of exactly the tokens stored; a gather copies the same bytes whatever the page size (measured: pages of 8 held
# 1.03x-1.07x and ran within 2% of pages of 4, benchmarks/serving_throughput.py --page-size).
DEFAULT_PAGE_SIZE = 4
TRANSFORMERS_DEFAULT_PAGE_SIZE = ContinuousBatchingConfig.__dataclass_fields__["page_size"].default


def new_tokens_allowed(model, generation_config, has_default_max_length: bool, prompt_length: int, max_new_tokens):
    """How many tokens generate() generates at most after a prompt of `prompt_length` tokens (`max_new_tokens`: the
    request's own, else None), by transformers' own rule (`_prepare_generated_length`, `_validate_generated_length`):
    `max_new_tokens` when set, else up to `max_length`, which by default is the prompt plus 20 tokens capped at the
    model's positions. Raises generate()'s ValueError for a prompt that leaves no room."""
    config = copy.copy(generation_config)
    config.max_new_tokens = max_new_tokens
    # has_default_min_length only picks a warning about min_new_tokens.
    config = model._prepare_generated_length(config, has_default_max_length, True, "input_ids", prompt_length, None)
    model._validate_generated_length(config, prompt_length, has_default_max_length)
    return config.max_length - prompt_length


def has_default_max_length(model, generation_config) -> bool:
    """Whether neither the caller's config nor the model's sets `max_length`, as generate() decides it before filling
    the config (the default length is then capped at the model's positions)."""
    unset_by_caller = generation_config is None or generation_config.max_length is None
    return unset_by_caller and model.generation_config.max_length is None


class TokenGroup:
    """The tokens of one request in flight through the layers: a prefill chunk or one decode token.

    `step` is the recursion step the group takes next and `active` marks its tokens that take it; a token leaves the
    recursion when it is not selected, the group when none of its tokens is active or every step is done."""

    def __init__(self, request_id: str, token_ids: list[int], start: int, needs_logits: bool, device):
        self.request_id = request_id
        self.token_ids = token_ids
        self.token_index = torch.arange(start, start + len(token_ids), device=device)
        self.needs_logits = needs_logits  # the last prompt chunk or a decode token: its last token is sampled from
        self.hidden = None  # [tokens, hidden]
        self.entered = False  # went through the embedding and the first layer
        self.step = 0
        self.active = None  # [tokens] bool: who takes `step`
        self.gate = None  # expert-choice gate weights of `step`
        self.depth = torch.zeros(len(token_ids), dtype=torch.long, device=device)
        self.recursion_input = self.chosen_depth = self.token_gate = None  # token-choice
        self.end_slots = None  # (pages, offsets) of its tokens in the end layers
        self.ready_since = 0  # the iteration since which it waits for its next pass

    def __len__(self):
        return len(self.token_ids)

    def is_recursing(self, num_recursions: int) -> bool:
        return self.step < num_recursions and bool(self.active.any())


class ServedRequest:
    """A request admitted to the engine: transformers' `RequestState`, its sampling generator, its group in flight."""

    def __init__(self, state: RequestState, seed: int | None):
        self.state = state
        self.group: TokenGroup | None = None
        self.processed = 0  # tokens whose keys/values every layer holds
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed + zlib.crc32(state.request_id.encode()))

    def sequence(self) -> list[int]:
        return self.state.initial_tokens + self.state.generated_tokens


class DepthwiseBatchProcessor:
    """MoR's batch processor for transformers' `ContinuousBatchingManager` (the methods its generation loop calls:
    `prepare_next_batch`, `_generation_step`, `update_batch`, `has_pending_requests`, `fail_all_requests`, ...)."""

    use_async_batching = False
    inputs_and_outputs = None  # transformers' IO buffers: MoR builds its passes itself

    def __init__(self, manager: "MoRContinuousBatchingManager"):
        model = manager.model
        self.model = model
        self.config = model.config
        self.generation_config = manager.generation_config
        self.has_default_max_length = manager.has_default_max_length
        self.cb_config = manager.continuous_batching_config
        self.input_queue = manager.input_queue
        self.cancel_queue = manager.cancel_queue
        self.output_router = manager.output_router
        self.background_thread_status = manager.background_thread_status
        self.device = model.device
        # Slots: the groups one pass takes (`max_requests_per_batch`); requests in flight are bounded by the pages.
        self.slots = self.cb_config.max_requests_per_batch
        self.max_in_flight = IN_FLIGHT_PER_SLOT * self.slots
        self.page_size = self.cb_config.page_size
        if self.page_size == TRANSFORMERS_DEFAULT_PAGE_SIZE:
            # transformers' default page (256 tokens) is sized for its GPU kernels; per request and recursion step it
            # would leave up to 255 slots unused, so MoR reads the default as unset.
            self.page_size = DEFAULT_PAGE_SIZE
        self.max_tokens_per_pass = self.cb_config.max_batch_tokens or 256
        self.num_pages = self.cb_config.num_blocks or self._default_num_pages(manager.workload_hints)
        self.storage = PagedKVStorage(self.config, self.num_pages, self.page_size, model.dtype, self.device)
        self.logits_processor = model._get_logits_processor(self.generation_config)
        self.do_sample = bool(self.generation_config.do_sample)
        self.seed = self.cb_config.seed if self.cb_config.seed is not None else (0 if self.do_sample else None)
        backbone = model.model
        self.offset = 1 if self.config.has_unshared_ends else 0
        self.block = backbone.recursion_block
        self.layer_storage = {}  # layer index -> (pool, layer row in the pool)
        if self.config.has_unshared_ends:
            self.layer_storage[0] = (self.storage.pools[END_LAYERS], 0)
            self.layer_storage[self.offset + self.config.block_size] = (self.storage.pools[END_LAYERS], 1)
        for position in range(self.config.block_size):
            self.layer_storage[self.offset + position] = (self.storage.pools[0], position)
        self.waiting: OrderedDict[str, RequestState] = OrderedDict()
        self.active: OrderedDict[str, ServedRequest] = OrderedDict()
        self.first_layer_groups: list[TokenGroup] = []
        self.iteration = 0
        self.finished_this_step: list[ServedRequest] = []
        self.accounting: OrderedDict[str, dict] = OrderedDict()  # per finished request: tokens and pages per set
        self.stats = EngineStats()

    def _default_num_pages(self, hints) -> int:
        """Room for `IN_FLIGHT_PER_SLOT` requests per slot, each at its longest and at full depth, per token set."""
        if hints is not None and hints.max_prompt_length + hints.max_generated_length > 0:
            generated = hints.max_generated_length
            if not generated:  # no max_new_tokens: what the length rule gives the longest prompt
                try:
                    generated = new_tokens_allowed(
                        self.model, self.generation_config, self.has_default_max_length, hints.max_prompt_length, None
                    )
                except ValueError:
                    generated = 0  # that prompt is refused
            tokens = hints.max_prompt_length + generated
        else:
            tokens = self.config.max_position_embeddings
        requests = self.max_in_flight
        if hints is not None and hints.num_requests:
            requests = min(requests, hints.num_requests)
        return requests * (-(-tokens // self.page_size) + 1)

    # ------------------------------------------------ requests ------------------------------------------------ #

    def reset(self) -> None:
        for request_id in list(self.active):
            self.storage.free_sequence(request_id)
        self.waiting.clear()
        self.active.clear()
        self.first_layer_groups = []

    def has_pending_requests(self) -> bool:
        return bool(self.waiting or self.active)

    def warmup(self, model) -> None:
        """Nothing to capture: no CUDA graphs are used."""

    def _handle_request_error(self, error: Exception, state: RequestState) -> None:
        self.output_router.fail_and_deliver(state, error)

    def fail_all_requests(self, error: Exception) -> None:
        for request_id, request in list(self.active.items()):
            self._finish(request_id)
            self._handle_request_error(error, request.state)
        for state in list(self.waiting.values()):
            self._handle_request_error(error, state)
        self.waiting.clear()

    def _request_error(self, state: RequestState) -> str | None:
        """Why a request cannot be served (it fails alone, with this message on its output), or None. Sets the
        request's limit of new tokens by generate()'s rule (`new_tokens_allowed`)."""
        if self.generation_config.num_beams is not None and self.generation_config.num_beams > 1:
            return (
                f"beam search (num_beams={self.generation_config.num_beams}) is not supported by continuous batching; "
                f"use model.generate() for beam search."
            )
        if len(state.initial_tokens) == 0:
            return "empty prompt: a request needs at least one input token."
        try:
            new_tokens = new_tokens_allowed(
                self.model, self.generation_config, self.has_default_max_length, len(state.initial_tokens),
                state.max_new_tokens,
            )
        except ValueError as error:
            return str(error)
        # RequestState reads its limit from `_new_tokens_limit`, set when it was created.
        state.max_new_tokens = state._new_tokens_limit = new_tokens
        total = len(state.initial_tokens) + new_tokens
        pages = -(-total // self.page_size)
        if pages > self.num_pages:
            return (
                f"the request needs {total} tokens of cache ({pages} pages of {self.page_size}), more than the pool's "
                f"{self.num_pages} pages can ever hold; raise ContinuousBatchingConfig(num_blocks=...)."
            )
        return None

    def _drain_queues(self) -> None:
        for state in drain_queue(self.input_queue):
            error = self._request_error(state)
            if error is not None:
                self._handle_request_error(ValueError(error), state)
            else:
                self.waiting[state.request_id] = state
        for request_id in drain_queue(self.cancel_queue):
            self.waiting.pop(request_id, None)
            if request_id in self.active:
                self._finish(request_id)

    def _finish(self, request_id: str) -> ServedRequest:
        request = self.active.pop(request_id)
        self.accounting[request_id] = {
            "tokens": self.storage.tokens_held_by(request_id),
            "pages": self.storage.pages_held_by(request_id),
        }
        while len(self.accounting) > 4096:
            self.accounting.popitem(last=False)
        self.storage.free_sequence(request_id)
        return request

    def _admit(self) -> None:
        """First come, first served, while the pages of the first prompt chunk are free (and fewer than
        `max_in_flight` requests are in flight)."""
        while self.waiting and len(self.active) < self.max_in_flight:
            request_id, state = next(iter(self.waiting.items()))
            chunk = min(len(state.initial_tokens), self.max_tokens_per_pass)
            pages = -(-chunk // self.page_size)
            # The end layers and step 1 store every token; keep one page per set for every active request's next token.
            margin = len(self.active) + 1
            if any(len(pool.free_pages) < pages + margin for pool in self.storage.unique_pools()):
                break
            self.waiting.pop(request_id)
            self.storage.add_sequence(request_id)
            state.status = RequestStatus.PREFILLING
            self.active[request_id] = ServedRequest(state, self.seed)

    def _next_group(self, request: ServedRequest) -> TokenGroup:
        sequence = request.sequence()
        prompt_length = len(request.state.initial_tokens)
        if request.processed < prompt_length:
            end = min(prompt_length, request.processed + self.max_tokens_per_pass)
            tokens = sequence[request.processed : end]
            return TokenGroup(request.state.request_id, tokens, request.processed, end == prompt_length, self.device)
        return TokenGroup(request.state.request_id, sequence[-1:], len(sequence) - 1, True, self.device)

    def _token_sets_written(self, group: TokenGroup) -> list:
        """The token sets the group's next stage writes: the end layers and step 1 when it enters, else its step's."""
        if not group.entered:
            return ([END_LAYERS] if self.config.has_unshared_ends else []) + [0]
        if self.config.kv_cache_policy == "recursion_wise":
            return [group.step]
        return [0] if group.step == 0 else []

    def _reserve_pages(self, group: TokenGroup, reserved: dict) -> bool:
        """Whether the pools have the pages the group's next stage may take (counting what this iteration already
        reserved); if so, they are added to `reserved`."""
        needs = {}
        for token_set in self._token_sets_written(group):
            pool_id = id(self.storage.pools[token_set])
            needs[pool_id] = needs.get(pool_id, 0) + self.storage.pages_needed(group.request_id, token_set, len(group))
        pools = self.storage.pools_by_id
        if any(len(pools[pool_id].free_pages) - reserved.get(pool_id, 0) < pages for pool_id, pages in needs.items()):
            return False
        for pool_id, pages in needs.items():
            reserved[pool_id] = reserved.get(pool_id, 0) + pages
        return True

    def _take(self, groups: list[TokenGroup], reserved: dict | None) -> list[TokenGroup]:
        """The groups that waited longest, up to `slots` groups and `max_tokens_per_pass` tokens, with the pages
        their stage writes (`reserved` None: the last layer, whose slots the first layer reserved)."""
        taken, tokens = [], 0
        for group in sorted(groups, key=lambda group: group.ready_since):
            if len(taken) == self.slots:
                break
            recursing = group.entered and reserved is not None
            size = int(group.active.sum()) if recursing else len(group)
            if taken and tokens + size > self.max_tokens_per_pass:
                continue
            if reserved is None or self._reserve_pages(group, reserved):
                taken.append(group)
                tokens += size
        return taken

    def _preempt_newest(self) -> None:
        """Gives the newest request's pages back; it is served again later from its tokens so far (recomputed)."""
        request_id = next(reversed(self.active))
        request = self._finish(request_id)
        self.accounting.pop(request_id, None)
        state = request.state
        if state.generated_tokens:
            state = state.create_equivalent_initial_request()
        state.status = RequestStatus.PENDING
        self.waiting[request_id] = state
        self.waiting.move_to_end(request_id, last=False)
        logger.info(f"Request {request_id} gave its pages back (the pool is full); it will be recomputed.")

    def _groups(self) -> tuple[list, list, list]:
        """The groups in flight: entering (first layer next), recursing, exited (last layer next)."""
        entering, recursing, exited = [], [], []
        for request in self.active.values():
            if request.group is None:
                request.group = self._next_group(request)
                request.group.ready_since = self.iteration
            group = request.group
            if not group.entered:
                entering.append(group)
            elif group.is_recursing(self.config.num_recursions):
                recursing.append(group)
            else:
                exited.append(group)
        return entering, recursing, exited

    def prepare_next_batch(self) -> bool:
        """New requests, cancellations, admission, and whether some group can move this iteration.

        The first layer runs when its pass would be full (`slots` groups wait for it) or when the block pass has room
        for the entering groups; the block pass takes the groups that waited longest; the last layer runs when its
        pass would be full or the block pass is running short of work (see `_generation_step`). Where every pass of
        the first/last layers serves few tokens, this keeps their weight reads from dominating."""
        status = self.background_thread_status
        status.update_with_tp_status(status.local_status)
        if status.tp_status == status.HARD_STOP:
            return False
        if status.is_pause_requested():
            status.pause_and_wait()
        started = time.perf_counter()
        self._drain_queues()
        self._admit()
        while True:
            entering, recursing, exited = self._groups()
            reserved: dict = {}
            self.first_layer_groups = []
            if entering and (len(entering) >= self.slots or len(recursing) < self.slots):
                self.first_layer_groups = self._take(entering, reserved)
            can_recurse = any(self._reserve_pages(group, dict(reserved)) for group in recursing)
            if self.first_layer_groups or exited or can_recurse or not self.active:
                break
            self._preempt_newest()  # nothing can move: the pool is full
            self._admit()
        self.stats.scheduling += time.perf_counter() - started
        return bool(self.first_layer_groups or exited or can_recurse)

    # ------------------------------------------------- passes ------------------------------------------------- #

    @torch.no_grad()
    def _generation_step(self, model) -> None:
        """One engine iteration: the first layer for entering groups, one block pass over the recursing groups that
        waited longest (each at its own step), the last layer, norm, head and sampling for exited groups."""
        self.iteration += 1
        with self.stats.part("end_layers"):
            entering = self.first_layer_groups
            if entering:
                token_ids = torch.tensor([token for group in entering for token in group.token_ids], device=self.device)
                hidden = model.model.embed_tokens(token_ids)
                for group, group_hidden in zip(entering, hidden.split([len(group) for group in entering])):
                    group.hidden = group_hidden
                    group.entered = True
                if self.config.has_unshared_ends:
                    self._end_layer_pass(entering, model.model.first_layer, first=True)
                self._decide(entering)

        with self.stats.part("block_passes"):
            _, recursing, _ = self._groups()
            block_groups = self._take(recursing, {})
            self.stats.block_pass_tokens += sum(int(group.active.sum()) for group in block_groups)
            if block_groups:
                self._block_pass(block_groups)
                self._decide(block_groups)
                for group in block_groups:
                    group.ready_since = self.iteration

        with self.stats.part("end_layers"):
            _, _, exited = self._groups()
            self.finished_this_step = []
            # Exited tokens wait for a full last-layer pass only while the block pass is full anyway.
            if exited and (len(exited) >= self.slots or len(block_groups) < self.slots):
                self._finish_recursion(self._take(exited, None), model)
        self.stats.iterations += 1
        self.stats.record_memory(self.storage.memory_report())

    def _decide(self, groups: list[TokenGroup]) -> None:
        """Which tokens of each group take its next recursion step (routing_mor.py decides, token by token)."""
        config = self.config
        pending = [group for group in groups if group.step < config.num_recursions]
        if config.routing == "none":
            for group in pending:
                group.active = torch.ones(len(group), dtype=torch.bool, device=self.device)
            return
        for step in sorted({group.step for group in pending}):
            at_step = [group for group in pending if group.step == step]
            hidden = torch.cat([group.hidden for group in at_step]).unsqueeze(0)
            sizes = [len(group) for group in at_step]
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=self.device)
            if config.routing == "token_choice":
                if step == 0:
                    chosen_depth, token_gate, _ = self.block.routing(hidden, valid)
                    for group, depth, gate in zip(at_step, chosen_depth[0].split(sizes), token_gate[0].split(sizes)):
                        group.chosen_depth, group.token_gate, group.recursion_input = depth, gate, group.hidden
                for group in at_step:
                    group.active = group.chosen_depth > step
            else:
                previous = torch.cat(
                    [group.active if step > 0 else torch.ones(len(group), dtype=torch.bool, device=self.device) for group in at_step]
                ).unsqueeze(0)
                selected, gate, _ = self.block.routing(hidden, previous, valid, step)
                for group, group_selected, group_gate in zip(at_step, selected[0].split(sizes), gate[0].split(sizes)):
                    group.active, group.gate = group_selected, group_gate

    def _token_set_of_step(self, step: int) -> int:
        return 0 if self.config.kv_cache_policy == "shared" else step

    def _block_pass(self, groups: list[TokenGroup]) -> None:
        """One pass of the shared block over every recursing group, each at its own step. Relaxed models have
        per-step weights (their deltas), so they take one pass per step present."""
        if self.config.relaxation_rank > 0:
            for step in sorted({group.step for group in groups}):
                self._run_block([group for group in groups if group.step == step], step)
        else:
            self._run_block(groups, None)
        for group in groups:
            group.depth = group.depth + group.active
            group.step += 1

    def _run_block(self, groups: list[TokenGroup], relaxed_step: int | None) -> None:
        config = self.config
        groups = sorted(groups, key=lambda group: int(group.active.sum()))  # equal query counts attend together
        token_sets = [self._token_set_of_step(group.step) for group in groups]
        write_pages, write_offsets, write_mask = [], [], []
        for group, token_set in zip(groups, token_sets):
            positions = group.token_index[group.active]
            stores = config.kv_cache_policy == "recursion_wise" or group.step == 0
            write_mask.extend([stores] * positions.numel())
            if stores:
                pages, offsets = self.storage.append(group.request_id, token_set, positions)
                write_pages.append(pages)
                write_offsets.append(offsets)
        mask = None if all(write_mask) else torch.tensor(write_mask, device=self.device)
        selections = [group.active for group in groups]
        block_input, hidden, counts = self._run_layers(
            self.block.layers, groups, selections, token_sets, (write_pages, write_offsets, mask), relaxed_step
        )
        if config.routing == "expert_choice":
            gate = torch.cat([group.gate[group.active] for group in groups])
            hidden = apply_gate(config, block_input, hidden, gate)
        for group, group_hidden in zip(groups, hidden.split(counts)):
            group.hidden = group.hidden.index_put((group.active.nonzero().squeeze(-1),), group_hidden)

    def _run_layers(self, layers, groups, selections, token_sets, writes, recursion_step=None):
        """Runs `layers` over the selected tokens of every group (None: all of them), packed row after row, each
        row reading its request's token set in the pages and writing its new keys/values to `writes` (pages,
        offsets, and the mask of tokens whose keys are stored). Returns the packed input, output and row sizes."""
        started = time.perf_counter()
        rows = list(zip(groups, selections))
        hidden = torch.cat([group.hidden if chosen is None else group.hidden[chosen] for group, chosen in rows])
        positions = [group.token_index if chosen is None else group.token_index[chosen] for group, chosen in rows]
        token_index = torch.cat(positions)
        counts = [row_positions.numel() for row_positions in positions]
        active_tokens = ActiveTokens.from_row_counts(torch.tensor(counts, device=self.device))
        request_ids = [group.request_id for group in groups]
        page_table, key_index = self.storage.read_layout(request_ids, token_sets)
        row_buckets = RowBuckets.of(counts, self.storage.slots_read(request_ids, token_sets), self.stats.attention)
        query_index = active_tokens.to_row_layout(token_index.unsqueeze(-1)).squeeze(-1).masked_fill(~active_tokens.valid, -1)
        attention_mask = build_attention_mask(self.config, query_index, key_index, key_index >= 0, hidden.dtype)
        cos, sin = self.model.model.rotary_emb(hidden.unsqueeze(0), position_ids=token_index.unsqueeze(0))
        pages, offsets, write_mask = writes
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        view = PagedKVView(
            self.layer_storage,
            torch.cat(pages) if pages else empty,
            torch.cat(offsets) if offsets else empty,
            write_mask,
            page_table,
            self.storage.gather_buffers,
            self.stats.attention,
        )
        self.stats.pass_setup += time.perf_counter() - started
        layer_input = hidden
        for layer in layers:
            hidden, _, _, _ = layer(
                hidden,
                attention_mask=attention_mask,
                position_embeddings=(cos[0], sin[0]),
                cache=view,
                recursion_step=recursion_step,
                active_tokens=active_tokens,
                row_buckets=row_buckets,
            )
        return layer_input, hidden, counts

    def _end_layer_pass(self, groups: list[TokenGroup], layer, first: bool) -> None:
        """The unshared first or last layer on every token of the groups. The first layer reserves their slots in
        the end layers' pages; the last layer writes the same slots."""
        groups = sorted(groups, key=len)  # equal query counts attend together
        if first:
            for group in groups:
                group.end_slots = self.storage.append(group.request_id, END_LAYERS, group.token_index)
        writes = ([group.end_slots[0] for group in groups], [group.end_slots[1] for group in groups], None)
        _, hidden, counts = self._run_layers([layer], groups, [None] * len(groups), [END_LAYERS] * len(groups), writes)
        for group, group_hidden in zip(groups, hidden.split(counts)):
            group.hidden = group_hidden

    def _finish_recursion(self, groups: list[TokenGroup], model) -> None:
        """Groups whose tokens have all exited: the last layer, the norm, the LM head and sampling."""
        if self.config.routing == "token_choice":
            for group in groups:
                gated = apply_gate(self.config, group.recursion_input, group.hidden, group.token_gate)
                group.hidden = torch.where((group.depth > 0).unsqueeze(-1), gated, group.hidden)
        if self.config.has_unshared_ends:
            self._end_layer_pass(groups, model.model.last_layer, first=False)
        sampled = [group for group in groups if group.needs_logits]
        if sampled:
            last_hidden = torch.stack([group.hidden[-1] for group in sampled])
            logits = model.lm_head(model.model.norm(last_hidden)).float()
            tokens = self._sample(sampled, logits)
        else:
            tokens = []
        token_of = dict(zip([group.request_id for group in sampled], tokens))
        for group in groups:
            request = self.active[group.request_id]
            request.processed += len(group)
            request.group = None
            self.stats.record_depths(group.depth)
            if group.request_id in token_of:
                request.new_token = token_of[group.request_id]
                self.finished_this_step.append(request)

    def _sample(self, groups: list[TokenGroup], logits: torch.Tensor) -> list[int]:
        if not self.logits_processor and not self.do_sample:
            return logits.argmax(-1).tolist()
        tokens = []
        for group, scores in zip(groups, logits):
            request = self.active[group.request_id]
            input_ids = torch.tensor([request.sequence()], device=self.device)
            scores = self.logits_processor(input_ids, scores.unsqueeze(0))
            if self.do_sample:
                probabilities = scores.softmax(-1)
                tokens.append(int(torch.multinomial(probabilities[0], 1, generator=request.generator)))
            else:
                tokens.append(int(scores.argmax(-1)))
        return tokens

    def update_batch(self) -> None:
        """Hands each sampled token to its request (transformers' `RequestState` applies EOS and max_new_tokens)."""
        outputs = []
        for request in self.finished_this_step:
            state = request.state
            if state.request_id not in self.active:
                continue  # cancelled meanwhile
            if state.generated_len() == 0:
                state.status = RequestStatus.DECODING
            if state.update_and_check_completion(request.new_token, None):
                self._finish(state.request_id)
            if state.streaming or state.status == RequestStatus.FINISHED:
                outputs.append(state.to_generation_output())
        self.finished_this_step = []
        if outputs:
            self.output_router.deliver_batch(outputs)


class Stopwatch:
    """Seconds added up by the code it is handed to (`add`): the attention of every pass, timed where it runs."""

    def __init__(self):
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds


class EngineStats:
    """Where an engine's time went, the depths its tokens took, and its KV memory next to the routed-token ideal.

    The parts do not overlap: attention (KV writes, page gathers, attention kernels) and pass setup (page tables,
    masks, rotary) are counted once, apart from the layers of the passes they belong to. They are wall-clock times
    on the host: on a GPU, which runs kernels asynchronously, they say where the host waited, not where the kernels
    ran."""

    def __init__(self):
        self.iterations = 0
        self.scheduling = self.end_layers = self.block_passes = self.pass_setup = 0.0
        self.attention = Stopwatch()
        self.block_pass_tokens = 0
        self.depth_histogram: dict[int, int] = {}
        self.peak_kv_bytes_held = 0
        self.held_over_ideal_at_peak = 1.0  # when the most memory is held: what a pool must be sized for
        self.peak_held_over_ideal = 1.0  # the largest ratio at any iteration (small holdings round up the most)

    @contextmanager
    def part(self, name: str):
        """Adds the time of the block to the part `name`, less the attention and pass setup timed inside it."""
        started, nested = time.perf_counter(), self.attention.seconds + self.pass_setup
        yield
        elapsed = time.perf_counter() - started - (self.attention.seconds + self.pass_setup - nested)
        setattr(self, name, getattr(self, name) + elapsed)

    def record_depths(self, depth: torch.LongTensor) -> None:
        for value, count in zip(*torch.unique(depth, return_counts=True)):
            self.depth_histogram[int(value)] = self.depth_histogram.get(int(value), 0) + int(count)

    def record_memory(self, report: dict) -> None:
        if report["kv_bytes_held"] > self.peak_kv_bytes_held:
            self.peak_kv_bytes_held = report["kv_bytes_held"]
            self.held_over_ideal_at_peak = report["held_over_ideal"]
        if report["kv_bytes_ideal"]:
            self.peak_held_over_ideal = max(self.peak_held_over_ideal, report["held_over_ideal"])

    def mean_depth(self) -> float:
        tokens = sum(self.depth_histogram.values())
        return sum(depth * count for depth, count in self.depth_histogram.items()) / tokens if tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "iterations": self.iterations,
            "seconds": {
                "scheduling": self.scheduling,
                "block_pass_layers": self.block_passes,
                "end_layers_head_sampling": self.end_layers,
                "attention_kv_paging": self.attention.seconds,
                "pass_setup_tables_masks": self.pass_setup,
            },
            "mean_block_pass_tokens": self.block_pass_tokens / max(self.iterations, 1),
            "depth_histogram": dict(sorted(self.depth_histogram.items())),
            "mean_depth": self.mean_depth(),
            "peak_kv_bytes_held": self.peak_kv_bytes_held,
            "kv_held_over_ideal_at_peak": self.held_over_ideal_at_peak,
            "peak_kv_held_over_ideal": self.peak_held_over_ideal,
        }


# Set while `generate_batch` runs in this thread: its manager serves in the calling thread (see the manager).
SERVE_IN_CALLING_THREAD = threading.local()


@contextmanager
def serving_in_calling_thread():
    previous = getattr(SERVE_IN_CALLING_THREAD, "active", False)
    SERVE_IN_CALLING_THREAD.active = True
    try:
        yield
    finally:
        SERVE_IN_CALLING_THREAD.active = previous


class MoRContinuousBatchingManager(ContinuousBatchingManager):
    """transformers' `ContinuousBatchingManager` (requests, outputs, streaming, background thread, cancellation)
    running MoR's `DepthwiseBatchProcessor` instead of the paged-attention processor.

    With `in_calling_thread=True` (what `generate_batch` builds: its caller only waits for the results) there is no
    background thread: `get_result` runs transformers' generation loop in the calling thread until a result is ready,
    and `stop` finishes the requests left. On CPU a second thread doing the work makes the OpenMP runtime hold more
    threads than cores, and it then puts its workers to sleep between parallel regions: every small matmul of a pass
    pays a wake-up (measured at 2 threads: the engine 1.29x faster in the calling thread, 493 vs 382 tokens/s)."""

    def __init__(
        self, model, generation_config, continuous_batching_config, workload_hints=None, in_calling_thread=False,
        has_default_max_length=True,
    ):
        self.workload_hints = workload_hints
        self.has_default_max_length = has_default_max_length  # see `new_tokens_allowed`
        self.in_calling_thread = in_calling_thread
        self._serving_here = False
        super().__init__(model, generation_config, continuous_batching_config, workload_hints)

    # ----------------------------------- serving in the calling thread ----------------------------------- #

    def start(self) -> None:
        if not self.in_calling_thread:
            return super().start()
        if self._serving_here:
            logger.warning("The manager is already serving.")
            return None
        self.background_thread_status.clear()
        self.batch_processor = self._create_batch_processor()
        self.current_batch = 0
        self._serving_here = True

    def is_running(self) -> bool:
        return self._serving_here if self.in_calling_thread else super().is_running()

    def _has_work(self) -> bool:
        return not self.input_queue.empty() or self.batch_processor.has_pending_requests()

    def _serve_one_iteration(self) -> None:
        """One iteration of transformers' generation loop, here; an exception fails every request and marks the
        manager dead (`background_thread_status.fatal_error`), as in the background thread."""
        try:
            if not self._generation_loop_body(self.batch_processor, bootstrapping=False):
                self._stop_serving_here()
        except Exception as error:
            logger.error(f"Error in generation loop: {error}", exc_info=True)
            self._handle_critical_error(error, self.batch_processor)
            self._stop_serving_here()

    def _stop_serving_here(self) -> None:
        self._serving_here = False
        self.background_thread_status.mark_as_stopped()

    def get_result(self, request_id: str | None = None, timeout: float | None = None):
        if not self.in_calling_thread:
            return super().get_result(request_id, timeout)
        while self._serving_here and self.output_router.output_queue.empty() and self._has_work():
            self._serve_one_iteration()
        return super().get_result(request_id, timeout=0)  # what is ready: nothing more comes without an iteration

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        if not self.in_calling_thread:
            return super().stop(block, timeout, keep_for_next_session, hard_stop)
        if self._serving_here and not hard_stop:
            while self._serving_here and self._has_work():  # flush: the requests left finish
                self._serve_one_iteration()
        if self._serving_here:
            if self.batch_processor is not None:
                self._fail_all_remaining_requests(RuntimeError("The manager was stopped."), self.batch_processor)
            self._stop_serving_here()
        if keep_for_next_session:
            self.model._cached_continuous_batching_manager = self
        else:
            self.batch_processor = None

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        """MoR's passes build their own per-row masks over paged keys: they run on eager or sdpa as they are."""
        if model.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"MoR continuous batching runs on the 'eager' or 'sdpa' attention, got "
                f"{model.config._attn_implementation!r}; load the model with attn_implementation='sdpa'."
            )

    def _create_batch_processor(self) -> DepthwiseBatchProcessor:
        if isinstance(self.batch_processor, DepthwiseBatchProcessor):
            self.batch_processor.reset()
            return self.batch_processor
        return DepthwiseBatchProcessor(self)

    def memory_report(self) -> dict:
        """Keys/values held now, per token set (pages, tokens, bytes held and the routed-token ideal)."""
        if self.batch_processor is None:
            raise RuntimeError("The manager has no batch processor yet: start() it or add requests first.")
        return self.batch_processor.storage.memory_report()

    def engine_stats(self) -> dict:
        """Iterations, time per part, depths taken and peak KV memory of the batch processor so far."""
        if self.batch_processor is None:
            raise RuntimeError("The manager has no batch processor yet: start() it or add requests first.")
        return self.batch_processor.stats.as_dict()


def init_mor_continuous_batching(model, generation_config=None, continuous_batching_config=None, workload_hints=None):
    """`init_continuous_batching` for MoR models (transformers' own checks, MoR's manager)."""
    config = model.config
    if config.sharing_strategy.endswith("sequence"):
        raise ValueError(
            f"Continuous batching serves the cycle strategies (a block pass runs every shared layer once); "
            f"sharing_strategy={config.sharing_strategy!r} repeats each layer in a row. Use generate() for this model."
        )
    in_calling_thread = getattr(SERVE_IN_CALLING_THREAD, "active", False)
    cached_manager = getattr(model, "_cached_continuous_batching_manager", None)
    if isinstance(cached_manager, MoRContinuousBatchingManager):
        if not cached_manager.is_running():
            cached_manager.in_calling_thread = in_calling_thread
        return cached_manager
    default_max_length = has_default_max_length(model, generation_config)
    # As generate() does: the fields the caller leaves unset come from model.generation_config, then from transformers'
    # defaults (a copy: the caller's config is left as it is).
    generation_config, _ = model._prepare_generation_config(generation_config)
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = -1  # as transformers does: no EOS
    if continuous_batching_config is None:
        continuous_batching_config = ContinuousBatchingConfig()
    return MoRContinuousBatchingManager(
        model, generation_config, continuous_batching_config, workload_hints, in_calling_thread=in_calling_thread,
        has_default_max_length=default_max_length,
    )


__all__ = [
    "MoRContinuousBatchingManager",
    "DepthwiseBatchProcessor",
    "init_mor_continuous_batching",
    "serving_in_calling_thread",
]

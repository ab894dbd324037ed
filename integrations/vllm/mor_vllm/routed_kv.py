"""Recursion-wise KV caching inside vLLM's allocator: a recursion step stores keys and values only for the tokens the
routers sent to it.

vLLM's KV cache manager hands out blocks from one pool to KV cache groups, each with its own block table per request
(its hybrid allocator, the mechanism sliding-window and Mamba layers use). Here every recursion step's attention
layers form groups of their own (`RecursionStepSpec`, registered in vLLM's `KVCacheSpecRegistry`), so a step holds
blocks for as many tokens as it stores, from the same pool and budget as every other layer: `kv_cache_memory_bytes`
/ `VLLM_CPU_KVCACHE_SPACE` mean what they mean for a vanilla model, and the scheduler's admission, queueing and
preemption are vLLM's own.

Which tokens a step stores is known only after the forward pass, in the worker, while the scheduler allocates before
it. So:

- The manager of a routed step (`RoutedStepManager`) reserves, for a request, the tokens its step stored so far plus
  every token of the request not yet reported: the most the routers can send.
- The worker (`RoutedKVWorker`) counts, per request and step, the tokens routed in each forward pass
  (`RoutedTokenCounts`, kept by the model) and returns them beside the sampled tokens; the scheduler
  (`RoutedKVScheduler`) hands them to the managers before vLLM processes the output.
- Then both sides drop the blocks the routing left unused at the end of the step's block table (`trim_to`): the
  scheduler's manager frees them to the pool, the worker shortens its copy of the block table by as many. Both count
  the same stored tokens, and vLLM's CPU engine schedules a pass only after the previous one's output is processed,
  so the two tables stay equal; the next blocks either allocates are appended after the kept ones on both sides.
- The model writes a routed token's key at its rank among the step's stored tokens of its request (a compacted slot
  in the step's block table) and the step's attention reads only those (`step_attention.RoutedStepStorage`).

Prefix caching is turned off for such checkpoints: a routed step's blocks hold the tokens routed there, not a prefix
of positions, so they cannot be shared by block hash.

Built for vLLM's CPU attention backend (its metadata is what `step_attention.py` rewrites per step).
"""

from dataclasses import dataclass, replace

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.worker.cpu_worker import CPUWorker

from . import plugin_logger


logger = plugin_logger(__name__)

# A recursion-wise checkpoint's KV is spread over more KV cache groups than a vanilla model's, each rounding a
# request's tokens up to whole blocks; vLLM's CPU default (128 tokens) would eat the saving on requests of a few
# hundred tokens (240 MiB, 128 requests of 160-256 tokens: 34 running at 128, 60 at 32; docs/benchmarks.md).
ROUTED_KV_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes
WORKER_CLS = f"{__name__}.RoutedKVWorker"
SCHEDULER_CLS = f"{__name__}.RoutedKVScheduler"


@dataclass(frozen=True, kw_only=True)
class RecursionStepSpec(AttentionSpec):
    """The KV cache of a shared layer's attention at one recursion step. Layers of different steps never share a KV
    cache group (each step's block tables follow its own tokens); `routed`: the step stores only the tokens routed
    to it (a step every token takes stores all, like a vanilla layer).

    Not a FullAttentionSpec: vLLM would put every full-attention-like layer in one group (one block table for all)."""

    recursion_step: int
    routed: bool

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # A request at max_model_len may have routed every token to the step.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())

    @classmethod
    def merge(cls, specs: list["RecursionStepSpec"]) -> "RecursionStepSpec":
        if not all(isinstance(spec, RecursionStepSpec) and spec == specs[0] for spec in specs):
            # vLLM groups layers by trying to merge their specs, and reads an AssertionError as "keep them apart"
            # (as KVCacheSpec.merge raises it).
            raise AssertionError("layers of different recursion steps (or other attention) keep separate KV cache groups")
        return replace(specs[0])


class RoutedStepManager(FullAttentionManager):
    """Blocks of one recursion step: a step every token takes allocates as full attention does; a routed step
    reserves the tokens it stored so far plus every token not yet reported by the worker (`record`)."""

    def __init__(self, kv_cache_spec: RecursionStepSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.recursion_step = kv_cache_spec.recursion_step
        self.routed = kv_cache_spec.routed
        self.stored_tokens: dict[str, int] = {}  # request -> tokens the step stores
        self.reported_tokens: dict[str, int] = {}  # request -> tokens the worker has reported on

    def slots_needed(self, request_id: str, num_tokens: int) -> int:
        """The step's slots a request with `num_tokens` tokens can need: all of them where every token takes the
        step; otherwise those stored so far and one per token the routers have yet to decide on."""
        if not self.routed:
            return num_tokens
        unreported = max(num_tokens - self.reported_tokens.get(request_id, 0), 0)
        return self.stored_tokens.get(request_id, 0) + unreported

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self.slots_needed(request_id, num_tokens), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, self.slots_needed(request_id, num_tokens_main_model), apply_admission_cap,
            prefill_end,
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id, self.slots_needed(request_id, num_tokens), self.slots_needed(request_id, num_tokens_main_model)
        )

    def record(self, request_id: str, num_tokens: int, num_routed: int) -> None:
        """The worker ran `num_tokens` more of the request's tokens, `num_routed` of which the step stored."""
        self.reported_tokens[request_id] = self.reported_tokens.get(request_id, 0) + num_tokens
        self.stored_tokens[request_id] = self.stored_tokens.get(request_id, 0) + num_routed

    def trim(self, request_id: str) -> None:
        """Frees the blocks past those the step's stored tokens fill (the worker drops the same ones from its
        table: RoutedKVWorker.trim_block_tables), once every scheduled token of the request is reported."""
        blocks = self.req_to_blocks.get(request_id)
        keep = cdiv(self.stored_tokens.get(request_id, 0), self.block_size)
        if blocks is not None and len(blocks) > keep:
            unused = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(unused))

    def pop_blocks_for_free(self, request_id: str):
        # Finished, aborted or preempted: a preempted request recomputes from its first token.
        self.stored_tokens.pop(request_id, None)
        self.reported_tokens.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


# Registered where this module is imported: in the worker that builds the model and in the engine process that
# unpickles the specs. vLLM registers its own specs only into an empty registry, so first.
KVCacheSpecRegistry._ensure_registered()
KVCacheSpecRegistry.register(RecursionStepSpec, RoutedStepManager, uniform_type_base_spec=RecursionStepSpec)


class RoutedTokenCounts:
    """Worker side: per request and recursion step, how many of the request's tokens the step stores. The model
    counts each forward pass (`begin`, then each routed step's tokens per request into `ForwardCounts.routed`, then
    `end`); the worker reads what the last pass routed (`take_reports`) and forgets finished requests (`forget`).

    A request whose pass starts at its first token (new, or recomputed after preemption) starts from zero."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.stored: dict[str, torch.Tensor] = {}
        self.reports: dict[str, list[int]] = {}
        # Set by the worker: the request ids of the batch, in the order of vLLM's attention metadata.
        self.batch_request_ids = None

    def begin(self, context_lens: torch.Tensor) -> "ForwardCounts":
        """The counts for one forward pass of the batch; `context_lens`: each request's tokens computed before it."""
        if self.batch_request_ids is None:
            raise RuntimeError(
                "routed-token KV caching needs the request ids of vLLM's batch, which mor_vllm's worker provides "
                f"({WORKER_CLS}); this engine runs another worker class."
            )
        request_ids = list(self.batch_request_ids()[: context_lens.numel()])
        if len(request_ids) != context_lens.numel():
            raise RuntimeError(
                f"vLLM's batch holds {len(request_ids)} requests and its attention metadata {context_lens.numel()}: "
                f"routed-token KV caching cannot tell which request a token belongs to."
            )
        stored_before = torch.zeros(len(request_ids), self.num_steps, dtype=torch.long)
        for row, (request_id, context_len) in enumerate(zip(request_ids, context_lens.tolist())):
            if context_len == 0:
                continue
            if request_id not in self.stored:
                raise RuntimeError(
                    f"request {request_id} starts at token {context_len} (a prefix from elsewhere?), but routed-token "
                    f"KV caching only knows what its own passes stored."
                )
            stored_before[row] = self.stored[request_id]
        return ForwardCounts(request_ids, stored_before, torch.zeros_like(stored_before))

    def end(self, counts: "ForwardCounts") -> None:
        stored_after = counts.stored_before + counts.routed
        for row, request_id in enumerate(counts.request_ids):
            self.stored[request_id] = stored_after[row]
            self.reports[request_id] = counts.routed[row].tolist()

    def take_reports(self) -> dict[str, list[int]]:
        """Per request of the last forward passes: the tokens each step stored among its new tokens."""
        reports, self.reports = self.reports, {}
        return reports

    def forget(self, request_ids) -> None:
        for request_id in request_ids:
            self.stored.pop(request_id, None)


@dataclass
class ForwardCounts:
    """One forward pass: the batch's requests, the tokens each step stored for them before it, and those it routes."""

    request_ids: list[str]
    stored_before: torch.Tensor  # [requests, steps]
    routed: torch.Tensor  # [requests, steps]


class RoutedKVWorker(CPUWorker):
    """vLLM's CPU worker, which also reports what each routed step stored per request (`RoutedTokenCounts`)."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        # The runner may rebuild its input batch once the KV cache is set up: read it at every pass.
        self.routed_token_counts().batch_request_ids = lambda: self.model_runner.input_batch.req_ids

    def routed_token_counts(self) -> RoutedTokenCounts:
        return self.model_runner.get_model().model.recursion_block.routed_token_counts

    def execute_model(self, scheduler_output):
        self.routed_token_counts().forget(scheduler_output.finished_req_ids)
        return super().execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        reports = self.routed_token_counts().take_reports()
        if reports:
            self.trim_block_tables(reports)
            output.mor_routed_tokens = reports
        return output

    def trim_block_tables(self, reports: dict[str, list[int]]) -> None:
        """Drops from the runner's block tables of the routed steps' groups the blocks past those the step's stored
        tokens fill, as the scheduler's managers free them (RoutedStepManager.trim)."""
        runner, stored = self.model_runner, self.routed_token_counts().stored
        for group_index, group in enumerate(runner.kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            if not (isinstance(spec, RecursionStepSpec) and spec.routed):
                continue
            block_table = runner.input_batch.block_table[group_index]
            for request_id in reports:
                keep = cdiv(int(stored[request_id][spec.recursion_step]), spec.block_size)
                block_ids = runner.requests[request_id].block_ids[group_index]
                del block_ids[keep:]
                row = runner.input_batch.req_id_to_index[request_id]
                held = block_table.num_blocks_per_row[row]
                if held > keep:
                    block_table.block_table.np[row, keep:held] = 0  # the freed blocks may go to other requests
                    block_table.num_blocks_per_row[row] = keep


class RoutedKVScheduler(Scheduler):
    """vLLM's scheduler, which passes the worker's routed-token counts to the routed steps' managers before it
    processes a step's output (so the next allocation reserves only what the routing can still need)."""

    def update_from_output(self, scheduler_output, model_runner_output):
        managers = [
            manager
            for manager in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(manager, RoutedStepManager) and manager.routed
        ]
        if managers and scheduler_output.num_scheduled_tokens:
            reports = getattr(model_runner_output, "mor_routed_tokens", None) or {}
            for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
                if request_id not in reports:
                    raise RuntimeError(
                        f"the worker reported no routed-token counts for request {request_id}: routed-token KV "
                        f"caching needs mor_vllm's worker ({WORKER_CLS}) beside its scheduler."
                    )
                for manager in managers:
                    manager.record(request_id, num_tokens, reports[request_id][manager.recursion_step])
                    manager.trim(request_id)
        return super().update_from_output(scheduler_output, model_runner_output)


def stores_routed_tokens(config, platform) -> bool:
    """Whether vLLM serves this checkpoint with routed-token recursion-wise KV: recursion-wise KV caching with a step
    not every token takes, on vLLM's CPU platform."""
    from .routing_mor import steps_every_token_takes

    return (
        platform.is_cpu()
        and config.kv_cache_policy == "recursion_wise"
        and config.routing != "none"
        and steps_every_token_takes(config) < config.num_recursions
    )


def configure_engine(vllm_config) -> None:
    """Sets the worker and scheduler classes, KV blocks of ROUTED_KV_BLOCK_SIZE tokens unless the user chose a size,
    and turns prefix caching off, for a checkpoint served with routed-token KV; refuses settings that would bypass
    them."""
    from .checks import UnsupportedMoRCheckpoint

    parallel_config, scheduler_config = vllm_config.parallel_config, vllm_config.scheduler_config
    if parallel_config.worker_cls not in ("auto", "vllm.v1.worker.cpu_worker.CPUWorker", WORKER_CLS):
        raise UnsupportedMoRCheckpoint(
            f"worker_cls={parallel_config.worker_cls!r}: a recursion-wise MoR checkpoint stores each step's routed "
            f"tokens only, which needs mor_vllm's worker ({WORKER_CLS}). Leave worker_cls unset."
        )
    if scheduler_config.scheduler_cls not in (None, SCHEDULER_CLS):
        raise UnsupportedMoRCheckpoint(
            f"scheduler_cls={scheduler_config.scheduler_cls!r}: a recursion-wise MoR checkpoint stores each step's "
            f"routed tokens only, which needs mor_vllm's scheduler ({SCHEDULER_CLS}). Leave scheduler_cls unset."
        )
    if scheduler_config.disable_hybrid_kv_cache_manager:
        raise UnsupportedMoRCheckpoint(
            "disable_hybrid_kv_cache_manager=True: a recursion-wise MoR checkpoint keeps each recursion step's KV in "
            "a KV cache group of its own (vLLM's hybrid KV cache manager). Leave it unset."
        )
    if vllm_config.kv_transfer_config is not None or vllm_config.cache_config.kv_offloading_size:
        raise UnsupportedMoRCheckpoint(
            "a KV connector or KV offloading with a recursion-wise MoR checkpoint: its recursion steps' KV blocks hold "
            "the tokens routed there (routed_kv.py), which a connector would read or fill as positions. Serve it "
            "without kv_transfer_config / kv_offloading_size."
        )
    if vllm_config.speculative_config is not None:
        raise UnsupportedMoRCheckpoint(
            "speculative decoding with a recursion-wise MoR checkpoint: its routed-token KV counts every scheduled "
            "token as run, which rejected draft tokens are not. Serve it without speculative_config."
        )
    parallel_config.worker_cls = WORKER_CLS
    scheduler_config.scheduler_cls = SCHEDULER_CLS
    cache_config = vllm_config.cache_config
    if not cache_config.user_specified_block_size:
        logger.info(
            "MoR: KV blocks of %d tokens for this recursion-wise checkpoint (each recursion step keeps its own blocks; "
            "smaller ones waste less); block_size=... sets another.", ROUTED_KV_BLOCK_SIZE,
        )
        cache_config.block_size = ROUTED_KV_BLOCK_SIZE
        cache_config.user_specified_block_size = True  # so that the CPU platform keeps it
    if vllm_config.cache_config.enable_prefix_caching:
        logger.info(
            "MoR: prefix caching is off for this recursion-wise checkpoint: a recursion step's KV blocks hold the "
            "tokens routed to it, not a prefix of positions, so they cannot be shared by block hash."
        )
        vllm_config.cache_config.enable_prefix_caching = False

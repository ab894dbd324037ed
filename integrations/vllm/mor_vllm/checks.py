"""What the vLLM plugin refuses to serve, and the engine settings it chooses for a checkpoint, where vLLM asks: kept
apart from model.py so that the plugin's registration, which runs in every vLLM process, imports no model layers."""

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from . import plugin_logger


logger = plugin_logger(__name__)


class UnsupportedMoRCheckpoint(Exception):
    """Raised when the model is built for a checkpoint or a setting vLLM cannot serve it with.

    Not a ValueError: vLLM's configuration is a pydantic dataclass, whose validation wraps a ValueError raised in the
    configuration hook into its own multi-line ValidationError; any other exception reaches the user as it is, so the
    traceback ends on this one message."""


def has_step_deltas(config) -> bool:
    """Whether the shared projections add low-rank per-step deltas at run time (model.StepDelta): a relaxed checkpoint
    whose relaxation is not full rank (a full-rank one is merged into per-step weights instead)."""
    return config.relaxation_rank > 0 and not config.has_full_rank_relaxation


def check_servable(
    config, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, head_sizes: list[int] | None = None
) -> None:
    """Refuses what this model cannot serve exactly, with one message naming the reason and the alternative. vLLM
    runs it when the engine's configuration is made, before any process starts (`MoRConfigCheck`), and the model
    again when it is built. `head_sizes`: the head sizes the platform's attention kernels take, where it has a fixed
    list (vLLM's CPU backend)."""
    if getattr(config, "model_type", None) != "mor":
        raise UnsupportedMoRCheckpoint(f"MoRForCausalLM needs an MoR config (model_type 'mor'), got {type(config).__name__}.")
    config.validate_recursion()
    if pipeline_parallel_size > 1:
        raise UnsupportedMoRCheckpoint(
            f"pipeline_parallel_size={pipeline_parallel_size}: MoR's shared recursion block runs its layers several "
            f"times, so it cannot be split into pipeline stages. Use tensor_parallel_size instead."
        )
    if has_step_deltas(config) and tensor_parallel_size > 1:
        raise UnsupportedMoRCheckpoint(
            f"relaxation_rank={config.relaxation_rank} with tensor_parallel_size={tensor_parallel_size}: the per-step "
            f"low-rank deltas of a relaxed checkpoint are not sharded (full-rank ones are: they load as per-step "
            f"weights). Serve it with tensor_parallel_size=1."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_sizes is not None and head_dim not in head_sizes:
        raise UnsupportedMoRCheckpoint(
            f"head_dim={head_dim}: vLLM's CPU attention kernels take head sizes {', '.join(map(str, head_sizes))} "
            f"only, so this checkpoint would fail at its first request. Serve it with transformers (generate_batch), "
            f"or convert a source whose hidden_size / num_attention_heads is one of those sizes."
        )
    if config.hidden_act != "silu":
        raise UnsupportedMoRCheckpoint(
            f"hidden_act={config.hidden_act!r}: vLLM's Llama layers support only 'silu'. Serve this checkpoint with "
            f"transformers (generate_batch)."
        )


class MoRConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture configuration hook (MODELS_CONFIG_MAP): refuses an unservable checkpoint in the
    process that loads it, before vLLM starts its engine, sets the engine up for routed-token KV where the checkpoint
    uses it (routed_kv.py), and on the CPU serves it eagerly unless a compilation mode was chosen."""

    @staticmethod
    def verify_and_update_config(vllm_config: "VllmConfig") -> None:
        parallel_config = vllm_config.parallel_config
        check_servable(
            vllm_config.model_config.hf_config,
            parallel_config.tensor_parallel_size,
            parallel_config.pipeline_parallel_size,
            cpu_attention_head_sizes(),
        )
        from vllm.platforms import current_platform

        from .routed_kv import configure_engine, stores_routed_tokens

        if stores_routed_tokens(vllm_config.model_config.hf_config, current_platform):
            configure_engine(vllm_config)
        if current_platform.is_cpu():
            serve_eagerly_unless_compilation_chosen(vllm_config)


def serve_eagerly_unless_compilation_chosen(vllm_config: "VllmConfig") -> None:
    """On the CPU an MoR checkpoint is served eagerly (`enforce_eager=True`) unless the user chose how to compile: a
    compilation mode, or an optimization level other than vLLM's default (-O2, which cannot be told from no choice).
    vLLM's whole-model compile cannot trace the routed recursion loop, so in compile mode the model compiles only its
    static pieces (model.py), and on the CPU those served no faster than eager execution, slower where KV memory
    binds, while they switch vLLM's C++ kernels off and add compile time at start-up (docs/vllm.md). vLLM calls this
    hook before it resolves its default mode, so a mode the user set is still told apart."""
    from vllm.config import CompilationMode
    from vllm.config.vllm import OptimizationLevel

    chosen = vllm_config.compilation_config.mode is not None or vllm_config.optimization_level != OptimizationLevel.O2
    if chosen or vllm_config.model_config.enforce_eager:
        return
    logger.info(
        "MoR: served eagerly on the CPU (enforce_eager=True): its compiled pieces measured no faster there; "
        "compilation_config={'mode': %d} compiles them.", CompilationMode.VLLM_COMPILE,
    )
    vllm_config.model_config.enforce_eager = True


def cpu_attention_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention kernels take, on a CPU platform (None elsewhere: GPU backends are chosen
    per head size by vLLM itself). Its kernels check the size only when they first run, inside the engine."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()

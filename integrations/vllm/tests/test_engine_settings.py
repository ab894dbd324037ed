"""The engine settings the plugin chooses for an MoR checkpoint, read from the configuration vLLM builds (no engine
starts), each announced by a log line that shows where vLLM's own lines do: KV blocks of 32 tokens and prefix caching
off for routed-token KV (routed_kv.py), and on the CPU eager execution unless the user chose how to compile
(checks.py). Each configuration is built in a fresh process, as a user's script would, so the lines are read from
what vLLM's logging writes, not from a test's log capture."""

import json
import subprocess
import textwrap

import pytest

from conftest import KV_CACHE_BYTES, python


BLOCKS_LINE = "MoR: KV blocks of 32 tokens for this recursion-wise checkpoint"
PREFIX_LINE = "MoR: prefix caching is off for this recursion-wise checkpoint"
EAGER_LINE = "MoR: served eagerly on the CPU (enforce_eager=True)"


def engine_settings(folder, **settings) -> tuple[dict, str]:
    """The settings vLLM's configuration holds for `folder` with the user's `settings`, and what the process logged."""
    script = textwrap.dedent(f"""
        import json
        from vllm.engine.arg_utils import EngineArgs
        config = EngineArgs(model={str(folder)!r}, dtype="float32", max_model_len=256,
                            kv_cache_memory_bytes={KV_CACHE_BYTES}, **{settings!r}).create_engine_config()
        print("SETTINGS " + json.dumps({{
            "enforce_eager": config.model_config.enforce_eager,
            "compilation_mode": int(config.compilation_config.mode),
            "block_size": config.cache_config.block_size,
            "prefix_caching": config.cache_config.enable_prefix_caching,
        }}))
    """)
    result = subprocess.run([python(), "-c", script], capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("SETTINGS ")]
    assert result.returncode == 0 and lines, log[-3000:]
    return json.loads(lines[-1].removeprefix("SETTINGS ")), log


def test_recursion_wise_checkpoint_under_vllms_defaults(references):
    folder, _ = references
    settings, log = engine_settings(folder / "expert")
    assert settings == {"enforce_eager": True, "compilation_mode": 0, "block_size": 32, "prefix_caching": False}
    for line in (BLOCKS_LINE, PREFIX_LINE, EAGER_LINE):
        assert log.count(line) == 1, f"{line!r} not logged once:\n{log[-3000:]}"


def test_shared_kv_checkpoint_is_served_eagerly_and_keeps_vllms_kv_settings(references):
    """Shared KV stores step 1's keys only, like a vanilla layer: vLLM's block size and prefix caching stay."""
    folder, _ = references
    settings, log = engine_settings(folder / "expert_shared")
    assert settings["enforce_eager"] and settings["compilation_mode"] == 0
    assert settings["block_size"] != 32 and settings["prefix_caching"]
    assert EAGER_LINE in log and BLOCKS_LINE not in log and PREFIX_LINE not in log


@pytest.mark.parametrize("choice", [dict(compilation_config={"mode": 3}), dict(optimization_level=3)])
def test_a_chosen_compilation_is_kept(references, choice):
    """A compilation mode, or an optimization level other than vLLM's default, is the user's choice: vLLM compiles
    (on the CPU its mode 3 runs as mode 2, Dynamo tracing once) and the model compiles its static pieces."""
    folder, _ = references
    settings, log = engine_settings(folder / "expert", **choice)
    assert not settings["enforce_eager"] and settings["compilation_mode"] == 2
    assert EAGER_LINE not in log


def test_enforce_eager_is_not_announced_again(references):
    folder, _ = references
    settings, log = engine_settings(folder / "expert", enforce_eager=True)
    assert settings["enforce_eager"] and EAGER_LINE not in log

"""vLLM plugin for Mixture-of-Recursions checkpoints saved by this project.

Installed next to vLLM (`pip install ./integrations/vllm`), it is found through the `vllm.general_plugins` entry
point, in every vLLM process: `register()` makes `LLM(model=FOLDER)` and `vllm serve FOLDER` build `MoRForCausalLM`
(model.py) for a folder whose config.json says `"architectures": ["MoRForCausalLM"]`, and lets transformers read the
folder's config as the project's `MoRConfig` without `trust_remote_code`.
"""

ARCHITECTURE = "MoRForCausalLM"


def register() -> None:
    """vLLM calls this in each of its processes; registering twice is harmless."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .configuration_mor import MoRConfig

    AutoConfig.register("mor", MoRConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A "module:class" string: vLLM imports the model lazily, in the processes that build it.
        ModelRegistry.register_model(ARCHITECTURE, "mor_vllm.model:MoRForCausalLM")
    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        from .checks import MoRConfigCheck

        MODELS_CONFIG_MAP[ARCHITECTURE] = MoRConfigCheck


def plugin_logger(module_name: str):
    """The logger of a plugin module, placed under vLLM's logger ("vllm"): vLLM configures that logger's handlers and
    level, and no other, so a logger of its own name would drop the plugin's INFO lines (the settings it chose for a
    checkpoint) where vLLM's show."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.plugins.{module_name}")

"""Turn pretrained Llama-architecture checkpoints (Llama, SmolLM, SmolLM2) into Mixture-of-Recursions models."""

import warnings


# `python -m conversion.convert_llama_to_mor` imports this package (and so the CLI module) before running the CLI
# module as __main__; runpy warns about it, harmlessly: the CLI keeps no state from the first import.
warnings.filterwarnings(
    "ignore", message=r".*'conversion\.\w+' found in sys\.modules after import of package 'conversion'", category=RuntimeWarning
)

# Imported eagerly so that the package attribute `convert_llama_to_mor` is the function, not the submodule of the
# same name (the submodule also holds the command line).
from .convert_llama_to_mor import INIT_STRATEGIES, convert_llama_to_mor  # noqa: E402


__all__ = ["convert_llama_to_mor", "INIT_STRATEGIES"]

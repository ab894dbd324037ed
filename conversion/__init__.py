"""Turn pretrained Llama-architecture checkpoints (Llama, SmolLM, SmolLM2) into Mixture-of-Recursions models.

The repository's `conversion/` folder, which `pip install` installs as the package `mor_conversion` (`from
mor_conversion import convert_llama_to_mor`) with the command lines `mor-convert`, `mor-uptrain`, `mor-pretrain` and
`mor-push` (setup.py). From the repository root it also runs as it is: `python -m conversion.uptrain`.
"""

import re
import warnings


# `python -m conversion.convert_llama_to_mor` imports this package (and so the CLI module) before running the CLI
# module as __main__; runpy warns about it, harmlessly: the CLI keeps no state from the first import. The package is
# `conversion` in the repository and `mor_conversion` once installed.
_package = re.escape(__name__)
warnings.filterwarnings(
    "ignore", message=rf".*'{_package}\.\w+' found in sys\.modules after import of package '{_package}'",
    category=RuntimeWarning,
)

# Imported eagerly so that the package attribute `convert_llama_to_mor` is the function, not the submodule of the
# same name (the submodule also holds the command line).
from .convert_llama_to_mor import INIT_STRATEGIES, convert_llama_to_mor  # noqa: E402


__all__ = ["convert_llama_to_mor", "INIT_STRATEGIES"]

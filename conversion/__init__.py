"""Turn pretrained Llama-architecture checkpoints (Llama, SmolLM, SmolLM2) into Mixture-of-Recursions models.

The repository's `conversion/` folder, which `pip install` installs as the package `mor_conversion` (`from
mor_conversion import convert_llama_to_mor`) with the command lines `mor-convert`, `mor-uptrain`, `mor-pretrain` and
`mor-push` (setup.py). From the repository root it also runs as it is: `python -m conversion.uptrain`.
"""

import importlib
import re
import sys
import types
import warnings


# `python -m conversion.convert_llama_to_mor` imports this package (and so the CLI module) before running the CLI
# module as __main__; runpy warns about it, harmlessly: the CLI keeps no state from the first import. The package is
# `conversion` in the repository and `mor_conversion` once installed.
_package = re.escape(__name__)
warnings.filterwarnings(
    "ignore", message=rf".*'{_package}\.\w+' found in sys\.modules after import of package '{_package}'",
    category=RuntimeWarning,
)


class _Package(types.ModuleType):
    """The package attribute `convert_llama_to_mor` is the function, not the submodule of the same name (which also
    holds the command line, and which the import system sets here once it is imported), and it is imported on first
    use: importing the package imports no torch, so that the console scripts (`commands`) start at once."""

    @property
    def convert_llama_to_mor(self):
        return importlib.import_module(f"{__name__}.convert_llama_to_mor").convert_llama_to_mor

    @convert_llama_to_mor.setter
    def convert_llama_to_mor(self, submodule):
        pass  # the submodule, set by the import system, stays in sys.modules

    @property
    def INIT_STRATEGIES(self):
        return importlib.import_module(f"{__name__}.convert_llama_to_mor").INIT_STRATEGIES


sys.modules[__name__].__class__ = _Package

__all__ = ["convert_llama_to_mor", "INIT_STRATEGIES"]

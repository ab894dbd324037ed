"""The console scripts `mor-convert`, `mor-uptrain`, `mor-pretrain` and `mor-push` (setup.py's entry points).

Each imports its command line inside `run_command_line`, so that Ctrl-C while torch and transformers are still being
imported (several seconds) ends with the same one `error:` line as later, not with a KeyboardInterrupt traceback. This
module and the package's `__init__` import neither.
"""

import importlib

from .cli_checks import run_command_line


def _run(module: str) -> int:
    return run_command_line(lambda: importlib.import_module(f"{__package__}.{module}").command_line())


def convert() -> int:
    return _run("convert_llama_to_mor")


def uptrain() -> int:
    return _run("uptrain")


def pretrain() -> int:
    return _run("pretrain")


def push() -> int:
    return _run("push_to_hub")

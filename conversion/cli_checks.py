"""Checks and error messages shared by the command lines (the converter, uptraining, pushing, and the example scripts).

Bad input is reported as one `error: <problem and the fix>` line, found before any heavy work (loading a model,
training): the checks here read config files and file headers only.
"""

import argparse
import contextlib
import os
from pathlib import Path
from typing import NamedTuple


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The `--help` layout of every command line: the description keeps its line breaks (its examples), and each
    option's help ends with its default, unless it has none (None, a flag's False) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


# The largest hidden size for which the command lines run on one CPU thread by default (docs/benchmarks.md#cpu-threads,
# 2 cores): up to it one thread generated and trained several times faster than torch's default (one per core), 13x
# per generated token for the shipped stories260K (hidden size 64), because thread start-up and synchronisation cost
# more than the small matrix products gain; at hidden size 512, batched decoding was faster on 2 threads.
ONE_THREAD_MAX_HIDDEN_SIZE = 256


def choose_threads(config=None) -> str:
    """Sets torch's CPU threads for a run of the model `config` describes (any config with a `hidden_size`), and
    returns the line each command line starts with about them: the number OMP_NUM_THREADS gives when it is set; one
    thread for a model of hidden size up to ONE_THREAD_MAX_HIDDEN_SIZE; torch's default otherwise."""
    import torch

    fix = "set OMP_NUM_THREADS to choose another number"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"Using {torch.get_num_threads()} CPU thread(s), as OMP_NUM_THREADS says."
    hidden_size = getattr(config, "hidden_size", None)
    if hidden_size is not None and hidden_size <= ONE_THREAD_MAX_HIDDEN_SIZE:
        torch.set_num_threads(1)
        return (f"Using 1 CPU thread: faster than several for a model this small (hidden size {hidden_size}); "
                f"{fix}.")
    size = f" for a model of hidden size {hidden_size}" if hidden_size is not None else ""
    return f"Using {torch.get_num_threads()} CPU thread(s), torch's default{size}; {fix}."


# The weights `save_pretrained` writes (one file, or an index of shards).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# The files `save_pretrained` of fast and slow tokenizers writes: a folder with none of them holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "*.spm", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_FIX = ("save the tokenizer of the model it came from next to the weights (tokenizer.save_pretrained(folder); "
                 "mor-convert saves its source's)")


def load_tokenizer(folder, described: str, needed_by: str, fix: str = TOKENIZER_FIX, **kwargs):
    """The tokenizer of `folder` (a folder or a Hub id, given as the argument `described`: "MODEL", "--tokenizer"),
    with `trust_remote_code=True` unless `kwargs` say otherwise; ValueError in one line naming the folder, what needs
    the tokenizer (`needed_by`) and `fix`. A folder without any tokenizer file is said to be one (transformers would
    ask to install sentencepiece or tiktoken instead)."""
    from transformers import AutoTokenizer

    given = f"{described} {folder}".strip()
    path = Path(folder).expanduser()
    if path.is_dir() and not kwargs.get("gguf_file") and not any(any(path.glob(name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{given} has no tokenizer (no {', '.join(TOKENIZER_FILES[:2])} or {TOKENIZER_FILES[4]}); "
                         f"{needed_by}. Fix: {fix}.")
    try:
        return AutoTokenizer.from_pretrained(folder, **{"trust_remote_code": True, **kwargs})
    except (OSError, ValueError) as error:
        raise ValueError(f"the tokenizer of {given} could not be loaded ({one_line(error)}); {needed_by}. Fix: "
                         f"{fix}.") from None


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (what follows `error: `); its type when it has no message."""
    return " ".join(str(error).split()) or type(error).__name__


def looks_like_hub_id(name: str, given_as_path: bool = True) -> bool:
    """Whether `name` has the form of a Hub model id, 'name' or 'org/name', and so is no local path spelling (a
    relative, absolute or home path, or one with more than one '/'), nor a mistyped local path: an 'org/name' whose
    'org' is a local folder is read as a path (when `name` was given where a path is accepted too), so that a missing
    one is refused at once instead of after the Hub's retries (up to a minute when the Hub cannot be reached)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    if given_as_path and "/" in name and Path(name.split("/")[0]).is_dir():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_as_path(name: str) -> str:
    """For the message about a missing `name`: why an 'org/name' was read as a local path, not as a Hub id."""
    if "/" in name and Path(name.split("/")[0]).is_dir() and looks_like_hub_id(name, given_as_path=False):
        return f" (read as a local path, since the folder {name.split('/')[0]} exists here)"
    return ""


@contextlib.contextmanager
def fetching_from_hub(repo_id: str, name: str | None = None):
    """Around the first Hub request for `repo_id`, which is no local folder: says at once that it is fetched from the
    Hub as a model id (when the Hub cannot be reached, its retries take up to a minute; nothing to say with
    HF_HUB_OFFLINE), and keeps the retries' log lines off stderr, where a failure is reported in one line."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        given = f"{name} {repo_id}" if name else repo_id
        print(f"{given} is not a local folder: fetching it from the Hub as a model id (Ctrl-C to stop) ...", flush=True)
    with quiet_hub_logs():
        yield


@contextlib.contextmanager
def quiet_hub_logs():
    """Keeps huggingface_hub's log lines (its retries, "No files have been modified ...") off stderr, where a command
    line reports a failure in one `error:` line and says itself what happened."""
    import logging

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def hub_failure(repo_id: str, error: BaseException, name: str | None = None) -> str:
    """Why the Hub id `repo_id`, which is no local folder, could not be loaded, in one line with the fix: the repo is
    gated, missing (or private), or the Hub could not be reached. `name` is the argument that gave it
    ("INPUT_DIR", "--model"), for the message."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    causes, cause = [], error
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        problem = f"the Hub repo {repo_id} is gated and this account has not been granted access"
        fix = "request access on the repo's page, then log in with `hf auth login`"
    elif any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        problem = f"the Hub has no model repo {repo_id} (or it is private and you are not logged in)"
        fix = "check the repo id or the local path, or log in with `hf auth login`"
    elif any(isinstance(cause, LocalEntryNotFoundError) for cause in causes) or any(
        "connect" in str(cause).lower() for cause in causes
    ):
        problem = f"the Hub could not be reached to fetch {repo_id}, and it is not in the local cache"
        fix = "check the network connection (or HF_HUB_OFFLINE), or give a local checkpoint folder"
    else:
        problem = f"the Hub repo {repo_id} could not be loaded ({one_line(error)})"
        fix = "check the repo id, the network and your login, or give a local checkpoint folder"
    given = f"{name} {repo_id}" if name else repo_id
    return f"{given} is not a local folder, and {problem}; nothing was written. Fix: {fix}."


def check_extra_installed(module: str, extra: str, needed_by: str, alternative: str | None = None) -> None:
    """Raises ValueError (one line naming the extra of `pip install "mor-transformers[extra]"`) when the optional
    package `module` that `needed_by` (an option or a script) uses cannot be imported."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"{needed_by} needs the `{module}` package, which is not installed; nothing was written. Fix: pip install "
            f'"mor-transformers[{extra}]" (or pip install {module}){", or " + alternative if alternative else ""}.'
        ) from None


def run_command_line(main, interrupted: str = "nothing was written") -> int:
    """Runs a command line's `main()` for its console script and `python -m ...`: Ctrl-C (and SIGTERM, which `staged_output_dir` turns into
    `Terminated`) ends it with one `error:` line saying `interrupted` (what is left) and the shell's status for the
    signal, 130 for Ctrl-C, instead of a traceback. The output folders are cleaned up before this is reached."""
    import signal
    import sys

    from .output_dir import Terminated

    try:
        return main()
    except KeyboardInterrupt as interruption:
        signum = interruption.signum if isinstance(interruption, Terminated) else signal.SIGINT
        how = "by Ctrl-C" if signum == signal.SIGINT else f"by {signal.Signals(signum).name}"
        print(f"\nerror: interrupted {how}; {interrupted}.", file=sys.stderr)
        return 128 + signum


class Range(NamedTuple):
    """The values an option takes: from `low` (left out when `low_open`) up to `high` (left out when `high_open`;
    None: no upper bound)."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:  # NaN is in no range
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.high is None:
            return f"more than {self.low}" if self.low_open else f"at least {self.low}"
        return f"a value in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)  # a learning rate, a temperature


def check_option_values(args, limits: dict) -> None:
    """Raises ValueError for the first option of `args` (an argparse Namespace) outside its limit in `limits` (option
    destination -> the smallest value, or a `Range`); options left at None, or that `args` lacks, are not checked."""
    for name, limit in limits.items():
        value = getattr(args, name, None)
        limit = limit if isinstance(limit, Range) else Range(limit)
        if value is not None and value not in limit:
            # Trainer reads max_steps=-1 as "train for the epochs instead": the command lines train for the steps given.
            epochs = " (Trainer's -1, train for the epochs instead, is not offered)" if name == "max_steps" else ""
            raise ValueError(f"--{name.replace('_', '-')} {value} is not valid: give {limit.describe()}{epochs}.")


def check_output_file(path, option: str, suffixes: tuple[str, ...] = (), creates_folder: bool = False) -> None:
    """Raises ValueError (one line naming `option` and the fix) unless a file can be written at `path`: checked
    before the work, not after it. `suffixes`: the names it may end with (a picture's format follows its name);
    `creates_folder`: a missing folder is created (else refused)."""
    target = Path(path).expanduser()
    if suffixes and target.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path} does not end in {', '.join(suffixes[:-1])} or {suffixes[-1]}, the formats "
                         f"it is written in; nothing was written. Fix: give for example {option} "
                         f"{target.with_suffix(suffixes[0]) if target.suffix else str(target) + suffixes[0]}.")
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder. Fix: give a file name, e.g. {option} "
                         f"{target / ('results' + (suffixes[0] if suffixes else '.json'))}.")
    if not creates_folder and not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {target.parent} does not exist. Fix: create it first, or give "
                         f"a file in an existing folder.")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path} cannot be written: {folder} is not a folder this user may write in. Fix: "
                         f"give a path in a folder of yours.")


def check_option_needs(needed: str, needed_value, options: dict) -> None:
    """Raises ValueError when one of `options` (option -> value, None when not given) is given without the option
    `needed` (the evaluation text) it only applies to: it would otherwise be ignored silently."""
    if needed_value is not None:
        return
    for option, value in options.items():
        if value is not None:
            raise ValueError(f"{option} {value} needs {needed}: without it nothing is measured, and {option} would be "
                             f"ignored. Fix: pass {needed}, or leave {option} out.")


def check_safetensors_files(folder, outcome: str = "nothing was written") -> None:
    """Raises ValueError naming the file when a weights file of a local checkpoint folder is corrupt or truncated
    (reads the headers, which also give the file's length: cheap, before any loading or upload). `outcome`: what the
    refusal left undone, for the message."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({one_line(error)}): it is corrupt or truncated; "
                f"{outcome}. Fix: download or copy the checkpoint again."
            ) from error


def check_weights_match_config(folder, config, described: str) -> None:
    """Raises ValueError (one line, naming a tensor) when the safetensors weights of the local folder `folder` do not
    fit `config` (a config.json edited or copied from another model): a tensor that the model built from it lacks, has
    in another shape, or needs and the weights do not hold. Reads the weights' headers and builds the model on the
    meta device (no memory), so it is cheap enough to run before loading."""
    import re

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if getattr(config, "quantization_config", None) is not None:
        return  # quantized weights are stored in other shapes; transformers' loading checks them
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # the shards transformers loads (other .safetensors files, e.g. an adapter, are not read)
        import json

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    weights = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as file:
            weights.update({key: list(file.get_slice(key).get_shape()) for key in file.keys()})
    if not weights:
        return  # pickled weights (pytorch_model.bin): no header to read; transformers' loading reports them
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignored = [*(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
               *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]

    def counts(name):
        return not any(re.search(pattern, name) for pattern in ignored)

    reshaped = [name for name in weights if name in expected and weights[name] != expected[name]]
    unexpected = [name for name in weights if name not in expected and counts(name)]
    missing = [name for name in expected if name not in weights and name not in tied and counts(name)]
    if reshaped:
        name = reshaped[0]
        problem = (f"{len(reshaped)} tensor(s) have another shape, e.g. {name}: {weights[name]} in the weights, "
                   f"{expected[name]} for config.json")
    elif unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) of the weights have no place in it (e.g. {unexpected[0]})")
        if missing:
            parts.append(f"{len(missing)} tensor(s) it needs are not in the weights (e.g. {missing[0]})")
        problem = " and ".join(parts)
    else:
        return
    raise ValueError(
        f"{described}: config.json does not match the weights next to it ({problem}); nothing was loaded. Fix: "
        f"restore the config.json saved with these weights (copy or download the folder again)."
    )


def check_model_weights(folder, described: str) -> None:
    """Raises ValueError unless the local model folder `folder` (named `described` in the message) holds weights
    whose headers can be read."""
    if not any((Path(folder) / name).is_file() for name in WEIGHTS_FILES):
        raise ValueError(
            f"{described} has a config.json but no model weights (no {WEIGHTS_FILES[0]}); nothing was written. Fix: "
            f"give the complete folder that save_pretrained wrote (copy or download it again)."
        )
    check_safetensors_files(folder)


def read_mor_config(model: str, name: str):
    """The `MoRConfig` of `model` (a local folder or a Hub id, given as the argument `name`), reading config.json and
    the weights' headers only; ValueError (one line, naming the fix) unless it is a complete MoR checkpoint."""
    from modeling_mor import MoRConfig

    given = f"{name} {model}"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{given} is not a model folder: it has no config.json. Fix: give a folder written by `mor-convert` "
                f"(or by `mor-uptrain`)."
            )
        check_model_weights(path, given)
    elif path.exists():
        raise ValueError(f"{given} is a file, not a model folder. Fix: give the folder that holds config.json and the "
                         f"weights.")
    elif not looks_like_hub_id(model):
        raise ValueError(f"{given} does not exist{read_as_path(model)}. Fix: check the path, or give a Hub id ('name' "
                         f"or 'org/name').")
    try:
        with fetching_from_hub(model, name) if not path.exists() else contextlib.nullcontext():
            config, _ = MoRConfig.get_config_dict(model)
    except (OSError, ValueError) as error:
        if path.exists():
            raise ValueError(f"{given} has a config.json that cannot be read ({one_line(error)}). Fix: copy or "
                             f"download the folder again.") from None
        raise ValueError(hub_failure(model, error, name)) from None
    if config.get("model_type") != "mor":
        raise ValueError(
            f"{given} is a {config.get('model_type')!r} model, not an MoR one. Fix: convert it first with "
            f"`mor-convert {model} MOR_DIR`, then give MOR_DIR."
        )
    mor_config = build_config(config, given)
    if path.is_dir():
        check_weights_match_config(path, mor_config, given)
    return mor_config


def build_config(fields: dict, given: str):
    """The config object (MoRConfig, LlamaConfig, ...) of the config.json `fields` of `given`; ValueError (one line,
    naming `given`) when a value is not valid (an unknown sharing_strategy, a num_recursions the layers do not
    fit)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    import modeling_mor  # noqa: F401  (registers model_type "mor" with the Auto classes)

    try:
        return CONFIG_MAPPING[fields.get("model_type")].from_dict(fields)
    except KeyError:
        raise ValueError(f"{given} has a config.json of an unknown model_type {fields.get('model_type')!r}.") from None
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{given} has a config.json that is not valid ({one_line(error)}). Fix: correct that value, "
                         f"or copy the folder again.") from None

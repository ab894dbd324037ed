"""Upload an MoR model folder to the Hub.

Only what a model repo needs is pushed, whatever else the folder holds: the safetensors weights (and their index),
config.json, generation_config.json, the model code that config.json's `auto_map` names (and the files it imports),
the tokenizer files, the model card (README.md and its figures, mor_card.json), pictures (*.png) and licence files,
all from the top of the folder. Everything else stays local and is listed: Trainer's checkpoint-N/ folders
(optimizer.pt, scheduler.pt, rng_state.pth, a second copy of the weights), training_args.bin, logs, pickled
*.bin weights, your own files.

Example:

    mor-push outputs/stories-mor your-name/stories-mor --private
"""

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import NamedTuple

from .cli_checks import (
    TOKENIZER_FILES,
    HelpFormatter,
    check_safetensors_files,
    one_line,
    quiet_hub_logs,
    run_command_line,
)


# Files of a model repo, at the top of the folder. Pickled files (*.bin, *.pt, *.pth) are never pushed: they run
# code when loaded, and Trainer's are training state (optimizer, scheduler, RNG, arguments), not the model.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
MODEL_REPO_PATTERNS = WEIGHT_PATTERNS + ("config.json", "generation_config.json") + TOKENIZER_FILES + (
    # the card, its figures and pictures, licences
    "README.md",
    "mor_card.json",
    "*.png",
    "LICENSE",
    "LICENSE.*",
    "NOTICE",
    "NOTICE.*",
)
CONFIG_FILES_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json")


class PushError(RuntimeError):
    """The Hub refused or failed the push; nothing was changed locally."""


class InvalidPushError(PushError):
    """The folder is not a model, or the repo id is not valid; raised before the Hub is contacted."""


class HubUnreachableError(PushError):
    """The Hub endpoint could not be reached (network, HF_ENDPOINT, proxy, offline mode)."""


def remote_code_files(folder) -> list[str]:
    """The model code files of `folder` that its `auto_map` entries name, with the files they import relatively
    (what `save_pretrained` copies next to the weights). Code in another repo (`repo--module.Class`) is not here."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    modules = set()
    for config_name in CONFIG_FILES_WITH_AUTO_MAP:
        config_file = folder / config_name
        if not config_file.is_file():
            continue
        try:
            auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map") or {}
        except (ValueError, AttributeError):
            continue
        references = []
        for value in auto_map.values():  # a class reference, or a [slow, fast] pair for tokenizers
            references += value if isinstance(value, (list, tuple)) else [value]
        modules.update(reference.rsplit(".", 1)[0] for reference in references if reference and "--" not in reference)
    files = set()
    for module in modules:
        module_file = folder / f"{module}.py"
        if module_file.is_file():
            files.add(module_file)
            files.update(Path(name) for name in get_relative_import_files(str(module_file)))
    return sorted(path.name for path in files if path.parent == folder and path.is_file())


def model_repo_files(folder) -> tuple[list[str], list[str]]:
    """(pushed, left_out): the files of `folder` a model repo gets, and the entries that stay local (a folder as
    `name/`). Hidden entries (.git, .cache, ...) are neither pushed nor listed."""
    folder = Path(folder)
    code = set(remote_code_files(folder))
    pushed, left_out = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_model_file = entry.name in code or any(fnmatch.fnmatchcase(entry.name, p) for p in MODEL_REPO_PATTERNS)
        if entry.is_file() and is_model_file:
            pushed.append(entry.name)
        else:
            left_out.append(entry.name + "/" if entry.is_dir() else entry.name)
    return pushed, left_out


def check_model_folder(folder) -> list[str]:
    """Raises InvalidPushError unless `folder` holds a model (config.json and safetensors weights that are not
    corrupt or truncated: every other tool refuses such a folder); returns the files to push."""
    folder = Path(folder)
    if not folder.exists():
        raise InvalidPushError(f"{folder} does not exist; nothing was pushed. Pass the folder written by the "
                               f"converter or by uptraining.")
    if not folder.is_dir():
        raise InvalidPushError(f"{folder} is a file, not a model folder; nothing was pushed.")
    if not (folder / "config.json").is_file():
        raise InvalidPushError(f"{folder} is not a model folder (no config.json); nothing was pushed.")
    pushed, _ = model_repo_files(folder)
    if not any(fnmatch.fnmatchcase(name, pattern) for name in pushed for pattern in WEIGHT_PATTERNS):
        raise InvalidPushError(
            f"{folder} has no *.safetensors weights at its top; nothing was pushed. Save the model there with "
            f"save_pretrained (pickled *.bin weights and checkpoint-N/ folders are never pushed)."
        )
    try:
        check_safetensors_files(folder, outcome="nothing was pushed")
    except ValueError as error:
        raise InvalidPushError(str(error)) from None
    return pushed


def check_repo_id(repo_id: str) -> None:
    """Raises InvalidPushError unless `repo_id` is a valid Hub model id (`name` or `namespace/name`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InvalidPushError(f"{repo_id!r} is not a valid repo id ({one_line(error)}); nothing was pushed. "
                               f"Use `your-name/model-name`.") from error


def is_network_error(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, says the endpoint could not be reached (as opposed to an
    answer from the Hub). huggingface_hub's HTTP client (httpx, or requests in older versions) raises its own
    transport errors, hence the look at the class names as well."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, HfHubHTTPError) and getattr(error, "response", None) is not None:
            return False  # the Hub answered (401, 404, 500, ...)
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        for cls in type(error).__mro__:
            package = cls.__module__.split(".")[0]
            if package.startswith(("httpx", "httpcore")) and cls.__name__ in ("TransportError", "ProxyError"):
                return True
            if package in ("requests", "urllib3") and cls.__name__ in ("ConnectionError", "Timeout", "ProxyError",
                                                                      "NewConnectionError", "MaxRetryError"):
                return True
        error = error.__cause__ or error.__context__
    return False


class PushResult(NamedTuple):
    url: str  # the new commit's URL, or the repo's latest commit when nothing changed
    files: list[str]  # the files of the folder that a model repo gets
    unchanged: int  # how many of them the repo already held as they are (all: no commit was made)

    def describe(self, folder, repo_id: str) -> str:
        """The one line that says what the push did."""
        if self.unchanged == len(self.files):
            return (f"Nothing to push: {repo_id} already holds the {len(self.files)} files of {folder} unchanged, so "
                    f"no commit was made ({self.url}).")
        kept = f"; {self.unchanged} of them were already there unchanged" if self.unchanged else ""
        return f"Pushed {len(self.files)} files of {folder} to {self.url}{kept}."


def check_push(folder, repo_id: str) -> list[str]:
    """Everything that can be refused before the Hub is contacted (InvalidPushError, or HubUnreachableError with
    HF_HUB_OFFLINE set); returns the files to push."""
    from huggingface_hub import constants

    pushed = check_model_folder(folder)
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(f"HF_HUB_OFFLINE is set, so the Hub cannot be reached; nothing was pushed and "
                                  f"{folder} is intact. Unset HF_HUB_OFFLINE, then {retry_hint(folder, repo_id)}.")
    return pushed


def retry_hint(folder, repo_id: str) -> str:
    return f"retry with `mor-push {folder} {repo_id}`"


def push_folder(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload MoR model") -> PushResult:
    """Creates `repo_id` (if needed) and uploads the model files of `folder` (see `model_repo_files`) in one commit;
    returns what was pushed (`PushResult`; files the repo already holds unchanged are not uploaded again, and no
    commit is made when all of them are).

    A folder that is not a model raises InvalidPushError before the Hub is contacted; an unreachable Hub raises
    HubUnreachableError, any other failure PushError, each saying why. The local folder is never modified."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    folder = Path(folder)
    pushed = check_push(folder, repo_id)
    retry = retry_hint(folder, repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in pushed]
        with quiet_hub_logs():  # its "No files have been modified ... Skipping": PushResult says it
            commit = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    except OfflineModeIsEnabled as error:
        raise HubUnreachableError(f"{one_line(error)}; nothing was pushed and {folder} is intact. Unset "
                                  f"HF_HUB_OFFLINE, then {retry}.") from error
    except Exception as error:
        if is_network_error(error):
            raise HubUnreachableError(
                f"could not reach the Hub endpoint {constants.ENDPOINT} ({one_line(error)}); nothing was pushed and "
                f"{folder} is intact. Check the network connection (and proxy settings), HF_ENDPOINT and your token "
                f"(--token or the logged-in user), then {retry}."
            ) from error
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(error, (HfHubHTTPError, OSError, ValueError)):
            raise
        raise PushError(
            f"pushing {folder} to {repo_id} failed: {one_line(error)}. The local folder is intact; {retry} once the "
            f"cause is fixed."
        ) from error
    # The files the Hub already held as they are (huggingface_hub leaves them out of the commit).
    unchanged = sum(operation._remote_oid is not None and operation._remote_oid == operation._local_oid
                    for operation in operations)
    return PushResult(getattr(commit, "commit_url", str(commit)), pushed, unchanged)


def build_argument_parser():
    parser = argparse.ArgumentParser(prog="mor-push", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("folder", help="a model folder written by the converter or by uptraining")
    parser.add_argument("repo_id", help="the Hub repo to create or update, e.g. your-name/model")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default="Upload MoR model", help="commit message of the upload")
    return parser


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        pushed = check_push(args.folder, args.repo_id)
        _, left_out = model_repo_files(args.folder)
        print(f"Pushing {len(pushed)} files of {args.folder}: {', '.join(pushed)}")
        if left_out:
            print(f"  left out (not part of a model repo): {', '.join(left_out)}")
        result = push_folder(args.folder, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message)
    except (InvalidPushError, HubUnreachableError) as error:
        # Nothing could be attempted: bad input or no connection, which the user fixes before retrying.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.describe(args.folder, args.repo_id))
    return 0


def command_line() -> int:
    """The `mor-push` console script (and `python -m conversion.push_to_hub`): `main`, with Ctrl-C as one error line
    (a Hub commit is all or nothing: the repo holds either the earlier files or these)."""
    return run_command_line(main, "the Hub repo is as it was unless the commit had been made")


if __name__ == "__main__":
    raise SystemExit(command_line())

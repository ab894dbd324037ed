"""Writing an output folder so that it is either complete or absent.

Everything is written to a hidden staging folder next to the destination and renamed into place at the end. A
failure, Ctrl-C or SIGTERM removes the staging folder; one left behind by a killed process (SIGKILL) is removed by the
next run. An existing destination is refused unless `overwrite=True`, and is only replaced once the new folder is
complete.
"""

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path


class OutputDirExistsError(FileExistsError):
    pass


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Raises before any work starts when the destination exists and may not be replaced."""
    if output_dir.exists() and not overwrite:
        raise OutputDirExistsError(
            f"{output_dir} already exists; nothing was written. Pass --overwrite to replace it, or choose another "
            f"output folder."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirExistsError(f"{output_dir} exists and is not a folder; nothing was written.")


def check_output_dir_is_separate(output_dir, **inputs) -> None:
    """Raises before any work starts when `output_dir` is, contains or lies inside one of the input folders.

    `inputs` maps a name for the message (the option or argument that gave the path) to a local path; Hub ids and
    `None` are ignored, since they cannot be overwritten. Paths are compared once resolved (relative spellings, `..`
    and symlinks all name the same folder), so `--overwrite` can never replace or write inside a source checkpoint.
    """
    output = Path(output_dir).expanduser().resolve()
    for name, path in inputs.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if output == source:
            relation = "is the same path as"
        elif source.is_dir() and source in output.parents:
            relation = "lies inside"
        elif output in source.parents:
            relation = "contains"
        else:
            continue
        raise OutputDirExistsError(
            f"the output folder {output} {relation} {name} ({source}); writing it would destroy that input. "
            f"Nothing was written: choose an output folder outside {source}."
        )


def _remove_stale_staging(output_dir: Path) -> None:
    for stale in output_dir.parent.glob(f".{output_dir.name}.incomplete-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"terminated by signal {signum}")


@contextlib.contextmanager
def staged_output_dir(output_dir, overwrite: bool = False, inputs: dict | None = None):
    """Yields a staging folder; on success it becomes `output_dir`, on any failure it disappears.

    `inputs` (name -> path, as for `check_output_dir_is_separate`) are the folders and files the run reads: an
    `output_dir` that is, contains or lies inside one of them is refused before the staging folder is created.
    """
    check_output_dir_is_separate(output_dir, **(inputs or {}))
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.incomplete-", dir=output_dir.parent))
    staging = staging.rename(staging.parent / f".{output_dir.name}.incomplete-{os.getpid()}")
    # mkdtemp makes the folder private (0700); the output should get the usual permissions of a new folder.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    previous_handler = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        in_main_thread = False
    try:
        yield staging
        if output_dir.exists():
            replaced = output_dir.parent / f".{output_dir.name}.replaced-{os.getpid()}"
            output_dir.rename(replaced)
            staging.rename(output_dir)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)

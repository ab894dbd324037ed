"""Writing an output folder so that it is either complete or absent.

Everything is written to a hidden staging folder next to the destination and renamed into place at the end. A
failure, Ctrl-C or SIGTERM removes the staging folder; one left behind by a killed process (SIGKILL) is removed by the
next run. An existing destination is refused unless `overwrite=True`, and is only replaced once the new folder is
complete.

`overwrite=True` replaces an earlier output of these tools only: every output folder gets a record, `OUTPUT_RECORD`,
of the entries the tool wrote into it, and a folder is replaced only while it holds nothing else (an empty folder
too). A folder without the record (a user's folder, another checkpoint) or with anything added since (notes, a
subfolder) is refused with one line that lists what is there, as is the working directory or a folder that
contains it. The record lists the folder's top-level names rather than marking the folder as a whole, so that a
file added later by hand is never deleted along with the output (what lies inside a subfolder the tool wrote, such
as a checkpoint, is not checked).
"""

import contextlib
import fnmatch
import glob
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path


class OutputDirExistsError(FileExistsError):
    pass


# The record of what a tool wrote into an output folder: hidden, so that it is neither pushed to the Hub nor listed.
OUTPUT_RECORD = ".mor-output.json"
# Trainer's checkpoint folders, which a training run's OUTPUT_DIR gains after it has moved into place.
TRAINER_CHECKPOINTS = "checkpoint-[0-9]*"
# The field of a JSON result that says which tool wrote it (and so, which files next to it --overwrite may replace).
WRITTEN_BY = "written_by"


def record_output(folder, also: tuple[str, ...] = (), exclude=()) -> None:
    """Writes `OUTPUT_RECORD` into `folder`: its entries now but those in `exclude` (what was there before a run that
    continued in the folder, and not written by these tools), and the name patterns `also` it may gain later."""
    folder = Path(folder)
    entries = [glob.escape(name) for name in _entries(folder) if name not in set(exclude)]
    record = {
        "about": "written by the mor-transformers command lines: --overwrite replaces this folder only while it holds "
                 "nothing but these entries",
        "entries": [*entries, *also],
    }
    (folder / OUTPUT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _entries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name != OUTPUT_RECORD)


def foreign_entries(folder) -> list[str]:
    """The entries of `folder` that its `OUTPUT_RECORD` does not list (every entry when it has none)."""
    folder = Path(folder)
    try:
        patterns = json.loads((folder / OUTPUT_RECORD).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        patterns = []
    return [name for name in _entries(folder) if not any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def _listing(folder: Path, names: list[str], limit: int = 8) -> str:
    """`names` (entries of `folder`) for a message: a folder as `name/`, at most `limit` of them."""
    shown = ", ".join(name + ("/" if (folder / name).is_dir() else "") for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(output_dir, overwrite: bool) -> None:
    """Raises before any work starts when the destination exists and may not be replaced: without `overwrite`, or
    when it is the working directory, contains it, or holds anything that is not an earlier output of these tools."""
    output_dir = Path(output_dir).expanduser()
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputDirExistsError(f"{output_dir} exists and is not a folder; nothing was written.")
    if not overwrite:
        raise OutputDirExistsError(
            f"{output_dir} already exists; nothing was written. Pass --overwrite to replace it (an earlier output of "
            f"these tools only), or choose another output folder."
        )
    resolved, working_dir = output_dir.resolve(), Path.cwd().resolve()
    if resolved == working_dir or resolved in working_dir.parents:
        where = "is" if resolved == working_dir else "contains"
        raise OutputDirExistsError(
            f"{output_dir} {where} the working directory, which --overwrite never replaces; nothing was written. Fix: "
            f"give a new folder (for example ./mor-output)."
        )
    foreign = foreign_entries(output_dir)
    if not foreign:
        return
    listing = _listing(output_dir, foreign)
    if (output_dir / OUTPUT_RECORD).is_file():
        problem = f"holds entries these tools did not write: {listing}"
        fix = "move them elsewhere, or choose another output folder"
    else:
        problem = f"is not an earlier output of these tools (it has no {OUTPUT_RECORD}) and holds {listing}"
        fix = "choose another output folder, or delete this one yourself"
    raise OutputDirExistsError(
        f"{output_dir} {problem}; nothing was written. --overwrite only replaces an earlier output of these tools. "
        f"Fix: {fix}."
    )


def check_output_files(paths, record, overwrite: bool) -> None:
    """Raises before any work starts when one of the output files `paths` exists and may not be replaced: without
    `overwrite`, or unless the JSON file `record` (one of them) is an earlier output of these tools (see
    `written_by_us`), which vouches for the others written with it."""
    existing = [str(path) for path in paths if Path(path).exists()]
    if not existing:
        return
    if not overwrite:
        raise OutputDirExistsError(f"{', '.join(existing)} already exist(s); nothing was written. Pass --overwrite to "
                                   f"replace an earlier output of these tools, or give another output prefix.")
    if not written_by_us(record):
        raise OutputDirExistsError(
            f"{', '.join(existing)} exist(s) and {record} is not an earlier output of these tools (no "
            f"\"{WRITTEN_BY}\" field); nothing was written. --overwrite only replaces an earlier output of these "
            f"tools. Fix: give another output prefix, or delete the files yourself."
        )


def written_by_us(path) -> bool:
    try:
        return WRITTEN_BY in json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return False


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


class Terminated(KeyboardInterrupt):
    """SIGTERM while an output folder is staged: unwinds like Ctrl-C, so that the staging folder is removed."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_on_sigterm(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def staged_output_dir(output_dir, overwrite: bool = False, inputs: dict | None = None, grows: tuple[str, ...] = ()):
    """Yields a staging folder; on success it becomes `output_dir` (with its `OUTPUT_RECORD`), on any failure it
    disappears.

    `inputs` (name -> path, as for `check_output_dir_is_separate`) are the folders and files the run reads: an
    `output_dir` that is, contains or lies inside one of them is refused before the staging folder is created.
    `grows`: name patterns of the entries the folder may gain after it has moved into place (a training run's
    checkpoints), which `--overwrite` may replace too. An existing `output_dir` is checked again just before it is
    replaced, so that nothing added to it during the run is lost.
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
        record_output(staging, also=grows)
        check_output_dir(output_dir, overwrite)
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

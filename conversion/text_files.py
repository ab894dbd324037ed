"""Reading the text files the command lines take (training, evaluation and instruction data)."""

from pathlib import Path


class TextFileError(ValueError):
    """A text file that cannot be used, named with the problem and the fix."""


def read_text_file(path, option: str | None = None) -> str:
    """The text of a UTF-8 file. A file that cannot serve as text (missing, a folder, empty, blank, not UTF-8) raises
    TextFileError naming the option that gave it, the file and, for bad bytes, where they are. Cheap, so the command
    lines call it before loading any model."""
    name = f"{option} {path}" if option else str(path)
    file = Path(path)
    if not file.exists():
        raise TextFileError(f"{name} does not exist. Fix: check the path, or give an existing UTF-8 text file.")
    if not file.is_file():
        raise TextFileError(f"{name} is a folder, not a text file. Fix: give the path of a text file.")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TextFileError(
            f"{name} is not UTF-8 text (byte {error.start}, 0x{data[error.start]:02x}, on line {line}: {error.reason}). "
            f"Fix: convert it to UTF-8 (for example `iconv -f latin1 -t utf-8`), or give another file."
        ) from None
    if not text.strip():
        raise TextFileError(f"{name} has no text ({'empty' if not data else 'blank'} file). Fix: give a file with text "
                            f"in it.")
    return text

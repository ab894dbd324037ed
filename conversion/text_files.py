"""Reading the text files the command lines take (training, evaluation and instruction data)."""

import re
from pathlib import Path


class TextFileError(ValueError):
    """A text file that cannot be used, named with the problem and the fix."""


def _likely_encoding(data: bytes) -> str:
    """For the advice of a file that is not UTF-8: "utf-16" when it has a UTF-16 byte-order mark or NUL bytes in
    many places (UTF-16 text of mostly ASCII characters), else "latin1" (any byte decodes; check the result)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or data.count(0) > len(data) // 4:
        return "utf-16"
    return "latin1"


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
        encoding = _likely_encoding(data)
        raise TextFileError(
            f"{name} is not UTF-8 text (byte {error.start}, 0x{data[error.start]:02x}, on line {line}: {error.reason}"
            f"{'; it looks like UTF-16' if encoding == 'utf-16' else ''}). Fix: convert it to UTF-8 (for example "
            f"`iconv -f {encoding} -t utf-8 {path} > converted.txt`), or give another file."
        ) from None
    if not text.strip():
        raise TextFileError(f"{name} has no text ({'empty' if not data else 'blank'} file). Fix: give a file with text "
                            f"in it.")
    return text


# WikiText's word-level tokenization, undone in this order: the "@" joiners inside numbers and words, then the spaces
# it put around punctuation, contractions and brackets. "<unk>" (its rare-word token) is kept.
_WIKITEXT_REPLACEMENTS = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" 's", "'s"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"), (" 'd", "'d"), (" 'm", "'m"), (" n't", "n't"), (" 't", "'t"),
    (" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), (" !", "!"), (" ?", "?"), (" %", "%"),
    ("( ", "("), (" )", ")"), ("[ ", "["), (" ]", "]"), ("$ ", "$"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
]


def detokenize_wikitext(text: str) -> str:
    """WikiText-2/103's word-level text ("a 60 @-@ cm lobster , H. americanus 's") as plain English ("a 60-cm lobster,
    H. americanus's") for a subword tokenizer, the way evaluation harnesses read its raw version; line structure is
    kept, so its blank lines still separate paragraphs."""
    for tokenized, plain in _WIKITEXT_REPLACEMENTS:
        text = text.replace(tokenized, plain)
    # A quotation's inner spaces: '" lobster red "' -> '"lobster red"' (pairs within a line).
    text = re.sub(r'"\s([^"\n]*?)\s"', r'"\1"', text)
    return "\n".join(line.strip(" ") for line in text.split("\n"))

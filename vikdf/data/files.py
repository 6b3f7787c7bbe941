"""Reading the text and JSON files a user hands over (dialogue sets, COCO annotations, JSON lines, a checkpoint's
`config.json`): a byte that is not UTF-8 or JSON that is broken or cut short is a `ValueError` naming the file and
the line and column, never a bare codec or parser error that names neither.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any


def decode_utf8(data: bytes, path: str | os.PathLike, first_line: int = 1) -> str:
    """`data`, read from `path` starting at line `first_line`, as text; a leading byte-order mark (as Windows editors
    write it) is dropped. A byte that is not UTF-8 raises a `ValueError` naming the file, its line and column."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise ValueError(
            f"{os.fspath(path)}: line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8 text "
            f"({error.reason}); save the file as UTF-8."
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file (see `decode_utf8`)."""
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path)


def read_json(path: str | os.PathLike) -> Any:
    """A UTF-8 JSON file, parsed; broken or cut-short JSON raises a `ValueError` naming the file and the line and
    column the parser stopped at (bytes that are not UTF-8: see `decode_utf8`)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        # The parser wanted more than there is: only blanks after the fault, or a string running to the end.
        ends_early = error.msg.startswith("Unterminated string") or not text[error.pos :].strip()
        hint = "the file ends before the JSON does: is it cut short?" if ends_early else "fix it or write it again."
        # The parser's messages end in "at" ("Unterminated string starting at"): here the position comes first.
        fault = error.msg.removesuffix(" at").removesuffix(" starting")
        raise ValueError(
            f"{os.fspath(path)}: line {error.lineno}, column {error.colno}: not valid JSON ({fault}); {hint}"
        ) from None

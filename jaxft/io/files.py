"""Reading the text files jaxft meets (JSON configs, JSONL data, YAML) with one-line errors that name the file, the
line and column, and what to do.

Every reader of jaxft/io and jaxft/data goes through these, so a file that is missing, empty, not UTF-8 or not
JSON is reported the same way everywhere: `FileFormatError("path line L column C: what was wrong; what to do")`.
Lines and columns are 1-based and count characters (what an editor shows), not bytes. A UTF-8 byte-order mark at
the start of a file is accepted (Windows editors write one) and is not counted as a column.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from jaxft.errors import FileFormatError

_BOM = b"\xef\xbb\xbf"


def where(path: str, line: int | None = None, column: int | None = None) -> str:
    """`path`, `path line L` or `path line L column C`: the place an error message starts with."""
    at = str(path)
    if line is not None:
        at += f" line {line}"
        if column is not None:
            at += f" column {column}"
    return at


def read_bytes(path: str, what: str) -> bytes:
    """The bytes of `path`; a missing path, a directory or an unreadable file is a one-line `FileFormatError`.

    what: what the file should be, for the message (e.g. "the model's config.json").
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file (expected {what}); check the path "
                              f"(relative paths start from {os.getcwd()})") from None
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a directory, expected {what} (a file)") from None
    except OSError as e:
        raise FileFormatError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None


def not_utf8(path: str, raw_line: bytes, error: UnicodeDecodeError, line: int) -> FileFormatError:
    """The error for a line that is not UTF-8: the line, the character column of the first bad byte, the byte."""
    column = len(raw_line[: error.start].decode("utf-8", errors="replace")) + 1
    byte = raw_line[error.start: error.start + 1].hex()
    return FileFormatError(f"{where(path, line, column)}: byte 0x{byte} is not UTF-8; save the file as UTF-8 "
                           "(e.g. iconv -f latin1 -t utf-8 in > out)")


def decode_utf8(data: bytes, path: str) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped); a bad byte is reported with its line and
    column."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        raw_line = data[line_start: line_end if line_end >= 0 else len(data)]
        sub = UnicodeDecodeError(e.encoding, raw_line, e.start - line_start, e.end - line_start, e.reason)
        raise not_utf8(path, raw_line, sub, data.count(b"\n", 0, e.start) + 1) from None


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of `path` (see `read_bytes` and `decode_utf8` for the errors)."""
    return decode_utf8(read_bytes(path, what), path)


def not_json(path: str, error: json.JSONDecodeError, line: int | None = None) -> FileFormatError:
    """The error for text that is not JSON. `line`: the file line the parsed text starts on when it is one line of
    a JSONL file (the decoder's own line number is then 1)."""
    at = where(path, error.lineno if line is None else line + error.lineno - 1, error.colno)
    return FileFormatError(f"{at}: not valid JSON ({error.msg}); fix the file there")


def parse_json(text: str, path: str, what: str) -> Any:
    """`json.loads(text)` with the errors of `read_json`."""
    if not text.strip():
        raise FileFormatError(f"{path}: is empty (expected {what}); write the file again or replace it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise not_json(path, e) from None


def read_json(path: str, what: str, expect: type | None = dict) -> Any:
    """Read and parse the JSON file `path`. Missing, empty, not UTF-8, not JSON, or (with `expect`) a document of
    another type (e.g. a list where an object is needed) are one-line `FileFormatError`s naming the file and, where
    there is one, the line and column."""
    value = parse_json(read_text(path, what), path, what)
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise FileFormatError(f"{path}: holds a JSON {type(value).__name__}, expected {kind} ({what})")
    return value


def sha256(path: str) -> str:
    """The hex sha256 of the file at `path`, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

"""Reading raw records from local files and hub datasets.

A `.jsonl` file is read line by line with the `json` module, so that a malformed line is one skipped record with its
1-based line number instead of a failed load (HF `datasets` refuses the whole file on one bad line, and gives no line
numbers); the reason names the column (in characters) where parsing stopped. A `.json` file holding an array of
records is read with the `json` module too (records numbered 1, 2, ...), and one holding a JSON object per line as
JSONL. Every other source (`.parquet`, `.csv`, a directory, a hub name) goes through `datasets.load_dataset`; its
records are numbered 1, 2, ... in file order ("record" numbers, not lines).

A file that cannot be a data file at all is a one-line `FileFormatError` naming the source, the file and, where
there is one, the line and column: empty, not UTF-8 (JSON, JSONL, CSV), not JSON (a `.json` file), unreadable by
`datasets`. A UTF-8 byte-order mark at the start of a file is accepted.

`check_source_paths` runs before anything is read, so a missing file is reported before a large file is parsed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Iterator

from jaxft.data.config import SourceConfig
from jaxft.errors import ConfigError, FileFormatError
from jaxft.io.files import decode_utf8, not_json, not_utf8, read_bytes

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_LOCAL_HINTS = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".tsv")


@dataclasses.dataclass
class RawSource:
    """The records of one source, before any format is applied.

    records: (number, value) pairs in file order; `value` is a dict, or the reason (str) it could not be read.
    columns: the union of the records' keys, in first-seen order (drives `format: auto`).
    unit: "line" when `number` is a 1-based line number (JSONL), "record" when it is a 1-based record index.
    """

    where: str
    path: str
    records: list[tuple[int, Any]]
    columns: list[str]
    unit: str


def _expand(path: str) -> list[str]:
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    return [path] if os.path.exists(path) else []


def _looks_local(path: str) -> bool:
    return (
        path.startswith((".", "/", "~"))
        or path.lower().endswith(_LOCAL_HINTS)
        or any(c in path for c in "*?[")
        or path.count("/") > 1
        or os.sep == "\\" and "\\" in path
    )


def check_source_paths(sources: tuple[SourceConfig, ...], where: str) -> None:
    """Raise ConfigError for a local path that does not exist or an extension no reader handles; touch no data."""
    for i, src in enumerate(sources):
        at = f"{where}[{i}]"
        path = os.path.expanduser(src.path)
        files = _expand(path)
        if not files:
            if _looks_local(src.path):
                raise ConfigError(f"{at}: {src.path}: no such file; check the path (relative paths start from {os.getcwd()})")
            continue  # a hub dataset name; load_dataset reports it if it cannot be fetched
        exts = {os.path.splitext(f)[1].lower() for f in files if os.path.isfile(f)}
        unknown = exts - set(_BUILDERS)
        if unknown:
            raise ConfigError(
                f"{at}: {src.path}: cannot read {', '.join(sorted(unknown))} files; use .jsonl, .json, .parquet or .csv"
            )
        if len(exts) > 1:
            raise ConfigError(f"{at}: {src.path}: matches files of several kinds ({', '.join(sorted(exts))}); give one kind per source")


def _empty(at: str, file: str) -> FileFormatError:
    return FileFormatError(f"{at}: {file}: is empty (no records); fill it or remove it from the config")


def _read_lines(file: str, at: str) -> list[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file as (1-based line number, raw bytes); BOM dropped."""
    data = read_bytes(file, "a JSONL data file")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    if not lines:
        raise _empty(at, file)
    return lines


def _parse_line(file: str, n: int, raw: bytes, at: str) -> Any:
    """One JSONL record: a dict, or the reason (str) it is malformed. A line that is not UTF-8 fails the file."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{at}: {not_utf8(file, raw, e, n)}") from None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    return value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _read_jsonl(files: list[str], limit: int, at: str) -> Iterator[tuple[int, Any]]:
    # Several files under one glob continue the numbering, as if they were concatenated; a malformed line's reason
    # then names its own file and line.
    offset = 0
    count = 0
    for file in files:
        lines = _read_lines(file, at)
        for n, raw in lines:
            if limit and count >= limit:
                return
            count += 1
            value = _parse_line(file, n, raw, at)
            if isinstance(value, str) and len(files) > 1:
                value = f"{os.path.basename(file)} line {n}: {value}"
            yield offset + n, value
        offset += lines[-1][0]


def _read_json_file(file: str, limit: int, at: str) -> tuple[list[tuple[int, Any]], str]:
    """A `.json` data file: an array of records ("record" numbers) or one object per line (JSONL, "line"
    numbers)."""
    text = decode_utf8(read_bytes(file, "a JSON data file"), file)
    if not text.strip():
        raise _empty(at, file)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several documents: JSON Lines under a .json name
            return list(_read_jsonl([file], limit, at)), "line"
        raise FileFormatError(f"{at}: {not_json(file, e)}") from None
    if not isinstance(value, list):
        raise FileFormatError(f"{at}: {file}: holds a JSON {type(value).__name__}; expected an array of records "
                              "or one JSON object per line (JSONL)")
    if not value:
        raise _empty(at, file)
    if limit:
        value = value[:limit]
    return [(i, v if isinstance(v, dict) else f"a JSON {type(v).__name__}, not an object")
            for i, v in enumerate(value, 1)], "record"


def _check_file(file: str, at: str) -> None:
    """Before `datasets` reads a local file: empty, and (CSV) not UTF-8, reported with the line and column."""
    data = read_bytes(file, "a data file")
    if not data.strip():
        raise _empty(at, file)
    if file.lower().endswith(".csv"):
        try:
            decode_utf8(data, file)
        except FileFormatError as e:
            raise FileFormatError(f"{at}: {e}") from None


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _read_datasets(src: SourceConfig, files: list[str], at: str) -> list[dict]:
    with _quiet_datasets() as datasets:
        try:
            if files:
                ext = os.path.splitext(files[0])[1].lower() if os.path.isfile(files[0]) else ""
                if ext:
                    ds = datasets.load_dataset(_BUILDERS[ext], data_files={"train": files}, split="train")
                else:  # a directory: let datasets find its files and splits
                    ds = datasets.load_dataset(files[0], name=src.name, split=src.split)
            else:
                ds = datasets.load_dataset(src.path, name=src.name, split=src.split)
        except Exception as e:  # datasets raises many types; all mean "this source cannot be read"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if files:
                raise FileFormatError(f"{at}: {src.path}: could not load ({type(e).__name__}: {msg[:300]}); check "
                                      "the file, or convert it to JSONL to skip bad records by line") from None
            raise ConfigError(f"{at}: {src.path}: could not load ({type(e).__name__}: {msg[:300]}); check the "
                              "name, split and network") from None
    if src.limit:
        ds = ds.select(range(min(src.limit, len(ds))))
    return ds.to_list()


def read_source(src: SourceConfig, where: str) -> RawSource:
    """Read every record of `src` (up to `src.limit`); `where` names it in messages, e.g. `data.train[0]`."""
    path = os.path.expanduser(src.path)
    files = _expand(path)
    if files and all(f.lower().endswith(".jsonl") for f in files):
        records = list(_read_jsonl(files, src.limit, where))
        unit = "line"
    elif len(files) == 1 and os.path.isfile(files[0]) and files[0].lower().endswith(".json"):
        records, unit = _read_json_file(files[0], src.limit, where)
    else:
        for f in files:
            if os.path.isfile(f):
                _check_file(f, where)
        records = list(enumerate(_read_datasets(src, files, where), 1))
        unit = "record"
    columns: dict[str, None] = {}
    for _, value in records:
        if isinstance(value, dict):
            columns.update(dict.fromkeys(value))
    return RawSource(where=where, path=src.path, records=records, columns=list(columns), unit=unit)

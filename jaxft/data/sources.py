"""Reading raw records from local files and hub datasets.

A `.jsonl` file is read line by line with the `json` module, so that a malformed line is one skipped record with its
1-based line number instead of a failed load (HF `datasets` refuses the whole file on one bad line, and gives no line
numbers). Every other source (`.json`, `.parquet`, `.csv`, a directory, a hub name) goes through
`datasets.load_dataset`; its records are numbered 1, 2, ... in file order ("record" numbers, not lines).

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
from jaxft.schema import ConfigError

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


def _read_jsonl(files: list[str], limit: int) -> Iterator[tuple[int, Any]]:
    # Several files under one glob continue the numbering, as if they were concatenated.
    offset = 0
    count = 0
    for file in files:
        with open(file, encoding="utf-8") as f:
            n = 0
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if limit and count >= limit:
                    return
                count += 1
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    yield offset + n, f"not valid JSON ({e.msg} at column {e.colno})"
                    continue
                yield offset + n, value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        offset += n


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
            hint = "convert it to JSONL to skip bad records by line" if files else "check the name, split and network"
            raise ConfigError(f"{at}: {src.path}: could not load ({type(e).__name__}: {msg[:300]}); {hint}") from None
    if src.limit:
        ds = ds.select(range(min(src.limit, len(ds))))
    return ds.to_list()


def read_source(src: SourceConfig, where: str) -> RawSource:
    """Read every record of `src` (up to `src.limit`); `where` names it in messages, e.g. `data.train[0]`."""
    path = os.path.expanduser(src.path)
    files = _expand(path)
    if files and all(f.lower().endswith(".jsonl") for f in files):
        records = list(_read_jsonl(files, src.limit))
        unit = "line"
    else:
        records = list(enumerate(_read_datasets(src, files, where), 1))
        unit = "record"
    columns: dict[str, None] = {}
    for _, value in records:
        if isinstance(value, dict):
            columns.update(dict.fromkeys(value))
    return RawSource(where=where, path=src.path, records=records, columns=list(columns), unit=unit)

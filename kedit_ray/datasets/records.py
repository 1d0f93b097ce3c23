"""Reading records from JSON, JSON Lines and Parquet, and turning them into validated items.

A file whose first non-blank character is `[` is a JSON array; any other .json / .jsonl file is JSON Lines.
A syntax error inside an array stops the read (nothing after it can be located); a bad JSON line is
one bad record and can be skipped.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..requests import EditRequest, InvalidRecord

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_SPACE = re.compile(r"[ \t\n\r]*")
_MISSING = object()


@dataclass(frozen=True)
class Layout:
    """A record layout: recognised by `keys` in the first record, turned into an item by `convert`."""

    name: str
    keys: tuple[str, ...]
    convert: Callable[[dict, str, int], Any]   # (record, source, index) -> validated item
    fields: dict[str, str]                     # item field -> the file's field, for error messages
    id_field: str = "case_id"

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.keys)})"


def need(record: dict, key: str, source: str, index: int, prefix: str = "") -> Any:
    """record[key]; a missing or null value is an InvalidRecord naming `prefix + key`."""
    value = record.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise InvalidRecord(source, index, prefix + key, "missing required key" if value is _MISSING else "null")
    return value


def optional(record: dict, key: str, default: Any) -> Any:
    value = record.get(key)
    return default if value is None else value


def single(record: dict, key: str) -> list:
    """[record[key]], or [] when the key is absent or null (the flat layouts' one-prompt fields)."""
    value = record.get(key)
    return [] if value is None else [value]


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(index, record) pairs; a malformed JSON line comes as an InvalidRecord in place of the record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from enumerate(_read_parquet(path))
        return
    if suffix not in JSON_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of "
                         f"{', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: line {line}: not valid UTF-8") from None
    start = _SPACE.match(text).end()
    if text.startswith("[", start):
        yield from _json_array(text, start + 1, str(path))
    else:
        yield from _json_lines(text, str(path))


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:   # ValueError: e.g. a column name that is not UTF-8
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e


def _json_array(text: str, pos: int, source: str) -> Iterator[tuple[int, Any]]:
    """The elements of the array whose '[' ends just before `pos`, decoded one at a time."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InvalidRecord(source, index, "(json)", f"malformed JSON at line {e.lineno} column {e.colno}: "
                                                         f"{e.msg}; the rest of the array cannot be read") from None
        yield index, record
        index += 1
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            line = text.count("\n", 0, pos) + 1
            raise InvalidRecord(source, index, "(json)", f"malformed JSON at line {line}: expected ',' or ']' "
                                                         f"after record {index - 1}")


def _json_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            if index == 0 and isinstance(_whole(text), dict):
                raise ValueError(f"{source}: one JSON object spread over several lines, not a list of records; "
                                 "write a JSON array ([{...}, {...}]) or JSON Lines (one object per line)") from None
            yield index, InvalidRecord(source, index, "(json)", f"malformed JSON on line {lineno} "
                                                                f"column {e.colno}: {e.msg}")
        index += 1


def _whole(text: str) -> Any:
    """The whole text as one JSON value, or None when it is not one."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def detect(record: dict, layouts: tuple[Layout, ...], source: str, index: int) -> Layout:
    """The first layout whose keys the record holds; else a ValueError listing the layouts expected."""
    for layout in layouts:
        if all(k in record for k in layout.keys):
            return layout
    raise ValueError(f"{source}: record {index} has keys {sorted(record)}, which match no supported layout; "
                     f"expected one of: {'; '.join(l.describe() for l in layouts)}")


def collect(path: str | Path, layouts: tuple[Layout, ...], limit: int | None = None,
            skip_invalid: bool = False, check: Callable[[Any], None] | None = None) -> tuple[list, list[InvalidRecord]]:
    """Convert every record with the layout of the first one; `check(item)` may refuse an item by raising
    InvalidRecord (its source and index are filled in here). Returns (items, skipped problems)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    source = str(path)
    items: list = []
    problems: list[InvalidRecord] = []
    layout: Layout | None = None
    seen: dict[int, int] = {}
    if limit == 0:
        return items, problems
    for index, record in iter_records(path):
        try:
            if isinstance(record, InvalidRecord):
                raise record
            if not isinstance(record, dict):
                raise InvalidRecord(source, index, "(record)", f"expected a JSON object, got {type(record).__name__}")
            layout = layout or detect(record, layouts, source, index)
            try:
                item = layout.convert(record, source, index)
                if check is not None:
                    check(item)
            except InvalidRecord as e:
                raise InvalidRecord(source, index, layout.fields.get(e.field, e.field), e.reason) from None
            ident = item.case_id if isinstance(item, EditRequest) else item.id
            if ident in seen:
                raise InvalidRecord(source, index, layout.id_field, f"duplicate id {ident} (also record {seen[ident]})")
            seen[ident] = index
        except InvalidRecord as e:
            if not skip_invalid:
                raise
            problems.append(e)
            continue
        items.append(item)
        if len(items) == limit:
            break
    return items, problems

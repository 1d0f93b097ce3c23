"""The Parquet sink of `kedit eval`: rows → `OUT/results/part-<uuid>.parquet`, written atomically.

Every part in a results directory has the same schema (the contract columns, then the extra
columns the runner returns), so `pyarrow.dataset.dataset(OUT + "/results")`, which reads the
schema of one part, sees every column. When a new column appears (or a null-only column gets
its type), the existing parts are rewritten to the widened schema; that happens a few times
per run at most. Temp files start with "." and so are never read as parts. No Ray here.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kedit_ray.eval.summary import CORE
from kedit_ray.io import atomic_write, write_json

CONTRACT = pa.schema(
    [("case_id", pa.int64()), ("method", pa.string()), ("model", pa.string()), ("worker", pa.string())]
    + [(m, pa.float64()) for m in CORE] + [(f"pre_{m}", pa.float64()) for m in CORE]
    + [("edit_seconds", pa.float64()), ("error", pa.string())])
# Optional columns whose type is fixed whatever the first values are.
KNOWN = {"fluency": pa.float64(), "pre_fluency": pa.float64(), "consistency": pa.float64(),
         "checkpoint": pa.int64(), "layer": pa.int64()}
# Options that change how a run is executed, not its results: they may differ when resuming.
RUN_ONLY = frozenset({"limit", "workers", "cpus_per_worker", "gpus_per_worker", "address", "out", "progress",
                      "retry_errors"})


class ConfigMismatch(ValueError):
    """OUT already holds results of a different configuration."""


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}, so that a mismatch names the nested key."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def check_config(out: str | Path, config: dict) -> dict:
    """Refuse to mix configurations in one OUT, then record `config` in OUT/config.json.

    Keys in RUN_ONLY may differ; any other difference (method, model, hyperparameters, ...) is refused.
    """
    config = json.loads(json.dumps(config, default=str))
    path = Path(out) / "config.json"
    if path.exists():
        old, new = _flat(json.loads(path.read_text())), _flat(config)
        diff = sorted(k for k in old.keys() | new.keys()
                      if k.split(".")[0] not in RUN_ONLY and old.get(k) != new.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
            raise ConfigMismatch(f"{out} holds results of another configuration ({detail}); "
                                 "use another --out, or delete that directory to start over")
    write_json(path, config)
    return config


def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def part_files(out: str | Path) -> list[Path]:
    return sorted(results_dir(out).glob("part-*.parquet"))


def _unify(schemas: Iterable[pa.Schema]) -> pa.Schema:
    return pa.unify_schemas(list(schemas), promote_options="permissive")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly the columns of `schema`, in its order; absent columns are null."""
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def rows_to_table(rows: list[dict], schema: pa.Schema = CONTRACT) -> pa.Table:
    """Rows → a table: columns typed by `schema` (or KNOWN) where named there, else inferred."""
    names = list(dict.fromkeys([*schema.names, *(k for row in rows for k in row)]))
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        typ = schema.field(name).type if name in schema.names else KNOWN.get(name)
        if typ is not None and pa.types.is_null(typ):
            typ = KNOWN.get(name)
        array = pa.array(values, type=typ) if typ is not None else pa.array(values)
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_results(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All result rows of `OUT` (an empty contract-schema table when there are none)."""
    files = part_files(out)
    if not files:
        return CONTRACT.empty_table() if columns is None else CONTRACT.empty_table().select(columns)
    schema = _unify(pq.read_schema(f) for f in files)
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet").to_table(columns=columns)


def finished_case_ids(out: str | Path, include_errors: bool = True) -> set[int]:
    """case_ids that have a row in `OUT/results` (only error-free rows unless include_errors)."""
    table = read_results(out, ["case_id", "error"])
    ids, errors = table["case_id"].to_pylist(), table["error"].to_pylist()
    return {i for i, e in zip(ids, errors) if include_errors or e is None}


def drop_error_rows(out: str | Path) -> set[int]:
    """Remove the rows with an error from every part (so their cases can be rerun); returns their case_ids."""
    dropped: set[int] = set()
    for f in part_files(out):
        table = pq.read_table(f)
        bad = table["error"].is_valid()
        if not pc.any(bad).as_py():
            continue
        dropped |= set(table.filter(bad)["case_id"].to_pylist())
        kept = table.filter(pc.invert(bad))
        if len(kept):
            _write(f, kept)
        else:
            f.unlink()
    return dropped


class PartWriter:
    """Buffers rows and writes them as one part when `rows` are buffered or `seconds` have passed."""

    def __init__(self, out: str | Path, rows: int = 100, seconds: float = 30.0):
        self.dir = results_dir(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_seconds = rows, seconds
        self.buffer: list[dict] = []
        self.since = time.monotonic()
        files = part_files(out)
        self.schema = _unify([CONTRACT, *(pq.read_schema(f) for f in files)])
        self.written = 0

    def add(self, row: dict) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append(row)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if len(self.buffer) >= self.max_rows or (self.buffer and time.monotonic() - self.since >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part (widening the older parts' schema first if needed)."""
        if not self.buffer:
            return
        table = rows_to_table(self.buffer, self.schema)
        schema = _unify([self.schema, table.schema])
        if not schema.equals(self.schema):
            for f in self.dir.glob("part-*.parquet"):
                _write(f, conform(pq.read_table(f), schema))
            self.schema = schema
        _write(self.dir / f"part-{uuid.uuid4().hex}.parquet", conform(table, schema))
        self.written += len(self.buffer)
        self.buffer = []

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

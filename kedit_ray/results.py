"""The run directory of `kedit eval` (and `kedit trace`): results as Parquet parts, config.json, quarantine. No Ray.

    OUT/results/part-<uuid>.parquet   rows, written atomically as cases finish (one part per write)
    OUT/config.json                   the run's settings (kedit_ray.spec); results on disk lock them
    OUT/quarantine/                   parts found damaged, moved out of results/ (their cases are then missing,
                                      so a rerun computes exactly those again)

Every part carries page checksums and is read in full, checksums verified, before its rows are trusted: a part
cut short or with bytes overwritten is named on stderr and moved to OUT/quarantine/. When a run ends, `compact`
merges the small parts into a few (each records the parts it replaces, so a compaction cut short is finished by
the next read instead of leaving rows twice).

Every part in a results directory has the same schema (the contract columns, then the extra columns the runner
returns), so `pyarrow.dataset.dataset(OUT + "/results")`, which reads the schema of one part, sees every
column. When a new column appears (or a null-only column gets its type), the existing parts are rewritten to
the widened schema; that happens a few times per run at most. Temp files start with "." and are never read.
"""
from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kedit_ray.eval.summary import CORE
from kedit_ray.io import atomic_write, write_json

CONTRACT = pa.schema(
    [("case_id", pa.int64()), ("method", pa.string()), ("model", pa.string()), ("worker", pa.string())]
    + [(m, pa.float64()) for m in CORE] + [(f"pre_{m}", pa.float64()) for m in CORE]
    + [("edit_seconds", pa.float64()), ("error", pa.string())]
    + [("portability_score", pa.float64()), ("pre_portability_score", pa.float64()),    # null where not measured
       ("perplexity", pa.float64()), ("pre_perplexity", pa.float64()), ("collapsed", pa.bool_())]
    + [(f"{pre}{m}_generated", pa.float64()) for pre in ("", "pre_") for m in ("efficacy", "paraphrase")])
# Optional columns whose type is fixed whatever the first values are.
KNOWN = {"fluency": pa.float64(), "pre_fluency": pa.float64(), "consistency": pa.float64(),
         "checkpoint": pa.int64(), "layer": pa.int64()}
REPLACES = b"kedit.replaces"   # metadata of a compacted part: the names of the parts it holds
COMPACT_ROWS = 50_000          # rows per part after compaction


class ConfigMismatch(ValueError):
    """OUT already holds results of a different configuration."""


def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def part_files(out: str | Path) -> list[Path]:
    return sorted(results_dir(out).glob("part-*.parquet"))


def has_results(out: str | Path) -> bool:
    """Whether OUT/results holds any Parquet file (the only thing that locks a configuration)."""
    return any(results_dir(out).glob("*.parquet"))


def check_writable(out: str | Path) -> Path:
    """Make OUT/results and prove a file can be written and renamed there (before any model loads)."""
    path = results_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / ".probe", lambda tmp: Path(tmp).write_text("ok")).unlink()
    except OSError as e:
        raise PermissionError(f"{path}: cannot write results there ({e.strerror or e})") from None
    return path


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}, so that a mismatch names the nested key."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def check_config(out: str | Path, config: dict, run_only: Iterable[str] = (),
                 read: Callable[[dict, str], object] | None = None) -> dict:
    """Refuse to mix configurations in one OUT, then record `config` in OUT/config.json.

    Only results on disk lock a configuration: a run that failed or wrote nothing leaves OUT free. Keys under a
    `run_only` prefix (how a run is executed: workers, placement) may differ; any other difference is refused.
    `read(config, where)` parses the config found there (a typed spec's from_json), refusing one it cannot; a spec
    it returns is compared as it writes itself (`to_json`), so a field added since that run counts at its default."""
    config = json.loads(json.dumps(config, default=str))
    path = Path(out) / "config.json"
    run_only = tuple(run_only)
    if path.exists() and has_results(out):
        try:
            old = json.loads(path.read_text())
            parsed = read(old, str(path)) if read is not None else None
            if hasattr(parsed, "to_json"):
                old = json.loads(json.dumps(parsed.to_json(), default=str))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ConfigMismatch(f"{path}: not the config of such a run ({e}); use another --out") from None
        old, new = _flat(old), _flat(config)
        diff = sorted(k for k in old.keys() | new.keys()
                      if not any(k == p or k.startswith(p + ".") for p in run_only) and old.get(k) != new.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
            raise ConfigMismatch(f"{out} holds results of another configuration ({detail}); "
                                 "use another --out, or delete that directory to start over")
    write_json(path, config)
    return config


def _unify(schemas: Iterable[pa.Schema]) -> pa.Schema:
    return pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")


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


def write_part(path: Path, table: pa.Table) -> Path:
    """One Parquet file, atomically, with page checksums (so that damage is found when it is read)."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def _read_checked(path: Path) -> pa.Table:
    return pq.read_table(path, page_checksum_verification=True)


def _quarantine(out: Path, part: Path, reason: str) -> None:
    dest_dir = Path(out) / "quarantine"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / part.name
    while dest.exists():
        dest = dest_dir / f"{dest.stem}-{uuid.uuid4().hex[:6]}{dest.suffix}"
    part.replace(dest)
    print(f"[kedit] {part}: damaged results part ({reason}); moved to {dest}; its cases count as not run",
          file=sys.stderr, flush=True)


def scan(out: str | Path) -> list[Path]:
    """The healthy parts of OUT/results. Finishes a compaction cut short (drops the parts a compacted part
    replaces) and moves every damaged part to OUT/quarantine/, naming it on stderr."""
    out = Path(out)
    good, replaced = [], set()
    for f in part_files(out):
        try:
            meta = _read_checked(f).schema.metadata or {}
        except (OSError, pa.ArrowException) as e:
            _quarantine(out, f, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            continue
        good.append(f)
        replaced.update(json.loads(meta.get(REPLACES, b"[]")))
    for name in replaced:
        (results_dir(out) / name).unlink(missing_ok=True)
    return [f for f in good if f.name not in replaced]


def read_results(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All result rows of `OUT` (an empty contract-schema table when there are none); damaged parts are
    quarantined first (see `scan`)."""
    files = scan(out)
    if not files:
        return CONTRACT.empty_table() if columns is None else CONTRACT.empty_table().select(columns)
    import pyarrow.dataset as ds   # here, not at the top: it imports pandas (~35 MB in every worker process)

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
    for f in scan(out):
        table = pq.read_table(f)
        bad = table["error"].is_valid()
        if not pc.any(bad).as_py():
            continue
        dropped |= set(table.filter(bad)["case_id"].to_pylist())
        kept = table.filter(pc.invert(bad))
        if len(kept):
            write_part(f, kept)
        else:
            f.unlink()
    return dropped


def compact(out: str | Path, rows: int = COMPACT_ROWS) -> list[Path]:
    """Merge the parts into ⌈rows in all / `rows`⌉ parts sorted by case_id (nothing to do when there are no more
    parts than that). Each new part names the parts it replaces; they are deleted once all new parts exist."""
    files = scan(out)
    if not files:
        return []
    table = read_results(out)
    n = max(1, math.ceil(table.num_rows / rows))
    if len(files) <= n:
        return files
    keys = [("case_id", "ascending")] + ([("checkpoint", "ascending")] if "checkpoint" in table.column_names else [])
    table = table.sort_by(keys)
    names = json.dumps([f.name for f in files]).encode()
    made = []
    for i in range(n):
        piece = table.slice(i * rows, rows)
        piece = piece.replace_schema_metadata({REPLACES: names})
        made.append(write_part(results_dir(out) / f"part-{uuid.uuid4().hex}.parquet", piece))
    for f in files:
        f.unlink(missing_ok=True)
    return made


class PartWriter:
    """Writes rows as one part each time `rows` are buffered (by default every row: rows reach disk as cases
    finish); `add_many` writes its rows as one part."""

    def __init__(self, out: str | Path, rows: int = 1):
        self.dir = results_dir(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows = rows
        self.buffer: list[dict] = []
        self.schema = _unify([CONTRACT, *(pq.read_schema(f) for f in part_files(out))])
        self.written = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.max_rows:
            self.flush()

    def add_many(self, rows: list[dict]) -> None:
        self.buffer.extend(rows)
        self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part (widening the older parts' schema first if needed)."""
        if not self.buffer:
            return
        table = rows_to_table(self.buffer, self.schema)
        schema = _unify([self.schema, table.schema])
        if not schema.equals(self.schema):
            for f in self.dir.glob("part-*.parquet"):
                write_part(f, conform(pq.read_table(f), schema))
            self.schema = schema
        write_part(self.dir / f"part-{uuid.uuid4().hex}.parquet", conform(table, schema))
        self.written += len(self.buffer)
        self.buffer = []

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

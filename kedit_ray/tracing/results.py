"""Trace results on disk and their averages.

    OUT/results/fact-<id>.parquet   one row per (fact, kind, token, layer): role, IE, P*_restored, P, P*
    OUT/skipped.json                facts the model does not answer correctly, with what it predicts
    OUT/summary.json                averages by kind × role × layer, TE, counts, the layer of peak MLP effect

A fact's part is written at once (atomically), so a rerun skips the facts with a part or a skip entry.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kedit_ray.io import atomic_write, write_json
from kedit_ray.tracing.trace import KINDS, PREFIX, ROLES, FactTrace

SCHEMA = pa.schema([("fact", pa.int64()), ("kind", pa.string()), ("role", pa.string()), ("token", pa.int64()),
                    ("token_text", pa.string()), ("layer", pa.int64()), ("ie", pa.float64()),
                    ("p_restored", pa.float64()), ("p", pa.float64()), ("p_star", pa.float64()),
                    ("answer", pa.string()), ("model", pa.string())])


def fact_table(trace: FactTrace, model: str) -> pa.Table:
    """IE = P*_restored − P* for every (kind, token, layer) of one traced fact."""
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    roles = trace.roles
    for kind, scores in trace.scores.items():
        T, L = scores.shape
        cols["kind"] += [kind] * (T * L)
        cols["role"] += [roles[t] for t in range(T) for _ in range(L)]
        cols["token"] += [t for t in range(T) for _ in range(L)]
        cols["token_text"] += [trace.tokens[t] for t in range(T) for _ in range(L)]
        cols["layer"] += list(range(L)) * T
        cols["p_restored"] += scores.ravel().tolist()
        cols["ie"] += (scores - trace.p_star).ravel().tolist()
    n = len(cols["kind"])
    cols.update(fact=[trace.fact] * n, p=[trace.p] * n, p_star=[trace.p_star] * n, answer=[trace.answer] * n,
                model=[model] * n)
    return pa.table(cols, schema=SCHEMA)


def write_fact(out: str | Path, trace: FactTrace, model: str) -> Path:
    table = fact_table(trace, model)
    return atomic_write(Path(out) / "results" / f"fact-{trace.fact}.parquet", lambda tmp: pq.write_table(table, tmp))


def read_skipped(out: str | Path) -> dict[int, str]:
    path = Path(out) / "skipped.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def write_skipped(out: str | Path, skipped: dict[int, str]) -> None:
    write_json(Path(out) / "skipped.json", {str(k): v for k, v in sorted(skipped.items())})


def finished(out: str | Path) -> set[int]:
    """Facts traced (a part exists) or skipped in an earlier run."""
    parts = (Path(out) / "results").glob("fact-*.parquet")
    return {int(p.stem.removeprefix("fact-")) for p in parts} | set(read_skipped(out))


def read_results(out: str | Path) -> pa.Table:
    import pyarrow.dataset as ds   # here: it imports pandas (see kedit_ray.results.read_results)

    path = Path(out) / "results"
    if not any(path.glob("fact-*.parquet")):
        return SCHEMA.empty_table()
    return ds.dataset(str(path), format="parquet", schema=SCHEMA).to_table()


def averages(table: pa.Table) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Average IE by kind × role × layer: the mean over a fact's tokens of that role, then over facts
    (ROME's averages). Also how many facts have each role."""
    table = table.filter(pc.field("role") != PREFIX)
    per_fact = table.group_by(["fact", "kind", "role", "layer"]).aggregate([("ie", "mean")])
    avg = per_fact.group_by(["kind", "role", "layer"]).aggregate([("ie_mean", "mean")]).to_pylist()
    n_layers = 1 + max((r["layer"] for r in avg), default=-1)
    ie: dict[str, dict[str, list[float]]] = {}
    for r in avg:
        ie.setdefault(r["kind"], {}).setdefault(r["role"], [float("nan")] * n_layers)[r["layer"]] = r["ie_mean_mean"]
    roles = table.group_by(["role"]).aggregate([("fact", "count_distinct")]).to_pylist()
    counts = {r["role"]: r["fact_count_distinct"] for r in roles}
    return _ordered({k: _ordered(v) for k, v in ie.items()}), _ordered(counts)


def _ordered(d: dict) -> dict:
    """Keys in the order of KINDS and ROLES."""
    return {k: d[k] for k in (*KINDS, *ROLES) if k in d}


def summarize(out: str | Path, config: dict, sigma: float, facts: int, errors: dict[int, str]) -> dict:
    """summary.json from everything under OUT (this run and earlier ones)."""
    table = read_results(out)
    ie, role_counts = averages(table)
    per_fact = table.group_by("fact").aggregate([("p", "mean"), ("p_star", "mean")])
    p, p_star = per_fact["p_mean"].to_numpy(), per_fact["p_star_mean"].to_numpy()
    skipped = read_skipped(out)
    mlp_last_subject = ie.get("mlp", {}).get("last_subject")
    summary = {
        **config, "noise_sigma": sigma, "facts": facts, "traced": len(per_fact), "skipped": len(skipped),
        "errors": errors,
        "te_mean": float(np.mean(p - p_star)) if len(p) else None,
        "p_mean": float(np.mean(p)) if len(p) else None,
        "p_star_mean": float(np.mean(p_star)) if len(p) else None,
        "role_counts": role_counts,
        "peak_layer": {k: {r: int(np.nanargmax(v)) for r, v in roles.items()} for k, roles in ie.items()},
        "peak_mlp_layer_last_subject": int(np.nanargmax(mlp_last_subject)) if mlp_last_subject else None,
        "ie": ie,
    }
    write_json(Path(out) / "summary.json", summary)
    return summary

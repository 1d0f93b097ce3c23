"""Aggregate result rows into the summary dict: means of the metrics and Score S (no Ray here).

Rows are those of `OUT/results/` (a pyarrow Table or a list of dicts). Means skip nulls and
rows with an `error`. Score S is the harmonic mean of the aggregate efficacy, paraphrase and
neighbourhood scores (ROME's S); `pre_score` is the same for the unedited model.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
CORE = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
        "neighborhood_score", "neighborhood_magnitude")
METRICS = CORE + tuple(f"pre_{m}" for m in CORE) + ("fluency", "pre_fluency", "consistency")


def harmonic_mean(values: Iterable[float | None]) -> float | None:
    """Harmonic mean; None when any value is missing, 0 when any is 0."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-null, non-NaN values; None when there are none."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(xs) / len(xs) if xs else None


def _columns(rows) -> dict[str, list]:
    if hasattr(rows, "to_pydict"):  # pyarrow Table
        return rows.to_pydict()
    rows = list(rows)
    names = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows] for k in names}


def summarize(rows) -> dict:
    """The summary of result rows: counts, metric means, Score S, seconds per edit."""
    cols = _columns(rows)
    n = len(cols.get("case_id", []))
    errors = cols.get("error") or [None] * n
    ok = [e is None for e in errors]

    def ok_values(name: str) -> list:
        return [v for v, good in zip(cols[name], ok) if good]

    out: dict = {"cases": len(set(cols.get("case_id", []))), "rows": n, "errors": n - sum(ok)}
    for key in ("method", "model"):
        found = sorted({v for v in cols.get(key, []) if v is not None})
        out[key] = found[0] if len(found) == 1 else found
    for name in METRICS:
        if name in cols:
            out[name] = mean(ok_values(name))
    out["score"] = harmonic_mean(out.get(m) for m in SCORES)
    out["pre_score"] = harmonic_mean(out.get(f"pre_{m}") for m in SCORES)
    out["seconds_per_edit"] = mean(ok_values("edit_seconds")) if "edit_seconds" in cols else None
    return out

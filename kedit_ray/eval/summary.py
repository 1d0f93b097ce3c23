"""Aggregate result rows into the summary dict: means of the metrics and Score S (no Ray here).

Rows are those of `OUT/results/` (a pyarrow Table or a list of dicts). Means skip nulls and
rows with an `error`. `cov` says which C the edits used: a stats file, or "identity" (`--no-cov`). Score S is the harmonic mean of the aggregate efficacy, paraphrase and
neighbourhood scores (ROME's S); `pre_score` is the same for the unedited model.

success_rate, equivalence_accuracy and retain_accuracy (the KE paper's figures) are the shares of cases whose
efficacy, paraphrase and neighbourhood scores are 1. portability_score (zsRE cases with a portability question)
is averaged over the cases that have one; None when none has. perplexity and pre_perplexity (--ppl-docs) are
means too, and collapsed_count the number of edits flagged `collapsed` (None when perplexity was not measured).
efficacy_generated and paraphrase_generated (--generate) follow their teacher-forced twins.

Rows with a `checkpoint` (batch and sequential protocols: the number of edits applied when the row was
measured) are also summarised per checkpoint under "checkpoints" (keys are the checkpoint as a string): the
aggregates of the edit rows measured there, ERR and TRR (kedit_ray.eval.lifelong; TRR from the rows with role
"held_out"), and the means of any `ckpt_*` columns (editor figures). The top-level aggregates are then those of
the last checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from kedit_ray.eval.lifelong import err, trr

SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
CORE = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
        "neighborhood_score", "neighborhood_magnitude")
# --generate's figures sit beside the teacher-forced ones they are compared with
SIDE_BY_SIDE = ("efficacy_score", "efficacy_generated", "efficacy_magnitude",
                "paraphrase_score", "paraphrase_generated", "paraphrase_magnitude",
                "neighborhood_score", "neighborhood_magnitude")
METRICS = SIDE_BY_SIDE + tuple(f"pre_{m}" for m in SIDE_BY_SIDE) + (
    "fluency", "pre_fluency", "consistency", "portability_score", "pre_portability_score", "perplexity",
    "pre_perplexity")
# the KE paper's figures (De Cao et al. 2021): the share of cases whose score is perfect (zsRE: every target token
# the argmax; locality: every O^x prediction unchanged)
KE_FIGURES = {"success_rate": "efficacy_score", "equivalence_accuracy": "paraphrase_score",
              "retain_accuracy": "neighborhood_score"}


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


def summarize(rows, dataset: str = "counterfact") -> dict:
    """The summary of result rows: counts, metric means, Score S, seconds per edit (and per checkpoint)."""
    cols = _columns(rows)
    if not any(v is not None for v in cols.get("checkpoint", [])):
        return _aggregate(cols)
    n = len(cols["case_id"])
    table = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    per: dict[str, dict] = {}
    for t in sorted({r["checkpoint"] for r in table if r["checkpoint"] is not None}):
        at = [r for r in table if r["checkpoint"] == t]
        edits = [r for r in at if r.get("role") != "held_out"]
        held = [r for r in at if r.get("role") == "held_out"]
        agg = _aggregate(_columns(edits))
        agg.update(ERR=err(edits), TRR=trr(held, dataset), held_out_cases=len(held))
        for name in sorted({k for r in at for k in r if k.startswith("ckpt_")}):
            agg[name] = mean(r.get(name) for r in at)
        per[str(t)] = agg
    out = dict(per[max(per, key=int)])
    out.update(rows=n, errors=sum(e is not None for e in cols.get("error", [])), checkpoints=per)
    return out


def _aggregate(cols: dict[str, list]) -> dict:
    n = len(cols.get("case_id", []))
    errors = cols.get("error") or [None] * n
    ok = [e is None for e in errors]

    def ok_values(name: str) -> list:
        return [v for v, good in zip(cols[name], ok) if good]

    out: dict = {"cases": len(set(cols.get("case_id", []))), "rows": n, "errors": n - sum(ok)}
    for key in ("method", "model", "cov"):    # cov: which C the edits used ("identity" under --no-cov)
        found = sorted({v for v in cols.get(key, []) if v is not None})
        if key != "cov" or found:
            out[key] = found[0] if len(found) == 1 else found
    for name in METRICS:
        if name in cols:
            out[name] = mean(ok_values(name))
    for name, col in KE_FIGURES.items():
        if col in cols:
            out[name] = mean(None if v is None or math.isnan(v) else float(v == 1) for v in ok_values(col))
    flags = [v for v in ok_values("collapsed") if v is not None] if "collapsed" in cols else []
    out["collapsed_count"] = sum(flags) if flags else None
    out["score"] = harmonic_mean(out.get(m) for m in SCORES)
    out["pre_score"] = harmonic_mean(out.get(f"pre_{m}") for m in SCORES)
    out["seconds_per_edit"] = mean(ok_values("edit_seconds")) if "edit_seconds" in cols else None
    return out

"""Lifelong (sequential) editing metrics, computed per checkpoint from result rows (no model here).

At a checkpoint T (T edits applied one batch after another, none reverted):

    ERR  edit retention rate: the mean efficacy over every edit made so far (rows with role "edit" measured at T;
         efficacy_score is the dataset's reliability figure: o* preferred for CounterFact, token accuracy for zsRE).
    TRR  test retention rate: the accuracy kept on a fixed held-out set of unrelated cases (role "held_out", never
         edited), relative to the unedited model:

             TRR = Σ_i a_i^pre · a_i^T / Σ_i a_i^pre

         with a_i the case's accuracy (its dataset record's `held_out_accuracy`, kedit_ray.datasets.registry: a
         function of a score row and a column prefix). For 0/1 accuracies this is the share of the held-out
         cases the unedited model got right that the edited model still gets right.
         CounterFact: a = 1 − efficacy_score, i.e. the efficacy prompt still prefers the true object o over o*.
         zsRE: a = neighborhood_score, the share of the locality answer's argmax tokens kept.

Editors add figures of their own through `edit.meta["checkpoint"]` (a dict of numbers); the protocols store them
in the checkpoint's rows as `ckpt_<name>` columns and the summary reports them per checkpoint.
"""
from __future__ import annotations

import math

from kedit_ray.datasets.registry import lookup


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def err(edit_rows: list[dict]) -> float | None:
    """ERR: mean efficacy_score over the edits measured at one checkpoint."""
    xs = [r["efficacy_score"] for r in edit_rows if r.get("error") is None and _ok(r.get("efficacy_score"))]
    return sum(xs) / len(xs) if xs else None


def trr(held_out_rows: list[dict], dataset: str = "counterfact") -> float | None:
    """TRR: held-out accuracy kept relative to the unedited model (see the module docstring)."""
    acc = lookup(dataset).held_out_accuracy
    num = den = 0.0
    for r in held_out_rows:
        if r.get("error") is not None:
            continue
        pre, post = acc(r, "pre_"), acc(r, "")
        if _ok(pre) and _ok(post):
            num += pre * post
            den += pre
    return num / den if den else None

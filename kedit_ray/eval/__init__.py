"""Evaluation: per-case scorers by dataset, the protocols (single, batch, sequential), summaries, reports.

A scorer is `scorer(lm, request) -> {metric: float}` on the model as it is now, in the CounterFact column names
(efficacy_score, paraphrase_score, neighborhood_score and their magnitudes). A scorer that needs its own
pre-edit result after the edit (zsRE's locality) takes it as a third argument `pre`; `score` passes it on.
"""
from __future__ import annotations

import inspect

from kedit_ray.eval.counterfact import counterfact_scores
from kedit_ray.eval.zsre import zsre_scores

SCORERS = {"counterfact": counterfact_scores}
SCORERS["zsre"] = zsre_scores


def scorer_name(dataset: str | None) -> str:
    """The scorer of a dataset; "auto", "user" and None score as CounterFact."""
    return dataset if dataset in SCORERS else "counterfact"


def score(dataset: str, lm, request, pre: dict | None = None) -> dict:
    fn = SCORERS[scorer_name(dataset)]
    if pre is not None and "pre" in inspect.signature(fn).parameters:
        return fn(lm, request, pre)
    return fn(lm, request)

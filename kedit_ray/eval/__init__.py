"""Evaluation: per-case scorers by dataset, the protocols (single, batch, sequential), summaries, reports.

A scorer is `scorer(lm, request) -> {metric: float}` on the model as it is now, in the CounterFact column names
(efficacy_score, paraphrase_score, neighborhood_score and their magnitudes). A scorer that needs its own
pre-edit result after the edit (zsRE's locality) takes it as a third argument `pre`; `score` passes it on.
`Scorer` is what a run scores per case: its dataset's figures, plus the generated answers (--generate) and
fluency (--fluency), in every protocol.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from kedit_ray.eval.counterfact import counterfact_scores, fluency
from kedit_ray.eval.generated import generate, generated_scores
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


@dataclass(frozen=True)
class Scorer:
    """A run's per-case figures: the dataset's, the generated answers (`generate`) and fluency (`fluency`)."""

    dataset: str = "counterfact"
    generate: bool = False
    fluency: bool = False

    @classmethod
    def of(cls, spec_or_dataset) -> Scorer:
        """The scorer of an EvalSpec, or of a dataset name (its figures alone)."""
        if isinstance(spec_or_dataset, Scorer):
            return spec_or_dataset
        if spec_or_dataset is None or isinstance(spec_or_dataset, str):
            return cls(scorer_name(spec_or_dataset))
        spec = spec_or_dataset
        return cls(scorer_name(spec.dataset), spec.generate, spec.fluency)

    def __call__(self, lm, request, pre: dict | None = None) -> dict:
        out = score(self.dataset, lm, request, pre)
        if self.generate:
            out.update(generated_scores(lm, request))
        if self.fluency:   # ROME's weighted n-gram entropy of 50-token greedy generations
            out["fluency"] = fluency(generate(lm, [request.text, *request.paraphrase_prompts]))
        return out

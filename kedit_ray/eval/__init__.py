"""Evaluation: scorers by dataset, the protocols (single, batch, sequential), summaries, reports.

A dataset's scorer (in its record, kedit_ray.datasets.registry) is `scorer(lm, cases) -> [{metric: float}]` for
cases (request, its pre-edit scores or None) on the model as it is now, in the CounterFact column names
(efficacy_score, paraphrase_score, neighborhood_score and their magnitudes), all cases in a few forward passes; a
scorer that needs a case's own pre-edit result after the edit (zsRE's locality) reads it from `pre`. `Scorer` is
what a run scores: its dataset's figures, plus the generated answers (--generate) and fluency (--fluency), in every
protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

from kedit_ray.datasets.registry import lookup
from kedit_ray.eval.counterfact import fluency
from kedit_ray.eval.generated import generate, generated_scores
from kedit_ray.requests import EditRequest


def score(dataset: str, lm, request: EditRequest, pre: dict | None = None) -> dict:
    """The dataset's figures for one case."""
    return lookup(dataset).scorer(lm, [(request, pre)])[0]


@dataclass(frozen=True)
class Scorer:
    """A run's per-case figures: the dataset's, the generated answers (`generate`) and fluency (`fluency`)."""

    dataset: str = "counterfact"   # a registered dataset's name
    generate: bool = False
    fluency: bool = False

    def __post_init__(self):
        lookup(self.dataset)   # an unknown name fails here, before any case

    @classmethod
    def of(cls, spec_or_dataset) -> Scorer:
        """The scorer of an EvalSpec, or of a dataset name (its figures alone)."""
        if isinstance(spec_or_dataset, Scorer):
            return spec_or_dataset
        if isinstance(spec_or_dataset, str):
            return cls(spec_or_dataset)
        spec = spec_or_dataset
        return cls(spec.dataset, spec.generate, spec.fluency)

    def __call__(self, lm, request: EditRequest, pre: dict | None = None) -> dict:
        return self.many(lm, [(request, pre)])[0]

    def many(self, lm, cases: list[tuple[EditRequest, dict | None]]) -> list[dict]:
        """The figures of each (request, its pre-edit scores or None): the dataset's in a few passes for all cases,
        the generated answers and fluency case by case."""
        outs = lookup(self.dataset).scorer(lm, cases)
        for (request, _), out in zip(cases, outs):
            if self.generate:
                out.update(generated_scores(lm, request))
            if self.fluency:   # ROME's weighted n-gram entropy of 50-token greedy generations
                out["fluency"] = fluency(generate(lm, [request.text, *request.paraphrase_prompts]))
        return outs

"""The datasets: each one record (`Dataset`) of its layouts, its scorer, its held-out accuracy and its title.

The CLI's --dataset choices, the loaders ("auto" tries every registered layout, in registration order), the scorers,
the lifelong TRR and the report read DATASETS; `register` adds a dataset (known to the process that registers it,
so to Ray workers only if they register it too: --workers 1 runs in this process). Nothing here imports the models:
a built-in scorer is imported at its first call.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..requests import EditRequest
from .counterfact import FLAT, ORIGINAL
from .records import Layout
from .user import USER
from .zsre import ZSRE

# (lm, [(request, its pre-edit scores or None)]) -> one {metric: float} per case (see kedit_ray.eval)
BatchScorer = Callable[[Any, list[tuple[EditRequest, dict | None]]], list[dict]]


@dataclass(frozen=True)
class Dataset:
    """A dataset: read with `layouts`, scored by `scorer`, its held-out accuracy for TRR (kedit_ray.eval.lifelong)
    a function of a score row and a column prefix ("pre_" or ""), `title` in reports."""

    name: str
    title: str
    layouts: tuple[Layout, ...]
    scorer: BatchScorer
    held_out_accuracy: Callable[[dict, str], float | None]


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add `dataset` (its name new, not "auto")."""
    if dataset.name in DATASETS or dataset.name == "auto":
        raise ValueError(f"dataset {dataset.name!r} is already registered (or is 'auto')")
    DATASETS[dataset.name] = dataset
    return dataset


def lookup(name: str) -> Dataset:
    """The dataset `name`; a ValueError naming the known ones for any other name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def layouts() -> tuple[Layout, ...]:
    """Every registered layout, in the order "auto" tries them."""
    return tuple(layout for dataset in DATASETS.values() for layout in dataset.layouts)


def _lazy(target: str) -> BatchScorer:
    """The scorer "module:function", imported at its first call."""
    module, name = target.split(":")

    def score(lm, cases: list[tuple[EditRequest, dict | None]]) -> list[dict]:
        return getattr(importlib.import_module(module), name)(lm, cases)
    return score


def _true_object_kept(row: dict, pre: str) -> float | None:
    """1 − efficacy_score: the efficacy prompt still prefers the true object o over o*."""
    value = row.get(pre + "efficacy_score")
    return None if value is None else 1.0 - value


def _locality_kept(row: dict, pre: str) -> float | None:
    """neighborhood_score: the locality answer's argmaxes kept."""
    return row.get(pre + "neighborhood_score")


# order matters for "auto": flat CounterFact's keys include the user layout's
register(Dataset("counterfact", "CounterFact", (ORIGINAL, FLAT), _lazy("kedit_ray.eval.counterfact:counterfact_many"),
                 _true_object_kept))
register(Dataset("zsre", "zsRE", (ZSRE,), _lazy("kedit_ray.eval.zsre:zsre_many"), _locality_kept))
# user requests (EditRequest's own fields) are scored as CounterFact, their held-out accuracy CounterFact's too
register(Dataset("user", "user requests", (USER,), DATASETS["counterfact"].scorer, _true_object_kept))

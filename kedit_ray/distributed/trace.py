"""Causal tracing on Ray: TraceWorker actors each load the model once and trace the facts handed to them.

One fact in flight per worker; a worker keeps nothing between facts, so Ray may restart it (and retry
its fact) at any time. The driver (kedit_ray.tracing.command) writes what comes back.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import ray
import torch

from kedit_ray.datasets import KnownFact
from kedit_ray.distributed.pool import ActorPool
from kedit_ray.models import load
from kedit_ray.tracing.trace import FactTrace, TraceParams, noise_std, trace_known


@ray.remote
class TraceWorker:
    def __init__(self, model: str, params: TraceParams, templates: dict[str, str] | None):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.lm = load(model, device_map="auto" if torch.cuda.is_available() else None, templates=templates)
        self.params = params

    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def noise_std(self, texts: list[str]) -> float:
        return noise_std(self.lm, texts)

    def trace(self, fact: KnownFact, sigma: float) -> FactTrace:
        return trace_known(self.lm, fact, sigma, self.params)


class TracePool(ActorPool):
    """`workers` TraceWorkers for the model `model` (a name every node can load); see ActorPool for how Ray
    is found."""

    def __init__(self, model: str, params: TraceParams, workers: int, address: str | None = None,
                 cpus_per_worker: float = 1, templates: dict[str, str] | None = None):
        super().__init__(TraceWorker, (model, params, templates), workers, address, cpus_per_worker, "trace")
        try:
            prints = set(ray.get([a.fingerprint.remote() for a in self.actors]))
            if len(prints) > 1:
                raise ValueError(f"workers loading {model!r} got different weights (fingerprints {sorted(prints)})")
        except BaseException:
            self.close()
            raise

    def noise_std(self, texts: list[str]) -> float:
        return ray.get(self.actors[0].noise_std.remote(texts))

    def traces(self, facts: Iterable[KnownFact], sigma: float) -> Iterator[FactTrace]:
        """Traces in the order they finish."""
        return self.map(facts, lambda actor, fact: actor.trace.remote(fact, sigma))

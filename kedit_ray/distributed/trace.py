"""Causal tracing over the pool: TraceWorkers each load the model once and trace the facts handed to them.

One fact in flight per worker; a worker keeps nothing between facts, so a fact whose worker died is traced
again by another (the pool's fault policy). The driver (kedit_ray.tracing.command) writes what comes back.
"""
from __future__ import annotations

from kedit_ray.datasets import KnownFact
from kedit_ray.distributed.worker import ModelWorker
from kedit_ray.spec import ModelSpec
from kedit_ray.tracing.trace import FactTrace, TraceParams, noise_std, trace_known


class TraceWorker(ModelWorker):
    def __init__(self, model: ModelSpec, params: TraceParams, index: int, cpus: float, gpus: list | None = None):
        super().__init__(model, index, cpus, gpus)
        self.params = params

    def noise_std(self, texts: list[str]) -> float:
        return noise_std(self.lm, texts)

    def trace(self, fact: KnownFact, sigma: float) -> FactTrace:
        return trace_known(self.lm, fact, sigma, self.params)

"""Causal tracing on Ray: TraceWorker actors each load the model once and trace the facts handed to them.

One fact in flight per worker; a worker keeps nothing between facts, so Ray may restart it (and retry
its fact) at any time. The driver (kedit_ray.tracing.command) writes what comes back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import ray
import torch
from ray.exceptions import RayActorError

from kedit_ray.datasets import KnownFact
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


class TracePool:
    """`workers` TraceWorkers for the model `model` (a name every node can load). Uses the Ray already
    initialised, else joins `address` (or $RAY_ADDRESS), else starts a local one on 127.0.0.1; shuts down
    only what it started."""

    def __init__(self, model: str, params: TraceParams, workers: int, address: str | None = None,
                 cpus_per_worker: float = 1, templates: dict[str, str] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.started = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")
        if self.started and address:
            ray.init(address=address, logging_level=logging.WARNING)
        elif self.started:
            ray.init(address="local", num_cpus=max(1, int(workers * cpus_per_worker)), include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        options = dict(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        self.actors = [TraceWorker.options(**options).remote(model, params, templates) for _ in range(workers)]
        try:
            prints = set(ray.get([a.fingerprint.remote() for a in self.actors]))
            if len(prints) > 1:
                raise ValueError(f"workers loading {model!r} got different weights (fingerprints {sorted(prints)})")
        except BaseException:
            self.close()
            raise

    def noise_std(self, texts: list[str]) -> float:
        return ray.get(self.actors[0].noise_std.remote(texts))

    def map(self, facts: Iterable[KnownFact], sigma: float) -> Iterator[FactTrace]:
        """Traces in the order they finish."""
        todo, idle, inflight = iter(facts), list(self.actors), {}
        while True:
            while idle and (fact := next(todo, None)) is not None:
                actor = idle.pop()
                inflight[actor.trace.remote(fact, sigma)] = actor
            if not inflight:
                return
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            idle.append(inflight.pop(ref))
            try:
                yield ray.get(ref)
            except RayActorError as e:
                raise RuntimeError("a trace worker died for good; the facts traced so far are saved, "
                                   "rerun the same command to resume") from e

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started:
            ray.shutdown()

    def __enter__(self) -> TracePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

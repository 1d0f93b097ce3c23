"""Layer statistics on Ray: StatsWorker actors each load the model once and sum the shards handed to them.

The driver (kedit_ray.stats.compute) adds the partial sums and checkpoints them; a worker keeps nothing
between shards, so Ray may restart it (and retry its shard) at any time. One shard in flight per worker.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from kedit_ray.models import LM, load
from kedit_ray.stats.accumulate import Partial, accumulate
from kedit_ray.stats.cache import ModelInfo


@ray.remote
class StatsWorker:
    def __init__(self, model: str, templates: dict[str, str] | None, dtype: str):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.lm = load(model, device_map="auto" if torch.cuda.is_available() else None,
                       dtype=getattr(torch, dtype), templates=templates)
        self.model_info = ModelInfo.of(self.lm)

    def info(self) -> ModelInfo:
        return self.model_info

    def shard(self, shard: int, docs: list[str], layers: list[int], module: str, max_len: int,
              batch_tokens: int) -> tuple[int, dict[int, np.ndarray], int, int]:
        part = accumulate(self.lm, layers, module, docs, max_len, batch_tokens)
        return shard, {layer: s.numpy() for layer, s in part.sums.items()}, part.count, part.docs


class WorkerPool:
    """`workers` StatsWorkers for a model given by name (or a loaded LM, whose name the workers load and whose
    fingerprint they must match). Uses the Ray already initialised, else joins `address` ("auto", host:port,
    or $RAY_ADDRESS), else starts a local one on 127.0.0.1; shuts down only what it started."""

    def __init__(self, lm: LM | str, workers: int, address: str | None = None, cpus_per_worker: float = 1):
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.started = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")
        if self.started and address:
            ray.init(address=address, logging_level=logging.WARNING)
        elif self.started:
            ray.init(address="local", num_cpus=max(1, int(workers * cpus_per_worker)), include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        name = lm if isinstance(lm, str) else lm.name
        templates = None if isinstance(lm, str) else dict(lm.arch.__dict__)
        dtype = "float32" if isinstance(lm, str) else str(lm.model.dtype).removeprefix("torch.")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        options = dict(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        self.actors = [StatsWorker.options(**options).remote(name, templates, dtype) for _ in range(workers)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
            prints = {i.fingerprint for i in infos} | ({lm.fingerprint} if not isinstance(lm, str) else set())
            if len(prints) > 1:
                raise ValueError(f"workers loading {name!r} got fingerprints {sorted(prints)}: they must all load the "
                                 "same weights as the driver (workers load the model by name)")
        except BaseException:
            self.close()
            raise
        self.info = infos[0]

    def run(self, todo: Iterator[tuple[int, list[str]]], layers: list[int], module: str, max_len: int,
            batch_tokens: int) -> Iterator[tuple[int, Partial]]:
        """(shard, partial sums) in the order they finish."""
        idle, inflight = list(self.actors), {}
        while True:
            while idle and (item := next(todo, None)) is not None:
                actor = idle.pop()
                inflight[actor.shard.remote(*item, layers, module, max_len, batch_tokens)] = actor
            if not inflight:
                return
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            idle.append(inflight.pop(ref))
            try:
                shard, sums, count, docs = ray.get(ref)
            except RayActorError as e:
                raise RuntimeError("a stats worker died for good; the shards summed so far are saved, "
                                   "rerun the same command to resume") from e
            yield shard, Partial({layer: torch.from_numpy(s.copy()) for layer, s in sums.items()}, count, docs)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

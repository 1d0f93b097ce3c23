"""Layer statistics on Ray: StatsWorker actors each load the model once and sum the shards handed to them.

The driver (kedit_ray.stats.compute) adds the partial sums and checkpoints them; a worker keeps nothing
between shards, so Ray may restart it (and retry its shard) at any time. One shard in flight per worker.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray
import torch

from kedit_ray.distributed.pool import ActorPool
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


class WorkerPool(ActorPool):
    """`workers` StatsWorkers for a model given by name (or a loaded LM, whose name the workers load and whose
    fingerprint they must match); see ActorPool for how Ray is found."""

    def __init__(self, lm: LM | str, workers: int, address: str | None = None, cpus_per_worker: float = 1):
        name = lm if isinstance(lm, str) else lm.name
        templates = None if isinstance(lm, str) else dict(lm.arch.__dict__)
        dtype = "float32" if isinstance(lm, str) else str(lm.model.dtype).removeprefix("torch.")
        super().__init__(StatsWorker, (name, templates, dtype), workers, address, cpus_per_worker, "stats")
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
        def submit(actor, item):
            return actor.shard.remote(*item, layers, module, max_len, batch_tokens)

        for shard, sums, count, docs in self.map(todo, submit):
            yield shard, Partial({layer: torch.from_numpy(s.copy()) for layer, s in sums.items()}, count, docs)

"""A pool of model-holding actors: join or start Ray, one task in flight per actor, results as they finish."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator

import ray
from ray.exceptions import RayActorError


class ActorPool:
    """`workers` actors of `actor_cls(*args)`. Uses the Ray already initialised, else joins `address` (or
    $RAY_ADDRESS), else starts a local one on 127.0.0.1; `close` shuts down only what it started."""

    def __init__(self, actor_cls, args: tuple, workers: int, address: str | None, cpus_per_worker: float, what: str):
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.what = what
        self.started = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")
        if self.started and address:
            ray.init(address=address, logging_level=logging.WARNING)
        elif self.started:
            ray.init(address="local", num_cpus=max(1, int(workers * cpus_per_worker)), include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        options = dict(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        self.actors = [actor_cls.options(**options).remote(*args) for _ in range(workers)]

    def map(self, items: Iterable, submit: Callable) -> Iterator:
        """`ray.get(submit(actor, item))` for every item, in the order they finish."""
        todo, idle, inflight = iter(items), list(self.actors), {}
        while True:
            while idle and (item := next(todo, None)) is not None:
                actor = idle.pop()
                inflight[submit(actor, item)] = actor
            if not inflight:
                return
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            idle.append(inflight.pop(ref))
            try:
                yield ray.get(ref)
            except RayActorError as e:
                raise RuntimeError(f"a {self.what} worker died for good; the work finished so far is saved, "
                                   "rerun the same command to resume") from e

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

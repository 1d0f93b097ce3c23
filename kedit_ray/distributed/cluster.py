"""The one place that starts or joins Ray, and checks the cluster can hold the workers asked for.

`connect(resources)`: a Ray already initialised in this process is used as it is; else --address, else
$RAY_ADDRESS is joined; else a local Ray starts on 127.0.0.1 with CPUs for every worker (fractional CPUs
rounded up in total, so 3 workers × 0.5 CPU get 2). Only a Ray started here is shut down here.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import ray

from kedit_ray.spec import Resources, usable_cores

def units(x: float) -> int:
    """A resource amount in Ray's units: 1e-4, a request's fraction truncated (2/3 CPU is 0.6666)."""
    return math.floor(round(x * 10_000, 6))


def fits(nodes: list[dict[str, float]], workers: int, cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs the nodes (their total resources) can hold at once
    (each worker on one node), capped at `workers`."""
    room = 0
    for node in nodes:
        per = [units(node.get(name, 0.0)) // units(need) for name, need in (("CPU", cpus), ("GPU", gpus))
               if need > 0]
        room += min(per) if per else workers
    return min(room, workers)


def check_capacity(workers: int, cpus: float, gpus: float) -> None:
    """Refuse, naming the numbers, a request the live nodes can never hold."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if fits(nodes, workers, cpus, gpus) >= workers:
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
    raise ValueError(f"{workers} workers × {cpus:g} CPUs × {gpus:g} GPUs do not fit on this Ray cluster "
                     f"(nodes: {have}; room for {fits(nodes, workers, cpus, gpus)} such workers); "
                     "lower --workers, --cpus-per-worker or --gpus-per-worker")


@contextlib.contextmanager
def connect(resources: Resources) -> Iterator[None]:
    """Ray for `resources`, checked to hold its workers before any actor is made."""
    cpus, gpus = resources.cpus(), resources.gpus_per_worker
    started = not ray.is_initialized()
    if started and resources.cluster:
        ray.init(address=resources.cluster, logging_level=logging.WARNING)
    elif started:
        ray.init(address="local", num_cpus=max(usable_cores(), math.ceil(units(resources.workers * cpus) / 10_000)),
                 include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        check_capacity(resources.workers, cpus, gpus)
        yield
    finally:
        if started:
            ray.shutdown()

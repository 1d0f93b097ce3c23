"""Layer statistics on Ray: the pool's workers sum the corpus shards handed to them (ModelWorker.stats_shard).

The driver (kedit_ray.stats.compute) adds the partial sums and checkpoints them after every shard; a worker keeps
nothing between shards, so a shard whose worker died is summed again by another (the pool's fault policy).
Any model-holding pool sums shards: `kedit stats` opens one of plain workers, an eval driver uses its own.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kedit_ray.distributed.pool import Lost, PoolError, open_pool
from kedit_ray.distributed.worker import ModelWorker
from kedit_ray.models import LM
from kedit_ray.spec import ModelSpec, Resources
from kedit_ray.stats.accumulate import Partial


@contextlib.contextmanager
def stats_pool(lm: LM | str, resources: Resources, load_kw: dict | None = None):
    """Workers holding the model `lm`: a name (loaded with `load_kw`'s device_map and templates), or a loaded LM
    whose name they load and whose fingerprint they must match."""
    if isinstance(lm, str):
        spec, expected = ModelSpec.from_kw(lm, **(load_kw or {})), None
    else:
        spec = ModelSpec(lm.name, dict(lm.arch.__dict__), str(lm.model.dtype).removeprefix("torch."))
        expected = lm.fingerprint
    with open_pool(ModelWorker, (spec,), resources, expected=expected) as pool:
        yield pool


def sum_shards(pool, todo: Iterator[tuple[int, list[str]]], layers: list[int], module: str, max_len: int,
               batch_tokens: int) -> Iterator[tuple[int, Partial]]:
    """(shard, its partial sums) in the order they finish."""
    for (shard, _), result in pool.stream(todo, "stats_shard", layers, module, max_len, batch_tokens):
        if isinstance(result, Lost):
            raise PoolError(f"stats shard {shard} {result.message}; the shards summed so far are saved, rerun to "
                               "resume")
        _, sums, count, docs = result
        yield shard, Partial({layer: torch.from_numpy(s.copy()) for layer, s in sums.items()}, count, docs)

"""One read-only copy of the weights per node, mapped by every CPU worker there (Ray's shared-memory object store).

    store = WeightStore.options(num_cpus=0).remote()       # the pool's (pool.py), one per pool
    worker_cls = sharing(ModelWorker)                      # workers built with store=store load through it

A worker whose model goes on the CPU whole (no device map, no max_memory) asks the store for its node's copy. The
first ask on a node starts a task there that loads the model once, as `load` does, and returns its parameters and
buffers as numpy arrays: Ray keeps them in that node's object store, and `ray.get` in each worker there gives
read-only views of the same shared pages (no copy). The worker builds its model with empty weights, takes those
views as its parameters and marks them SHARED: kedit_ray.models.weights.set_param gives a shared parameter a
private copy before its first write, so a worker keeps only the weights its edits change, and an edit never reaches
another worker. The bytes are the load's own: fingerprints, deltas and scores are those of a private load.
GPU workers and offloaded models load as before.

A load that maps the checkpoint itself (safetensors of the same dtype: torch maps the file copy-on-write) shares
its pages already, through the page cache, with every process of the node; the store's copy would save nothing
there (and, unlike the page cache, cannot be reclaimed), so the task then returns None and the workers load as
before. The store's copy pays where a load makes the weights anew in each process: a dtype other than the
checkpoint's (--dtype bfloat16 of a float32 checkpoint, a bfloat16 hub checkpoint in float32).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kedit_ray.spec import ModelSpec


def file_mapped(module) -> bool:
    """Whether every parameter of `module` lies in a file this process maps (a checkpoint, mapped copy-on-write):
    the node's page cache holds those pages once for all its processes. False where /proc/self/maps is not."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            spans.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in module.parameters())


def _arrays(model: ModelSpec) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
    """(dtype, values) of every parameter (a tied one once) and buffer of `model` loaded on the CPU; a dtype numpy
    lacks (bfloat16) travels as its bits (int16). None when the load maps the checkpoint itself (`file_mapped`)."""
    import torch

    lm = model.load(None)
    if file_mapped(lm.model):
        return None
    named = {**dict(lm.model.named_parameters()), **dict(lm.model.named_buffers())}
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in named.items()}
    return dtypes, {n: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach().contiguous().numpy()
                    for n, t in named.items()}


class WeightStore:
    """A Ray actor: the object-store copy of the weights of each node, made there on the first ask (a task that
    leaves with its process, its arrays owned here as long as the pool keeps this actor)."""

    def __init__(self):
        self.refs: dict[tuple[str, str], ray.ObjectRef] = {}

    def weights(self, model: ModelSpec, node: str) -> list:
        """[the ref of `_arrays(model)` on `node`] (in a list, so that Ray hands the ref over as it is)."""
        key = (node, json.dumps(asdict(model), sort_keys=True, default=str))
        if key not in self.refs:
            load = ray.remote(num_cpus=0, max_calls=1)(_arrays)   # it runs while the asking worker waits
            where = NodeAffinitySchedulingStrategy(node, soft=False)
            self.refs[key] = load.options(scheduling_strategy=where).remote(model)
        return [self.refs[key]]


def tensors(dtypes: dict[str, str], arrays: dict[str, np.ndarray]) -> dict:
    """`_arrays`' arrays as tensors of their dtypes, on the same memory: read-only, which torch does not enforce
    (set_param copies a SHARED parameter before it writes)."""
    import torch

    with warnings.catch_warnings():   # read-only on purpose: see above
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {n: torch.from_numpy(a).view(getattr(torch, dtypes[n])) for n, a in arrays.items()}


def load_shared(model: ModelSpec, store):
    """The LM of `model` on the CPU, its parameters the node's shared read-only copy from `store` (marked SHARED),
    its buffers its own; None when the node's load maps the checkpoint itself (load it as before)."""
    from kedit_ray.models import load
    from kedit_ray.models.weights import SHARED

    [ref] = ray.get(store.weights.remote(model, ray.get_runtime_context().get_node_id()))
    shared = ray.get(ref)
    if shared is None:
        return None
    lm = load(model.name, dtype=model.dtype, templates=model.templates, weights=tensors(*shared))
    for p in lm.model.parameters():
        setattr(p, SHARED, True)
    return lm


def sharing(worker_cls: type) -> type:
    """`worker_cls` taking one more argument, `store` (a WeightStore): a model it loads whole on the CPU maps the
    node's shared copy where there is one (`load_shared`); any other (GPUs, a device map, max_memory) loads as
    before."""

    class Shared(worker_cls):
        def __init__(self, *args, store, **kw):
            self.store = store
            super().__init__(*args, **kw)

        def load_model(self, model: ModelSpec, device_map: str | dict | None):
            shared = load_shared(model, self.store) if device_map is None and model.max_memory is None else None
            return shared if shared is not None else super().load_model(model, device_map)

    Shared.__name__ = Shared.__qualname__ = worker_cls.__name__
    return Shared

"""ModelWorker: the one base of every model-holding worker (eval, batch, stats, trace).

A worker loads its model once, takes as many torch threads as the CPUs it was given, and puts the model where
`placement` says: on the GPUs it was assigned (the user's --device-map, else all of them), otherwise on the CPU.
It reports a name and the model's fingerprint (the pool refuses workers whose fingerprints differ). It keeps no
result: what the driver must keep comes back as a return value, and the edits it must have applied come as
`Applied` (object-store refs), so a fresh worker catches up by itself.

Subclasses add the methods of their job. The same classes run as Ray actors (pool.py) or, for one worker and
no cluster, as plain objects in the driver's process.
"""
from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass

import ray
import torch

from kedit_ray.spec import ModelSpec


def placement(gpus: list, requested: str | dict | None, cuda_devices: int) -> tuple[str | dict | None, str]:
    """(device_map for `load`, a description) for a worker assigned `gpus` (Ray's ids; with Ray, CUDA numbers
    them 0..n-1 in the worker), with the user's --device-map `requested` (parsed), in a process that sees
    `cuda_devices` CUDA devices.

    GPUs assigned (and seen): `requested` if given, else one GPU whole ({"": 0}) or accelerate's "auto" over all
    of them. No GPU assigned (or none seen): the CPU; `requested` is kept when it can put nothing on a GPU (a map
    of "cpu" and "disk" only, or any map when no GPU is seen) and set aside otherwise (a GPU not reserved is
    another worker's), which the description says."""
    if gpus and cuda_devices:
        if requested is not None:
            return requested, f"GPU {gpus}, device map {requested}"
        return ({"": 0} if cuda_devices == 1 else "auto"), f"GPU {gpus}"
    why = f" (GPU {gpus} assigned, but this torch sees no CUDA device)" if gpus else ""
    if requested is None:
        return None, f"cpu{why}"
    if cuda_devices == 0 or (isinstance(requested, dict) and {str(v) for v in requested.values()} <= {"cpu", "disk"}):
        return requested, f"cpu, device map {requested}{why}"
    return None, f"cpu (--device-map {requested} set aside: no GPU assigned, see --gpus-per-worker){why}"


@dataclass(frozen=True)
class WorkerInfo:
    name: str                 # w<index>@<host>:<pid>
    fingerprint: str | None   # of the loaded weights (None: a worker that holds no model)
    device: str               # where the model is (placement's description)
    threads: int


@dataclass(frozen=True)
class LocalRef:
    """What `put` gives in the driver's process: the object itself, with an id like an ObjectRef's."""

    value: object
    id: int


_local_ids = itertools.count()


def local_ref(value: object) -> LocalRef:
    return LocalRef(value, next(_local_ids))


def ref_id(ref) -> str:
    return f"local-{ref.id}" if isinstance(ref, LocalRef) else ref.hex()


def fetch(ref):
    """The object behind a ref: a LocalRef's value, an ObjectRef's object (Ray hands a ref given as an argument
    itself over already fetched: that object as it is)."""
    if isinstance(ref, LocalRef):
        return ref.value
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


@dataclass(frozen=True)
class Applied:
    """The edits a worker must have applied, in order, as refs (`Pool.put`). A dataclass holding the refs, so that
    Ray passes the refs themselves (it resolves only refs given as arguments): a worker fetches an edit only when it
    has not applied it yet."""

    refs: tuple = ()

    def then(self, *refs) -> Applied:
        return Applied(self.refs + refs)


class ModelWorker:
    """One model, loaded once; see the module docstring. `model` None: a worker that holds no model (test
    runners, the pool benchmark)."""

    def __init__(self, model: ModelSpec | None, index: int, cpus: float, gpus: list | None = None):
        gpus = ray.get_gpu_ids() if gpus is None else gpus     # None: a Ray actor, which asks Ray
        self.threads = max(1, int(cpus))
        torch.set_num_threads(self.threads)
        device_map, self.device = placement(gpus, model.device_map if model else None, torch.cuda.device_count())
        self.lm = self.load_model(model, device_map) if model is not None else None
        self.name = f"w{index}@{socket.gethostname()}:{os.getpid()}"
        self.applied: list[tuple[str, object]] = []     # (ref id, edit), in the order applied
        self.editor = None                               # subclasses that edit set it

    def load_model(self, model: ModelSpec, device_map: str | dict | None):
        """The LM this worker holds (distributed.shared overrides it to map a node's shared copy)."""
        return model.load(device_map)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.name, self.lm.fingerprint if self.lm is not None else None, self.device, self.threads)

    def sync(self, applied: Applied) -> None:
        """Make the applied edits exactly `applied`: revert those past the common prefix, apply the rest."""
        ids = [ref_id(r) for r in applied.refs]
        keep = 0
        while keep < min(len(ids), len(self.applied)) and self.applied[keep][0] == ids[keep]:
            keep += 1
        for _, edit in reversed(self.applied[keep:]):
            edit.revert(self.lm.model)
        del self.applied[keep:]
        for ref, rid in zip(applied.refs[keep:], ids[keep:]):
            edit = fetch(ref)
            edit.apply(self.lm.model)
            self.applied.append((rid, edit))

    # ------------------------------------------------ every model-holding worker can do these

    def model_info(self):
        from kedit_ray.stats.cache import ModelInfo

        return ModelInfo.of(self.lm)

    def stats_shard(self, item: tuple[int, list[str]], layers: list[int], module: str, max_len: int,
                    batch_tokens: int) -> tuple[int, dict, int, int]:
        """Σ k kᵀ of one corpus shard (kedit_ray.stats.compute adds them): (shard, sums per layer, tokens, docs)."""
        from kedit_ray.stats.accumulate import accumulate

        self.sync(Applied())
        shard, docs = item
        part = accumulate(self.lm, layers, module, docs, max_len, batch_tokens)
        return shard, {layer: s.numpy() for layer, s in part.sums.items()}, part.count, part.docs

    def stats_need(self) -> tuple | None:
        """(the layer statistics this worker's editor reads, whether missing ones may be computed); None when it
        reads none (--no-cov, an editor without C)."""
        need = None if self.editor is None else self.editor.stats_need(self.lm)   # None: a worker that edits nothing
        return None if need is None else (need, getattr(self.editor.hp, "compute_stats", True))

    def use_covariances(self, ref) -> None:
        """Make the editor use the C the driver resolved ({layer: (C, info)} in the object store), never its
        node's cache."""
        self.editor.use_covariances(self.lm, fetch(ref))

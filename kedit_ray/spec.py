"""A run's settings as typed objects: the model to load, the resources to run on, an eval run. No Ray here.

`EvalSpec` is written to OUT/config.json (`to_json`) and read back (`from_json`); results on disk lock the
fields that decide them (`RUN_ONLY` lists the ones that only decide how a run is executed).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

DEFAULT_RUNNER = "kedit_ray.eval.runner:CaseRunner"
PROTOCOLS = ("single", "batch", "sequential")
# config.json keys (flattened with dots) that may differ when a run is resumed (the data file is known by its bytes,
# `data_sha256`, not by where it lies: a Ray job reads it from a fresh copy of its working directory)
RUN_ONLY = ("resources", "model.device_map", "model.max_memory", "data")


def _from(cls, d: dict, where: str):
    """`cls(**d)`, refusing unknown keys with a message naming them and `where` they come from."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    if unknown := sorted(set(d) - known):
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def usable_cores() -> int:
    """The cores this process may run on (taskset, a cgroup cpuset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ModelSpec:
    """What a worker loads: the model's name and how. `device_map` and `max_memory` only place it."""

    name: str                    # gemma-3-270m, a hub id, a directory or a .gguf (kedit_ray.models.load)
    templates: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    device_map: str | dict | None = None
    max_memory: str | dict | None = None

    @classmethod
    def from_kw(cls, name: str, templates: dict | None = None, dtype: str = "float32",
                device_map: str | dict | None = None, max_memory: str | dict | None = None) -> ModelSpec:
        """From the model options (kedit_ray.options.model_kw), the maps parsed here: a JSON file is read on the
        driver's machine, and each worker places its model by the maps themselves."""
        from kedit_ray.models.loading import parse_map

        return cls(name, dict(templates or {}), dtype, parse_map(device_map, "--device-map"),
                   parse_map(max_memory, "--max-memory"))

    def load(self, device_map: str | dict | None = None):
        """The LM, on `device_map` (the placement the worker decided; see distributed.worker.placement)."""
        from kedit_ray.models import load

        return load(self.name, device_map=device_map, dtype=self.dtype, templates=self.templates,
                    max_memory=self.max_memory)


@dataclass
class Resources:
    """How many model-holding workers, with what each, on which Ray.

    workers 1 with no address (and no $RAY_ADDRESS) runs the one worker in this process, without Ray; any other
    case runs `workers` Ray actors. cpus_per_worker None: this machine's cores / workers on a local Ray, 1 on a
    cluster."""

    workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0
    address: str | None = None
    share_weights: bool = False  # the CPU workers of a node map one read-only copy (distributed.shared)

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be an integer ≥ 1, got {self.workers!r}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker!r}")
        if not self.gpus_per_worker >= 0:
            raise ValueError(f"--gpus-per-worker must be ≥ 0, got {self.gpus_per_worker!r}")

    @classmethod
    def from_args(cls, args) -> Resources:
        return cls(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.address,
                   getattr(args, "share_weights", False))

    @property
    def cluster(self) -> str | None:
        """The Ray address to join: --address, else $RAY_ADDRESS, else None (a local Ray or no Ray)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    @property
    def in_process(self) -> bool:
        return self.workers == 1 and self.cluster is None

    def cpus(self) -> float:
        """CPUs per worker: as given, else the cores this process may run on (taskset, a cgroup cpuset) divided by
        the workers (a local Ray, or this process), else 1 (a cluster)."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        if self.cluster is not None:
            return 1.0
        return usable_cores() / self.workers


@dataclass
class EvalSpec:
    """The settings of one `kedit eval` run (OUT/config.json)."""

    model: ModelSpec
    method: str
    params: dict = field(default_factory=dict)     # the editor's hyper-parameters (make_editor checks them)
    dataset: str = "auto"
    data: str | None = None
    data_sha256: str | None = None
    fluency: bool = False
    protocol: str = "single"
    batch_size: int = 1
    checkpoints: list[int] | None = None
    held_out: list[int] = field(default_factory=list)   # case_ids scored at each sequential checkpoint
    runner: str = DEFAULT_RUNNER                   # "module:qualname" of the single protocol's case runner
    options: dict = field(default_factory=dict)    # the runner's own settings
    ppl_docs: int = 0                              # documents of the stats corpus for perplexity (0: not measured)
    collapse_factor: float = 2.0                   # an edit that multiplies the perplexity by more is `collapsed`
    stop_on_collapse: bool = False                 # sequential: stop at the first collapsed checkpoint
    checkpoint_sample: int | None = None           # sequential: edits scored at a checkpoint before the last (None:
                                                   # every one)
    generate: bool = False                         # efficacy_generated, paraphrase_generated (greedy answers)
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.ppl_docs < 0:
            raise ValueError(f"--ppl-docs must be ≥ 0, got {self.ppl_docs}")
        if self.checkpoint_sample is not None and self.checkpoint_sample < 1:
            raise ValueError(f"--checkpoint-sample must be ≥ 1, got {self.checkpoint_sample}")
        if not self.collapse_factor > 0:
            raise ValueError(f"--collapse-factor must be > 0, got {self.collapse_factor}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "config.json") -> EvalSpec:
        d = dict(d)
        d["model"] = _from(ModelSpec, d.get("model"), f"{where}: model")
        d["resources"] = _from(Resources, d.get("resources", {}), f"{where}: resources")
        return _from(cls, d, where)

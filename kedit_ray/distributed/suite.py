"""`kedit suite` on Ray: one pool of workers, each loading its model once, lent to every run of the suite.

The suite (kedit_ray.suite) runs each run as `kedit eval` does, inside `lending(shared)`: where the eval driver
opens its pool of EditWorkers (single protocol) or BatchWorkers (batch, sequential), open_pool gets the suite's
pool instead, and every worker is told to `select` that run: it reverts whatever edits it still holds, checks
that its model is the one it loaded, weights and hooks (so no edit leaks into the next run), and serves the run with a fresh
editor, scorer and probe on the model it already has. A run of another model (or other resources) is served by a
new pool: the one before is closed first.
"""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from kedit_ray.distributed.batch import BatchWorker
from kedit_ray.distributed.driver import EditWorker
from kedit_ray.distributed.pool import open_pool
from kedit_ray.distributed.worker import Applied, ModelWorker
from kedit_ray.spec import EvalSpec, ModelSpec, Resources

KINDS = {EditWorker: "edit", BatchWorker: "batch"}


def model_digest(model: torch.nn.Module) -> list[float]:
    """Per parameter in memory, the float64 sum of its values (offloaded ones, on `meta`, are not read), and the
    number of forward hooks: an edit left applied changes them (a weight delta the sums, an adaptor the hooks or
    the parameters), and a revert, being bit for bit, gives them back exactly."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return [p.detach().double().sum().item() for _, p in model.named_parameters() if p.device.type != "meta"] + \
        [float(hooks)]


class SuiteWorker(EditWorker, BatchWorker):
    """An EditWorker and a BatchWorker in one, on a model loaded once: `select` says which, and for which run."""

    def __init__(self, model: ModelSpec, index: int, cpus: float, gpus: list | None = None):
        ModelWorker.__init__(self, model, index, cpus, gpus)
        self.in_ray = gpus is None
        self.digest = model_digest(self.lm.model)
        self.served: list[str] = []   # the runs served, in order (the tests count loads and runs by it)
        self.host = machine(self.threads)

    def select(self, kind: str, spec: EvalSpec, run: str) -> None:
        """Serve `run` (`kind` "edit": the single protocol; "batch": the others) from a clean model: the edits still
        applied are reverted, the weights checked against those loaded, the memory peaks reset."""
        self.sync(Applied())
        if model_digest(self.lm.model) != self.digest:
            by = f" by run {self.served[-1]!r}" if self.served else ""
            raise RuntimeError(f"{self.name}: the model differs from the one it loaded, before run {run!r}: an edit "
                               f"was left applied{by}")
        reset_peaks()
        (EditWorker if kind == "edit" else BatchWorker).serve(self, spec)
        self.served.append(run)

    def peak(self) -> dict:
        """This worker's name, its machine and its peak memory since the last `select`: resident (bytes, Linux)
        and CUDA."""
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"worker": self.name, "host": self.host, "peak_rss": self.memory()["peak_rss"],
                "peak_cuda": cuda}


def machine(threads: int) -> str:
    """This host as a results page names it: cores, processor, memory, GPU and the worker's torch threads."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} cores ({cpu}){f', {ram:.0f} GiB' if ram else ''}{gpu}, "
            f"{threads} torch thread{'s' * (threads != 1)}")


def reset_peaks() -> None:
    """Start the peaks `peak` reads afresh: the kernel's peak RSS (clear_refs 5) and torch's CUDA peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class SharedPool:
    """The suite's pool, opened on first use and lent to each run (`pool.lending(shared)`); `close` ends it."""

    def __init__(self, resources: Resources):
        self.resources = resources
        self.model: ModelSpec | None = None
        self.pool = None
        self.stack = contextlib.ExitStack()
        self.run = ""      # the run being served (the suite sets it before each)
        self.used = False  # whether the current run asked for workers

    def lend(self, worker_cls, args: tuple, resources: Resources):
        """A context manager yielding the pool for an eval run (None for any other pool)."""
        spec = args[0] if args else None
        if worker_cls not in KINDS or not isinstance(spec, EvalSpec) or resources != self.resources:
            return None
        return self._lent(KINDS[worker_cls], spec)

    @contextlib.contextmanager
    def _lent(self, kind: str, spec: EvalSpec) -> Iterator:
        if self.pool is not None and spec.model != self.model:
            self.close()
        if self.pool is None:
            self.model = spec.model
            self.pool = self.stack.enter_context(open_pool(SuiteWorker, (spec.model,), self.resources))
        self.pool.forget()   # a replacement replays this run's broadcasts only
        self.pool.broadcast("select", kind, spec, self.run)
        self.used = True
        yield self.pool

    def peaks(self) -> list[dict]:
        """Every worker's peak memory in the current run."""
        return self.pool.each("peak") if self.pool is not None else []

    def close(self) -> None:
        self.stack.close()
        self.pool = self.model = None

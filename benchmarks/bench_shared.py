"""Memory of N CPU workers on one node, each with its own weights against one shared read-only copy, side by side.

    .venv/bin/python benchmarks/bench_shared.py [--workers 4] [--model gemma-3-270m] [--dtypes float32,bfloat16]

For each dtype, opens the pool twice on a local Ray (each worker its own copy, then --share-weights:
kedit_ray.distributed.shared) on a fresh copy of the model's directory (so that no other process on the machine
shares its page cache: a float32 load maps the checkpoint, and its pages count for whoever maps them), and sums
each process's PSS from /proc/<pid>/smaps_rollup, where a page shared by k processes counts 1/k in each, so the
shared copy counts once: over the workers, and over every process of the Ray node (the workers, the raylet whose
object store holds the shared copy, the pool's WeightStore actor, Ray's own daemons). USS (private pages) and RSS
are shown too. Then each worker edits one weight (a Delta on one MLP output projection), which copies that weight
alone, and the PSS is summed again. Every worker's logits on a prompt must be identical across the two modes.
"shared params" counts the parameters a worker maps from the store (0: it loaded as before, the checkpoint mapped).
Target: workers' PSS shared / private ≤ 0.5 with 4 gemma-3-270m workers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from kedit_ray.distributed.suite import SuiteWorker
from kedit_ray.models.loading import resolve

GIB = 1 << 30


class Held(SuiteWorker):
    """A worker that reports its pid and logits, and edits one weight on demand; a SuiteWorker, so that it holds the
    code a `kedit eval` or `kedit suite` worker imports (editors, scorers, protocols), as a real worker does."""

    def probe(self) -> tuple[int, np.ndarray, int]:
        """(pid, the last position's logits on a prompt, parameters mapped from the store)."""
        from kedit_ray.models.weights import SHARED

        ids = self.lm.tok("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = self.lm.model(input_ids=ids).logits[0, -1].double().numpy()
        return os.getpid(), logits, sum(bool(getattr(p, SHARED, False)) for p in self.lm.model.parameters())

    def edit(self) -> None:
        from kedit_ray.editors.delta import Delta

        name = self.lm.arch.name("mlp_out", self.lm.n_layers // 2)
        w = self.lm.model.get_submodule(name).weight
        self.delta = Delta({name: 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))})
        self.delta.apply(self.lm.model)


def rollup(pid: int) -> dict[str, int]:
    """Rss, Pss and Uss (Private_Clean + Private_Dirty) of `pid`, in bytes."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        kb[key.rstrip(":")] = int(value) * 1024
    return {"rss": kb["Rss"], "pss": kb["Pss"], "uss": kb["Private_Clean"] + kb["Private_Dirty"]}


def summed(pids: list[int]) -> dict[str, int]:
    out = {"rss": 0, "pss": 0, "uss": 0}
    for pid in pids:
        try:
            for k, v in rollup(pid).items():
                out[k] += v
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue   # a process that ended meanwhile
    return out


def node_pids() -> list[int]:
    """The processes of the local Ray node this process started (its descendants)."""
    return [p.pid for p in psutil.Process().children(recursive=True)]


def measure(model: str, dtype: str, workers: int, share: bool) -> dict:
    import ray

    from kedit_ray.distributed.pool import RayPool
    from kedit_ray.spec import ModelSpec, Resources

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.1")
    try:
        t0 = time.perf_counter()
        resources = Resources(workers, os.cpu_count() / workers, share_weights=share)
        with RayPool(Held, (ModelSpec(model, dtype=dtype),), resources, workers) as pool:
            start = time.perf_counter() - t0
            actors = list(pool.info)
            probes = ray.get([a.probe.remote() for a in actors])
            pids = [pid for pid, _, _ in probes]
            time.sleep(2)
            out = {"start": start, "logits": [lg for _, lg, _ in probes], "mapped": [n for _, _, n in probes],
                   "workers": summed(pids), "node": summed(node_pids())}
            ray.get([a.edit.remote() for a in actors])
            out["edited"] = summed(pids)
        return out
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_shared_") as tmp:
        copy = shutil.copytree(resolve(args.model), Path(tmp) / "model")
        for dtype in args.dtypes.split(","):
            report(f"{args.model} in {dtype}", measure(str(copy), dtype, args.workers, False),
                   measure(str(copy), dtype, args.workers, True))


def report(what: str, p: dict, s: dict) -> None:
    print(f"\n{what}, {len(p['logits'])} CPU workers on one node (GiB)   private    shared   shared/private")
    rows = [("workers' PSS", "workers", "pss"), ("workers' USS", "workers", "uss"), ("workers' RSS", "workers", "rss"),
            ("Ray node's PSS (all its processes)", "node", "pss"), ("workers' PSS, one edit each", "edited", "pss")]
    for label, part, key in rows:
        a, b = p[part][key] / GIB, s[part][key] / GIB
        print(f"  {label:36} {a:8.2f}  {b:8.2f}   {b / a:6.3f}")
    print(f"  {'pool start (s)':36} {p['start']:8.1f}  {s['start']:8.1f}")
    print(f"  {'shared params per worker':36} {'/'.join(map(str, sorted(set(p['mapped'])))):>8}  "
          f"{'/'.join(map(str, sorted(set(s['mapped'])))):>8}")
    same = all(np.array_equal(a, b) for a in p["logits"] for b in s["logits"])
    print(f"logits identical across workers and modes: {same}")
    ratio = s["workers"]["pss"] / p["workers"]["pss"]
    print(f"target: workers' PSS shared / private ≤ 0.5: {ratio:.3f} ({'met' if ratio <= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()

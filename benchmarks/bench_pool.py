"""The worker pool: its overhead per case, and eval throughput with 2 workers against 1, as ratios.

    .venv/bin/python benchmarks/bench_pool.py [--cases 200] [--edits 4] [--model gemma-3-270m]

1. Overhead: `kedit eval`'s driver (kedit_ray.distributed.driver.run_eval: pool, one row written per finished
   case, compaction, summary) with a runner that does nothing, on 2 Ray workers and on 1 worker in this process.
   Per case = (time for N + 20 cases − time for 20 cases) / N, so starting Ray and the workers cancels out.
   Target: ≤ 20 ms per case.
2. Throughput: ROME on `--edits` CounterFact cases (C = I), the pool's workers editing and scoring, timed from
   the workers being ready to the last case: 2 workers of 1 CPU against 1 worker of 1 CPU (the pool's scaling;
   keep ≥ 1.7×), and against 1 worker given both cores (what `--workers 1` does by default). Needs the machine's
   2 cores free: check `uptime` first.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


class NullRunner:
    """A case runner that does nothing: the smallest row."""

    needs_model = False

    def __init__(self, spec, lm=None):
        self.spec = spec

    def run(self, request) -> dict:
        return {"case_id": request.case_id, "method": self.spec.method, "model": self.spec.model.name,
                "error": None}


def overhead(workers: int, cases: int) -> float:
    """Seconds per case of the driver around a runner that does nothing."""
    from kedit_ray.distributed.driver import run_eval
    from kedit_ray.requests import EditRequest
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    spec = EvalSpec(ModelSpec("none"), "null", runner="bench_pool:NullRunner", resources=Resources(workers, 1))
    seconds = {}
    for n in (20, cases + 20):
        requests = [EditRequest(i, f"S{i}", "{} is in", "Goa", "Paris") for i in range(n)]
        with tempfile.TemporaryDirectory(prefix="pool_bench_") as out:
            t0 = time.perf_counter()
            run_eval(spec, requests, out, progress=False)
            seconds[n] = time.perf_counter() - t0
    return (seconds[cases + 20] - seconds[20]) / cases


def throughput(model: str, edits: list, workers: int, cpus: float) -> float:
    """Cases per second of ROME on `workers` workers of `cpus` CPUs, once they are ready."""
    from kedit_ray.distributed.driver import EditWorker
    from kedit_ray.distributed.pool import open_pool
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    spec = EvalSpec(ModelSpec(model), "rome", {"use_cov": False}, "counterfact", resources=Resources(workers, cpus))
    with open_pool(EditWorker, (spec,), spec.resources) as pool:
        t0 = time.perf_counter()
        rows = [row for _, row in pool.stream(edits, "run")]
        seconds = time.perf_counter() - t0
    assert all(r.get("error") is None for r in rows), [r["error"] for r in rows]
    return len(edits) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    os.environ.pop("RAY_ADDRESS", None)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores", flush=True)
    per = {w: overhead(w, args.cases) for w in (1, 2)}
    print(f"\npool overhead per case, a runner that does nothing, {args.cases} cases (target ≤ 20 ms):")
    print(f"  1 worker in this process  {per[1] * 1e3:6.1f} ms/case")
    print(f"  2 Ray workers             {per[2] * 1e3:6.1f} ms/case   ({per[2] / 0.020:.2f}× the target)")
    if args.skip_throughput:
        return
    from kedit_ray.datasets import load_requests

    edits, _ = load_requests(args.data, limit=args.edits)
    runs = {"1 worker, 1 CPU": (1, 1), "2 workers, 1 CPU each": (2, 1), "1 worker, 2 CPUs": (1, 2)}
    rate = {name: throughput(args.model, edits, w, c) for name, (w, c) in runs.items()}
    print(f"\nROME on {args.model}, {len(edits)} cases, C = I, cases per minute once the workers are ready:")
    for name, r in rate.items():
        print(f"  {name:24} {r * 60:6.2f}")
    base = rate["1 worker, 1 CPU"]
    print(f"  2 workers / 1 worker (1 CPU each): {rate['2 workers, 1 CPU each'] / base:.2f}× (keep ≥ 1.7×)")
    print(f"  2 workers / 1 worker with both cores: {rate['2 workers, 1 CPU each'] / rate['1 worker, 2 CPUs']:.2f}×")


if __name__ == "__main__":
    main()

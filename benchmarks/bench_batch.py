"""MEMIT batch editing: batched z optimisation vs one request at a time, and 2 Ray workers vs 1, as ratios.

    .venv/bin/python benchmarks/bench_batch.py [--edits 200] [--worker-edits 20] [--threads 1]

1. z_i for `--edits` requests, optimised `--z-batch` at a time (one batched δ, one Adam step for all; a request
   leaves the batch when its NLL is low enough) against one request at a time (the reference code's loop). One
   process; the two take turns chunk by chunk (the order rotating), so load from other processes falls on both
   alike, and the median of the per-chunk ratios is printed too.
2. The batch protocol (MEMIT, one batch of `--worker-edits`) through kedit_ray.distributed.batch with 1 (in this
   process) and with 2 BatchWorkers (Ray actors) of `--threads` CPU each: wall time of the parts that run on the workers (pre-edit scores,
   z, keys, post-edit scores) and of the whole run. Needs 2 × threads free cores to mean anything.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kedit_ray.datasets import load_requests
from kedit_ray.editors import Memit, MemitParams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--z-batch", type=int, default=25)
    ap.add_argument("--worker-edits", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v-steps", type=int, default=None, help="cap the z steps (default: the editor's)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--skip-workers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kedit_ray.models import load

    lm = load(args.model)
    cases, _ = load_requests(args.data, limit=max(args.edits, args.worker_edits))
    values = {} if args.v_steps is None else {"steps": args.v_steps}
    editors = {"batched": Memit(MemitParams.from_dict({"z_batch": args.z_batch, "values": values})),
               "one at a time": Memit(MemitParams.from_dict({"z_batch": 1, "values": values}))}
    for editor in editors.values():
        editor.targets(lm, cases[:1])                      # warm-up: context prefixes, first-call overheads
    times = {name: [] for name in editors}
    chunks = [cases[s:s + args.z_batch] for s in range(0, args.edits, args.z_batch)]
    for c, chunk in enumerate(chunks):
        for name in list(editors)[c % 2:] + list(editors)[:c % 2]:
            t0 = time.perf_counter()
            editors[name].targets(lm, chunk)
            times[name].append(time.perf_counter() - t0)
        print(f"chunk {c + 1}/{len(chunks)}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()),
              flush=True)
    editor = editors["batched"]
    print(f"\nMEMIT z on {args.model}, {args.edits} edits, {args.threads} thread(s), layers {editor.layers(lm)}")
    for name, ts in times.items():
        print(f"  {name:14} {sum(ts):8.1f} s  ({sum(ts) / args.edits:.2f} s/edit)")
    per_chunk = statistics.median(a / b for a, b in zip(times["one at a time"], times["batched"]))
    print(f"  batched z speed-up (one at a time / batched by {args.z_batch}): "
          f"{sum(times['one at a time']) / sum(times['batched']):.2f}x (median per chunk {per_chunk:.2f}x)")
    if args.skip_workers:
        return
    del lm
    from kedit_ray.distributed.batch import run_protocol_eval
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    parts = ("pre_s", "z_s", "keys_s", "eval_s")
    runs = {}
    for workers in (1, 2):
        spec = EvalSpec(ModelSpec(args.model), "memit", {"values": values}, "counterfact", protocol="batch",
                        batch_size=args.worker_edits, resources=Resources(workers, args.threads))
        with tempfile.TemporaryDirectory(prefix="memit_bench_") as out:
            s = run_protocol_eval(spec, cases[:args.worker_edits], out)
        runs[workers] = {"parallel": sum(s["timings"].get(p, 0.0) for p in parts), "wall": s["wall_seconds"],
                         **s["timings"], "ES": s["efficacy_score"]}
    print(f"\nbatch protocol, MEMIT, {args.worker_edits} edits in one batch, {args.threads} CPU per worker")
    print(f"  {'workers':8} {'parallel parts':>15} {'pre':>7} {'z':>7} {'keys':>7} {'eval':>7} {'solve+rest':>10} "
          f"{'wall':>7} {'ES':>5}")
    for w, r in runs.items():
        rest = r.get("edit_s", 0.0) - r.get("z_s", 0.0) - r.get("keys_s", 0.0)
        print(f"  {w:<8} {r['parallel']:15.1f} {r.get('pre_s', 0):7.1f} {r.get('z_s', 0):7.1f} "
              f"{r.get('keys_s', 0):7.1f} {r.get('eval_s', 0):7.1f} {rest:10.2f} {r['wall']:7.1f} {r['ES']:5.2f}")
    print(f"  2 workers vs 1: parallel parts {runs[2]['parallel'] / runs[1]['parallel']:.2f}x the time "
          f"(ideal 0.50), whole run {runs[2]['wall'] / runs[1]['wall']:.2f}x")


if __name__ == "__main__":
    main()

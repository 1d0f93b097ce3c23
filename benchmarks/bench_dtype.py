"""ROME in float32 against half precision on gemma-3-270m: ES / PS / NS over the first CounterFact cases, seconds per
edit and peak memory, side by side with their ratio. Each dtype runs in its own process (one case after another,
the single protocol's CaseRunner: pre-edit scores, edit, post-edit scores, revert), so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_dtype.py [--cases 30] [--dtypes float32,bfloat16] [--threads 2]

C comes from `--stats-samples` WikiText documents (computed once by the first dtype, then read from the cache:
a model's fingerprint, which keys the stats, does not depend on the dtype it is loaded in).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def run_one(args: argparse.Namespace) -> dict:
    """The cases in one dtype, in this process."""
    import torch

    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.runner import CaseRunner
    from kedit_ray.spec import EvalSpec, ModelSpec

    torch.set_num_threads(args.threads)
    params = {"use_cov": False} if args.no_cov else {"stats_corpus": args.stats_corpus,
                                                      "stats_samples": args.stats_samples}
    model = ModelSpec(args.model, dtype=args.worker)
    runner = CaseRunner(EvalSpec(model, "rome", params, "counterfact"), model.load())
    cases, _ = load_requests(args.data, "counterfact", limit=args.cases)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        rows.append({**runner.run(case), "case_s": time.perf_counter() - t0})
        print(f"[{args.worker}] case {case.case_id}: {rows[-1]['edit_seconds']:.1f} s", file=sys.stderr, flush=True)
    return {"dtype": args.worker, "rows": rows, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "cov": rows[0].get("cov")}


def summary(run: dict) -> dict:
    rows = run["rows"]
    out = {f"pre_{m}": statistics.fmean(r[f"pre_{m}"] for r in rows) for m in METRICS}
    out.update({m: statistics.fmean(r[m] for r in rows) for m in METRICS})
    out["s/edit"] = statistics.median(r["edit_seconds"] for r in rows)   # the median: the first edit pays setup
    out["peak GiB"] = run["peak_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the first is the reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stats-corpus", default=str(DATA / "wiki.test.raw"))
    ap.add_argument("--stats-samples", type=int, default=2000)
    ap.add_argument("--no-cov", action="store_true", help="C = I")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: run one dtype, print JSON
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_one(args)))
        return
    runs = []
    for dtype in args.dtypes.split(","):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", dtype], check=True, text=True,
                              stdout=subprocess.PIPE)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    sums = [summary(r) for r in runs]
    names = [r["dtype"] for r in runs]
    print(f"ROME on {args.model}, the first {args.cases} cases of {Path(args.data).name}, C: {runs[0]['cov']}, "
          f"{args.threads} threads")
    head = f"{'':22}" + "".join(f"{n:>10}" for n in names) + "".join(f"{n + '/' + names[0]:>20}" for n in names[1:])
    print(head)
    for key in sums[0]:
        ref = sums[0][key]
        cells = "".join(f"{s[key]:10.3f}" for s in sums)
        ratios = "".join(f"{(s[key] / ref if ref else float('nan')):20.3f}" for s in sums[1:])
        print(f"{key:22}{cells}{ratios}")
    for name, s in zip(names[1:], sums[1:]):
        worst = max(abs(s[m] - sums[0][m]) for m in METRICS)
        print(f"largest |{name} - {names[0]}| over ES, PS, NS: {worst:.3f}")


if __name__ == "__main__":
    main()

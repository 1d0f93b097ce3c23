"""Batched scoring (issue 27 §2) against today's per-case scorer, on the same cases: cases per second, the ratio
and the largest difference of every figure.

    .venv/bin/python benchmarks/bench_scoring.py [--dataset counterfact|zsre] [--cases 200] [--chunk 32] [--threads 1]

CounterFact reads counterfact-edit.json, zsRE zsre_portability.json (with its portability questions). A case is
scored as a run scores it: on the model before the edit, then again with those pre-edit scores (zsRE's locality
reads them). The cases go in chunks of `--chunk`, as the protocols hand them out; each chunk is scored by today's
scorer case by case (`counterfact_scores`, `zsre_scores`) and by `Scorer.many`, the order alternating chunk by
chunk, so load from other processes falls on both alike. The last column scores the cases once more with the
batched scorer in chunks of `--floor-chunk` (other passes, other padding): how far float32 alone moves a figure
when only the batching changes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"counterfact": "counterfact-edit.json", "zsre": "zsre_portability.json"}


def max_diff(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Per figure, the largest |a - b| (NaN = NaN, None = None); for a list (zsRE's argmaxes), how many differ."""
    out: dict[str, float] = {}
    for x, y in zip(a, b):
        for k, v in x.items():
            w = y[k]
            if isinstance(v, list):
                out[k] = out.get(k, 0) + (v != w)
                continue
            same = v == w or (v is not None and w is not None and math.isnan(v) and math.isnan(w))
            out[k] = max(out.get(k, 0.0), 0.0 if same else math.inf if v is None or w is None else abs(v - w))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", choices=list(FILES), default="counterfact")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--floor-chunk", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()

    from kedit_ray.datasets import load_requests
    from kedit_ray.eval import Scorer
    from kedit_ray.eval.counterfact import counterfact_scores
    from kedit_ray.eval.zsre import zsre_scores
    from kedit_ray.models import load

    torch.set_num_threads(args.threads)
    lm = load(args.model)
    cases, _ = load_requests(str(DATA / FILES[args.dataset]), args.dataset, limit=args.cases)
    scorer = Scorer(args.dataset)
    one = zsre_scores if args.dataset == "zsre" else lambda lm, r, pre=None: counterfact_scores(lm, r)

    def today(chunk):   # per case: (pre-edit scores, scores with them)
        pre = [one(lm, r) for r in chunk]
        return list(zip(pre, [one(lm, r, p) for r, p in zip(chunk, pre)]))

    def batched(chunk):
        pre = scorer.many(lm, [(r, None) for r in chunk])
        return list(zip(pre, scorer.many(lm, list(zip(chunk, pre)))))

    runs = {"today": today, "batched": batched}
    for run in runs.values():   # warm-up
        run(cases[:2])
    seconds = {name: [] for name in runs}
    scores = {name: [] for name in runs}
    chunks = [cases[i:i + args.chunk] for i in range(0, len(cases), args.chunk)]
    for c, chunk in enumerate(chunks):
        for name in list(runs)[c % 2:] + list(runs)[:c % 2]:
            t0 = time.perf_counter()
            scores[name] += runs[name](chunk)
            seconds[name].append(time.perf_counter() - t0)
        print(f"chunk {c + 1}/{len(chunks)}: " + ", ".join(f"{n} {s[-1]:.1f} s" for n, s in seconds.items()),
              flush=True)
    floor = [s for i in range(0, len(cases), args.floor_chunk) for s in batched(cases[i:i + args.floor_chunk])]

    rate = {n: len(cases) / sum(s) for n, s in seconds.items()}
    ratios = [t / b for t, b in zip(seconds["today"], seconds["batched"])]
    print(f"\n{args.model}, {args.dataset}, {len(cases)} cases in chunks of {args.chunk}, {args.threads} thread(s); "
          "a case = its scores before an edit and with them after")
    print(f"  today (case by case)  {rate['today']:8.2f} cases/s")
    print(f"  batched               {rate['batched']:8.2f} cases/s")
    print(f"  ratio                 {rate['batched'] / rate['today']:8.2f}x  (median over chunks "
          f"{statistics.median(ratios):.2f}x)")
    def both(pairs):   # every case's pre-edit and post-edit scores, one list
        return [s for pair in pairs for s in pair]

    d, spread = max_diff(both(scores["today"]), both(scores["batched"])), max_diff(both(scores["batched"]), both(floor))
    print(f"\nmax |batched - today| per figure; last column: max |batched in chunks of {args.floor_chunk} - batched|"
          " (lists: the cases that differ)")
    for k in d:
        print(f"  {k:24}{d[k]:12.3g}{spread[k]:12.3g}")


if __name__ == "__main__":
    main()

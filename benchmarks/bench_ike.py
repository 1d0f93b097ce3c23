"""IKE's scoring with C's keys and values computed once (a KV cache of the context) against every pass reading
C + row in full, on the same zsRE cases: cases per second, the ratio and the largest difference of every figure.

    .venv/bin/python benchmarks/bench_ike.py [--edits 50] [--cases 40] [--chunk 20] [--dtype bfloat16] [--threads 1]

The context is the one a sequential IKE run holds after `--edits` edits of zsre_mend_train-1k.json (its facts and
8 demonstrations from the same file); `--cases` of those edits are scored as a checkpoint scores them (zsRE's
scorer, with the unedited model's scores), in chunks of `--chunk`, the order of the two ways alternating chunk by
chunk so that load from other processes falls on both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench_scoring import max_diff
from kedit_ray.editors.ike import IkeContext

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train-1k.json"


class Uncached(IkeContext):
    """The hooks as they were before the cache: every pass reads C + row in full."""

    def splice(self, model, args, kwargs):
        return super().splice(model, args, {**kwargs, "use_cache": None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()

    from kedit_ray.datasets import load_requests
    from kedit_ray.editors import Ike, IkeParams
    from kedit_ray.eval import Scorer
    from kedit_ray.models import load

    torch.set_num_threads(args.threads)
    lm = load(args.model, dtype=args.dtype)
    edits, _ = load_requests(str(DATA), "zsre", limit=args.edits, skip_invalid=True)
    editor, scorer = Ike(IkeParams(pool=str(DATA))), Scorer("zsre")
    cases = edits[:args.cases]
    pre = scorer.many(lm, [(r, None) for r in cases])
    applied = []
    for r in edits:   # the context after every edit, as the sequential protocol builds it
        applied.append(editor.edit(lm, r).apply(lm.model))
    ctx = applied[-1]
    for c in reversed(applied):
        c.revert(lm.model)
    ways = {"full": Uncached(ctx.ids, ctx.skip, ctx.embed, ctx.final_norm, ctx.requests, ctx.text, ctx.meta),
            "cached": IkeContext(ctx.ids, ctx.skip, ctx.embed, ctx.final_norm, ctx.requests, ctx.text, ctx.meta)}
    print(f"context: {len(ctx.ids):,} tokens ({args.edits} facts, {sum(ctx.meta['demos'].values())} demonstrations)")
    seconds = {n: [] for n in ways}
    scores = {n: [] for n in ways}
    chunks = [list(zip(cases, pre))[i:i + args.chunk] for i in range(0, len(cases), args.chunk)]
    for c, chunk in enumerate(chunks):
        for name in list(ways)[c % 2:] + list(ways)[:c % 2]:
            with ways[name].applied(lm.model):   # the cached way computes C's cache in its first pass, timed
                t0 = time.perf_counter()
                scores[name] += scorer.many(lm, chunk)
                seconds[name].append(time.perf_counter() - t0)
        print(f"chunk {c + 1}/{len(chunks)}: " + ", ".join(f"{n} {s[-1]:.1f} s" for n, s in seconds.items()),
              flush=True)
    rate = {n: len(cases) / sum(s) for n, s in seconds.items()}
    ratios = [f / c for f, c in zip(seconds["full"], seconds["cached"])]
    print(f"\n{args.model} {args.dtype}, zsRE, {len(cases)} cases after {args.edits} IKE edits, chunks of "
          f"{args.chunk}, {args.threads} thread(s)")
    print(f"  C + row in full   {rate['full']:8.2f} cases/s")
    print(f"  C cached          {rate['cached']:8.2f} cases/s")
    print(f"  ratio             {rate['cached'] / rate['full']:8.2f}x  (median over chunks "
          f"{statistics.median(ratios):.2f}x)")
    print("\nmax |cached - full| per figure (lists: the cases that differ)")
    for k, v in max_diff(scores["full"], scores["cached"]).items():
        print(f"  {k:24}{v:12.3g}")


if __name__ == "__main__":
    main()

"""ROME seconds per edit on gemma-3-270m, split into key, value optimisation, solve and evaluation, with the
three v* savings (cached residual stream, logits only where read, early stop) on and off, side by side.

    .venv/bin/python benchmarks/bench_rome.py [--cases 5] [--data ../shared/data/counterfact-edit.json]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from kedit_ray.datasets import load_requests
from kedit_ray.editors import Rome, RomeParams
from kedit_ray.editors.toolkit import ValueParams
from kedit_ray.eval.counterfact import counterfact_scores
from kedit_ray.models import load

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--no-cov", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lm = load(args.model)
    cases, _ = load_requests(args.data, limit=args.cases)
    cov = {"use_cov": not args.no_cov}
    editors = {"on": Rome(RomeParams(**cov)),
               "off": Rome(RomeParams(**cov, values=ValueParams(cache_residual=False, gather_logits=False,
                                                                early_stop=False)))}
    peak = {}
    for mode, ed in editors.items():  # warm-up: context prefixes, C, first-call overheads; "on" first
        with ed.edit(lm, cases[0]).applied(lm.model):
            counterfact_scores(lm, cases[0])
        peak[mode] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB → GiB, never falls
    rows: dict[str, list[dict]] = {k: [] for k in editors}
    for case in cases:
        for mode, ed in editors.items():  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            delta = ed.edit(lm, case)
            t1 = time.perf_counter()
            with delta.applied(lm.model):
                counterfact_scores(lm, case)
            t2 = time.perf_counter()
            rows[mode].append({**{k: delta.meta[k] for k in ("key_s", "value_s", "solve_s", "v_steps")},
                               "edit_s": t1 - t0, "eval_s": t2 - t1})
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in rows.items()}
    print(f"ROME on {args.model}, {len(cases)} cases, layer {delta.meta['layer']}, C: {delta.meta['cov']}")
    print(f"{'savings':8} {'s/edit':>7} {'key':>6} {'value':>7} {'solve':>6} {'eval':>6} {'v steps':>7}")
    for mode, m in med.items():
        print(f"{mode:8} {m['edit_s']:7.2f} {m['key_s']:6.2f} {m['value_s']:7.2f} {m['solve_s']:6.3f} "
              f"{m['eval_s']:6.2f} {m['v_steps']:7.1f}")
    print(f"speed-up of the savings (median s/edit off / on): {med['off']['edit_s'] / med['on']['edit_s']:.2f}x")
    print(f"peak memory (max RSS) after an edit and its evaluation with the savings: {peak['on']:.2f} GiB; "
          f"without them: {peak['off']:.2f} GiB")


if __name__ == "__main__":
    main()

"""One fact's full causal trace (hidden, MLP, attention; every token from the subject on × every layer):
batched restorations vs one forward pass per restoration (ROME's trace_with_patch loop), as a ratio.

    .venv/bin/python benchmarks/bench_trace.py [--model gemma-3-270m] [--samples 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from kedit_ray.models import LM, load
from kedit_ray.tracing.trace import FactTrace, TraceParams, noise_std, trace_fact

MODES = {"batched": False, "one pass per restoration": True}   # name → trace_fact's one_pass_each


def compare(lm: LM, prompt: str, subject: str, params: TraceParams) -> tuple[dict[str, float], dict[str, FactTrace]]:
    """The fact's trace both ways: {mode: seconds}, {mode: trace}. σ is 3 × the std of the prompt's embeddings."""
    sigma = 3 * noise_std(lm, [prompt])
    times, traces = {}, {}
    for name, one in MODES.items():
        t0 = time.perf_counter()
        traces[name] = trace_fact(lm, prompt, subject, sigma, params, one_pass_each=one)
        times[name] = time.perf_counter() - t0
    return times, traces


def largest_difference(traces: dict[str, FactTrace]) -> float:
    """max |P*_restored batched − one pass per restoration| over every restoration."""
    a, b = (traces[name] for name in MODES)
    return max(float(np.abs(a.scores[k] - b.scores[k]).max()) for k in a.scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--prompt", default="The Big Bang Theory premieres on")
    p.add_argument("--subject", default="The Big Bang Theory")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    times, traces = compare(lm, args.prompt, args.subject, TraceParams(samples=args.samples))
    t = traces["batched"]
    n = sum(s[t.subject_range[0]:].size for s in t.scores.values())
    diff = largest_difference(traces)
    print(f"{args.model}, {len(t.tokens)} tokens, {n} restorations × {args.samples} noise samples, "
          f"{torch.get_num_threads()} threads; answer {t.answer!r}, P {t.p:.4f}, P* {t.p_star:.4f}")
    for name, s in times.items():
        print(f"  {name:<26} {s:8.1f} s")
    print(f"  ratio {times['one pass per restoration'] / times['batched']:.2f}x faster batched "
          f"(max |Δ P*_restored| {diff:.1e})")


if __name__ == "__main__":
    main()

"""Layer-statistics throughput on gemma-3-270m and WikiText, as ratios measured in one run.

    (a) stats for LAYERS in one pass vs a bare forward pass stopped at the same place   goal ≥ 0.85 (throughput)
    (b) LAYERS in one pass vs the deepest layer alone                                    goal ≤ 1.3  (time)
    (c) LAYERS in one pass vs one single-layer pass per layer (the reference suites)     goal ≤ 0.3  (time)

All configurations run on the same packed batches, one batch at a time in turn (the order rotating), so
load from other processes falls on all of them alike. Ratios are given from the total times and as the
median of the per-batch ratios, which a loaded machine disturbs less. "sums alone" times the BLAS products
kᵀk by themselves, on as many keys per batch: with them as the only cost above a bare pass, (a) and (c) could
at best reach the bounds printed last.

    python benchmarks/bench_stats.py [--docs 200] [--layers 3,4,5,6,7] [--corpus ../shared/data/wiki.valid.raw]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kedit_ray.models import LM, StopForward, TraceDict, load, weight_of
from kedit_ray.stats import corpus
from kedit_ray.stats.accumulate import Partial, add_batch, batches, gram, tokenize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE_TOKENS_PER_S = 274  # the reference suite's layer statistics on this machine


def sync() -> None:
    """Wait for the GPU's queued work, so that the clock reads what it did (nothing to wait for on the CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Callable], items: list[tuple]) -> dict[str, list[float]]:
    """Seconds of each run on each item, `runs[name](*item)`: the runs take turns item by item, the order
    rotating, so load from other processes falls on all of them alike."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for b, item in enumerate(items):
        for name in names[b % len(names):] + names[:b % len(names)]:
            t = time.perf_counter()
            runs[name](*item)
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def bare_pass(lm: LM, layer: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A forward pass stopped where the stats pass for layers up to `layer` stops (the input of its MLP output
    projection), with no other hooks and no sums."""
    def stop(_x, _name):
        raise StopForward

    def run(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.no_grad(), TraceDict(lm.model, [lm.arch.name("mlp_out", layer)], edit_input=stop):
            lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device), use_cache=False)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(DATA / "wiki.valid.raw"))
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--layers", default="3,4,5,6,7")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    lm = load("gemma-3-270m")
    docs = [d for _, d in zip(range(args.docs), corpus.documents(args.corpus))]
    packed = list(batches(lm.tok, tokenize(lm.tok, docs, args.max_len), args.batch_tokens))

    d_in = weight_of(lm.model.get_submodule(lm.arch.name("mlp_out", max(layers)))).shape[1]
    keys = torch.randn(max(int(m.sum()) for _, m in packed), d_in)

    def sums(_ids, mask):  # the BLAS products alone, as many keys as the batch has: the floor of their cost
        for _ in layers:
            gram(keys[:int(mask.sum())])

    runs = {"bare": bare_pass(lm, max(layers)), "sums alone": sums,
            "one pass": lambda ids, mask, p=Partial(): add_batch(lm, layers, "mlp_out", ids, mask, p)}
    for layer in layers:  # each keeps its own running sums, as a real run does
        runs[f"layer {layer}"] = lambda ids, mask, p=Partial(), layer=layer: add_batch(lm, [layer], "mlp_out", ids,
                                                                                        mask, p)
    for run in runs.values():  # warm up on the shortest batch
        run(*packed[-1])
    load_before = os.getloadavg()[0]
    times = interleaved(runs, packed)
    tokens = sum(int(m.sum()) for _, m in packed)
    total = {name: sum(ts) for name, ts in times.items()}

    def ratio(num, den) -> str:
        per_batch = statistics.median(sum(times[n][b] for n in num) / sum(times[d][b] for d in den)
                                      for b in range(len(packed)))
        return f"{sum(total[n] for n in num) / sum(total[d] for d in den):.2f} (median per batch {per_batch:.2f})"

    singles = [f"layer {layer}" for layer in layers]
    deepest = f"layer {max(layers)}"
    print(f"gemma-3-270m, {len(docs)} documents of {Path(args.corpus).name}, {tokens:,} tokens in {len(packed)} "
          f"batches, layers {args.layers}, max_len {args.max_len}, batch_tokens {args.batch_tokens}, "
          f"{torch.get_num_threads()} threads, load average {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    for name, s in total.items():
        print(f"  {name:>10}: {s:7.1f} s  {tokens / s:7.0f} tokens/s")
    print(f"(a) stats throughput / bare forward to layer {max(layers)}: {ratio(['bare'], ['one pass'])}   (goal ≥ 0.85)")
    print(f"(b) {len(layers)} layers in one pass / layer {max(layers)} alone: {ratio(['one pass'], [deepest])}"
          f"   (goal ≤ 1.3)")
    print(f"(c) {len(layers)} layers in one pass / {len(layers)} single-layer passes: {ratio(['one pass'], singles)}"
          f"   (goal ≤ 0.3)")
    bound = total["bare"] / (total["bare"] + total["sums alone"])
    floor_c = (total["bare"] + total["sums alone"]) / sum(total[n] for n in singles)
    print(f"with the sums' products as the only cost above a bare pass: (a) ≤ {bound:.2f}, (c) ≥ {floor_c:.2f}")
    print(f"stats: {tokens / total['one pass']:.0f} tokens/s for {len(layers)} layers in one pass (single layers "
          f"above); the reference suite: {REFERENCE_TOKENS_PER_S} tokens/s for one layer, "
          f"target ≥ {4 * REFERENCE_TOKENS_PER_S}")


if __name__ == "__main__":
    main()

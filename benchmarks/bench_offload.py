"""ROME with the edited layer offloaded to disk against the same model in memory, on gemma-3-270m: the deltas'
relative difference (float64) and the seconds per edit of each, side by side with their ratio.

    .venv/bin/python benchmarks/bench_offload.py [--cases 3] [--threads 2]

The offloaded model's device map puts every module on the CPU but the edited block, which goes to "disk": its
weights stay in the checkpoint's safetensors and accelerate loads them for each pass.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kedit_ray.datasets import load_requests
from kedit_ray.editors import Rome
from kedit_ray.models import load
from kedit_ray.models.weights import is_offloaded

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


def device_map(lm, offloaded: str) -> dict[str, str]:
    """Every top-level module and every block on the CPU, `offloaded` on disk."""
    out = {}
    for name, _ in lm.model.named_children():
        if name == "model":
            for sub, _ in lm.model.model.named_children():
                if sub == "layers":
                    out.update({lm.arch.name("layer", i): "cpu" for i in range(lm.n_layers)})
                else:
                    out[f"model.{sub}"] = "cpu"
        else:
            out[name] = "cpu"
    return {**out, offloaded: "disk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain = load(args.model)
    rome = Rome()
    block = plain.arch.name("layer", rome.layer(plain))
    edited = plain.arch.name("mlp_out", rome.layer(plain))
    with tempfile.TemporaryDirectory() as folder:
        off = load(args.model, device_map=device_map(plain, block), offload_folder=folder)
        assert is_offloaded(off.model, f"{edited}.weight")
        cases, _ = load_requests(args.data, limit=args.cases)
        editors = {"plain": (plain, Rome()), "offloaded": (off, Rome())}
        for lm, ed in editors.values():      # warm-up: C, context prefixes, first-call overheads
            ed.edit(lm, cases[0])
        seconds: dict[str, list[float]] = {k: [] for k in editors}
        diffs = []
        for case in cases:
            deltas = {}
            for mode, (lm, ed) in editors.items():   # interleaved: machine noise hits both alike
                t0 = time.perf_counter()
                deltas[mode] = ed.edit(lm, case)
                seconds[mode].append(time.perf_counter() - t0)
            a, b = deltas["offloaded"].deltas[edited].double(), deltas["plain"].deltas[edited].double()
            diffs.append(((a - b).norm() / b.norm()).item())
        cov = deltas["plain"].meta["cov"]
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"ROME on {args.model}, {len(cases)} cases, {edited} ({block} on disk), C: {cov}, {args.threads} threads")
    print(f"relative difference of the deltas, offloaded vs plain: max {max(diffs):.2e} "
          f"(per case: {', '.join(f'{d:.1e}' for d in diffs)})")
    print(f"s/edit: plain {med['plain']:.2f}, offloaded {med['offloaded']:.2f}, "
          f"ratio {med['offloaded'] / med['plain']:.2f}")


if __name__ == "__main__":
    main()

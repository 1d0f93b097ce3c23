"""How fragile zsRE's retain is on a model: per case, the unedited model's smallest gap between its top two
log-probabilities over the loc answer's tokens (teacher-forced after loc + "?", as the zsRE scores ask it).

    .venv/bin/python benchmarks/retain_ties.py [--model gemma-3-270m] [--limit 50]

Retain counts a case only if every one of those tokens keeps its argmax, so a case whose gap is g is lost by any
edit that moves that token's top-two log-probability difference by more than g.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kedit_ray.datasets import load_requests
from kedit_ray.editors.toolkit import target_ids
from kedit_ray.eval.zsre import loc_prompt
from kedit_ray.models import load

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train-1k.json"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=50)
    args = ap.parse_args()
    lm = load(args.model)
    cases, _ = load_requests(args.data, "zsre", limit=args.limit, skip_invalid=True)
    gaps = []
    for r in cases:
        ctx, y = lm.tok(loc_prompt(r.neighborhood_prompts[0])).input_ids, target_ids(lm, r.neighborhood_answers[0])
        logits = lm.model(input_ids=torch.tensor([ctx + y[:-1]], device=lm.input_device)).logits[0, len(ctx) - 1:]
        top = torch.log_softmax(logits.double(), -1).topk(2, -1).values
        gaps.append((top[:, 0] - top[:, 1]).min().item())
    g = torch.tensor(gaps)
    for t in (0.05, 0.1, 0.25, 0.5, 1.0):
        n = int((g < t).sum())
        print(f"cases whose smallest top-2 gap < {t} nats: {n} of {len(g)} ({n / len(g):.2f})")


if __name__ == "__main__":
    main()

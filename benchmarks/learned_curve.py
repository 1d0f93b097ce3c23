"""Learning curve of a learned editor (KE, MEND): one training run of max(`--at`) steps (as `kedit train` runs it,
resuming the checkpoint in --out), a copy of its checkpoint at each of `--at` steps (OUT/step-N), then each copy
scored on the first `--holdout` zsRE records, never trained on.

    .venv/bin/python benchmarks/learned_curve.py --method ke --at 200,400,600 --out runs/ke-curve [--net '{...}']

Prints one row per point: steps, training seconds so far, success / equivalence / retain (the shares of cases whose
efficacy, paraphrase and locality scores are all 1) and the token-level scores.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from kedit_ray.datasets import load_requests
from kedit_ray.editors import make_editor
from kedit_ray.editors.learned import read_meta
from kedit_ray.eval.protocols import run_batch
from kedit_ray.eval.summary import summarize
from kedit_ray.models import load
from kedit_ray.train import TrainConfig, train_loop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train-1k.json"
SHOWN = ("success_rate", "equivalence_accuracy", "retain_accuracy", "efficacy_score", "paraphrase_score",
         "neighborhood_score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", required=True, choices=["ke", "mend"])
    ap.add_argument("--at", default="200,400,600", help="the step counts to score at")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--holdout", type=int, default=50)
    ap.add_argument("--net", default="{}", help="KEConfig / MENDConfig fields as JSON")
    ap.add_argument("--train", default="{}", help="TrainConfig fields as JSON (lr, batch_size, ...)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load("gemma-3-270m")
    cases, _ = load_requests(args.data, "zsre", limit=args.holdout, skip_invalid=True)
    at = sorted(int(x) for x in args.at.split(","))
    cfg = TrainConfig(args.method, args.data, args.out, steps=at[-1], holdout=args.holdout, threads=args.threads,
                      net=json.loads(args.net), **json.loads(args.train))
    if any(n % cfg.save_every for n in at):
        raise SystemExit(f"--at {args.at}: each point must be a multiple of save_every ({cfg.save_every})")

    def keep(figures: dict) -> None:                     # the checkpoint of this step is written: copy it
        if figures["step"] in at:
            meta, dest = read_meta(args.out), Path(args.out) / f"step-{figures['step']}"
            dest.mkdir(exist_ok=True)
            for name in (meta["weights"], "editor.json"):
                shutil.copy(Path(args.out) / name, dest / name)

    train_loop(asdict(cfg), lm=lm, report=keep)
    print("| steps | train s | " + " | ".join(SHOWN) + " |", flush=True)
    for steps in at:
        where = str(Path(args.out) / f"step-{steps}")
        s = summarize(run_batch(lm, make_editor(args.method, {"editor_checkpoint": where}), cases, 1, args.method,
                                scorer="zsre", progress=False))
        train_s = read_meta(where)["train_s"]
        print(f"| {steps} | {train_s:.0f} | " + " | ".join(f"{s[k]:.2f}" for k in SHOWN) + " |", flush=True)


if __name__ == "__main__":
    main()

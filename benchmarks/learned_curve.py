"""Learning curve of a learned editor (KE, MEND): one training run of max(`--at`) steps (as `kedit train` runs it,
resuming the checkpoint in --out), a copy of its checkpoint at each of `--at` steps (OUT/step-N), then each copy
scored on the first `--holdout` zsRE records, never trained on.

    .venv/bin/python benchmarks/learned_curve.py --method ke --at 200,400,600 --out runs/ke-curve [--net '{...}']

Prints one row per point: steps, training seconds so far, success / equivalence / retain (the shares of cases whose
efficacy, paraphrase and locality scores are all 1) and the token-level scores. Each point's scores are kept in
OUT/step-N/scores.json (a rerun with more points trains on and scores only the new ones); OUT/curve.json holds the
rows and OUT/curve.png draws them.
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
from kedit_ray.io import atomic_write, write_json
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
    rows = []
    print("| steps | train s | " + " | ".join(SHOWN) + " |", flush=True)
    for steps in at:
        where = Path(args.out) / f"step-{steps}"
        if not (where / "scores.json").exists():
            s = summarize(run_batch(lm, make_editor(args.method, {"editor_checkpoint": str(where)}), cases, 1,
                                    args.method, scorer="zsre", progress=False))
            write_json(where / "scores.json", {k: s[k] for k in SHOWN})
        rows.append({"steps": steps, "train_s": read_meta(where)["train_s"],
                     **json.loads((where / "scores.json").read_text())})
        print(f"| {steps} | {rows[-1]['train_s']:.0f} | " + " | ".join(f"{rows[-1][k]:.2f}" for k in SHOWN) + " |",
              flush=True)
    write_json(Path(args.out) / "curve.json", {"method": args.method, "net": cfg.net, "train": json.loads(args.train),
                                               "holdout": args.holdout, "rows": rows})
    plot(Path(args.out) / "curve.png", args.method, rows)


def plot(path: Path, method: str, rows: list[dict]) -> None:
    """Success, equivalence and retain against training steps, the issue's goals dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["steps"] for r in rows]
    for key, label in zip(SHOWN[:3], ("success", "equivalence", "retain")):
        ax.plot(steps, [r[key] for r in rows], marker="o", label=label)
    for goal, what in ((0.85, "goal: success"), (0.95, "goal: retain")):
        ax.axhline(goal, color="grey", ls="--", lw=0.8)
        ax.text(steps[0], goal + 0.01, what, fontsize=6, color="grey")
    ax.set(xlabel="training steps", ylabel=f"share of {method} edits", ylim=(0, 1), title=f"{method} learning curve")
    ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


if __name__ == "__main__":
    main()

"""What each evaluation figure costs per case on gemma-3-270m, side by side with the teacher-forced scores every run
pays (issue 19): the generated answers (--generate), fluency (--fluency), portability (zsRE with the portability
block against the same records without it) and one perplexity measurement (--ppl-docs N).

    .venv/bin/python benchmarks/bench_metrics.py [--cases 10] [--ppl-docs 5] [--threads 1]

Every figure is timed on the same unedited model in one process, case by case, each case's figures one after the
other (so load on the machine falls on all of them alike); the table gives the median seconds per case and the ratio
to the dataset's teacher-forced scores.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--ppl-docs", type=int, default=5)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from kedit_ray.datasets import load_requests
    from kedit_ray.eval import score
    from kedit_ray.eval.counterfact import fluency
    from kedit_ray.eval.generated import generate, generated_scores
    from kedit_ray.eval.perplexity import corpus_docs, perplexity
    from kedit_ray.models import load

    torch.set_num_threads(args.threads)
    lm = load(args.model)
    cf, _ = load_requests(str(DATA / "counterfact-edit.json"), "counterfact", limit=args.cases)
    zs, _ = load_requests(str(DATA / "zsre_portability.json"), "zsre", limit=args.cases)
    docs = corpus_docs(args.ppl_docs)
    generate(lm, [cf[0].text], 2)   # warm-up
    runs = {"counterfact": [], "zsre": []}
    for req in cf:
        runs["counterfact"].append({
            "teacher-forced scores": timed(lambda: score("counterfact", lm, req)),
            "--generate": timed(lambda: generated_scores(lm, req)),
            "--fluency": timed(lambda: fluency(generate(lm, [req.text, *req.paraphrase_prompts]))),
            f"--ppl-docs {args.ppl_docs} (per measurement)": timed(lambda: perplexity(lm, docs))})
    for req in zs:
        bare = replace(req, portability_prompts=[], portability_answers=[])
        pre = score("zsre", lm, bare)
        runs["zsre"].append({
            "teacher-forced scores": timed(lambda: score("zsre", lm, bare, pre)),
            "with portability": timed(lambda: score("zsre", lm, req, pre)),
            "--generate": timed(lambda: generated_scores(lm, req))})
    print(f"{args.model}, {args.cases} cases each, {args.threads} thread(s); median seconds per case (per model "
          "state: a run pays each figure before and after the edit)")
    for dataset, rows in runs.items():
        print(f"\n{dataset}:")
        base = statistics.median(r["teacher-forced scores"] for r in rows)
        for name in rows[0]:
            s = statistics.median(r[name] for r in rows)
            print(f"  {name:36}{s:8.3f} s {s / base:8.2f}x")


if __name__ == "__main__":
    main()

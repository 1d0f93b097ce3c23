"""A sequential checkpoint's scoring on 2 workers against 1, side by side in one run.

    .venv/bin/python benchmarks/bench_checkpoint.py [--edits 300] [--held-out 100] [--model gemma-3-270m]

The same sequential UltraEdit run (one turn of `--edits` CounterFact edits, then a checkpoint scoring every edit
and the held-out cases) with `--workers 1` (1 CPU: the pool's one actor) and `--workers 2` (1 CPU each): the
cases per second of the checkpoint's scoring (OUT/checkpoints.json: cases scored / seconds) and their ratio
(issue 27: ≥ 1.7×), and whether the rows agree. Each worker has one torch thread: the one worker runs in this
process (as `--workers 1` does, without Ray's overhead), the two are Ray actors. Needs the machine's 2 cores
free: check `uptime` first. A checkpoint pays a few seconds whatever its size (the workers' sync of Σ ΔW, Ray's
own processes on the same 2 cores), so small ones understate the ratio: 200 + 100 cases gave 1.56×, 300 + 100 1.70×.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


def run(workers: int, args: argparse.Namespace, out: Path) -> tuple[float, list]:
    """(checkpoint cases per second, the rows' figures) of one run."""
    import ray

    from kedit_ray.datasets import load_requests
    from kedit_ray.distributed.batch import run_protocol_eval
    from kedit_ray.results import read_results
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    requests = load_requests(DATA, limit=args.edits + args.held_out)[0]
    edit, held = requests[:args.edits], requests[args.edits:]
    spec = EvalSpec(ModelSpec(args.model), "ultraedit", {}, "counterfact", protocol="sequential",
                    batch_size=args.edits, held_out=[r.case_id for r in held],
                    resources=Resources(workers, cpus_per_worker=1.0))
    if workers > 1:
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        run_protocol_eval(spec, edit, out, held, progress=False)
    finally:
        ray.shutdown()
    [log] = json.loads((out / "checkpoints.json").read_text())
    table = read_results(out).sort_by("case_id")
    return log["scored"] / log["score_s"], list(zip(*(table[c].to_pylist() for c in (
        "case_id", "efficacy_score", "neighborhood_score", "efficacy_magnitude"))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=300)
    p.add_argument("--held-out", type=int, default=100)
    p.add_argument("--model", default="gemma-3-270m")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, rows1 = run(1, args, Path(tmp) / "one")
        two, rows2 = run(2, args, Path(tmp) / "two")
    same = all(a[:3] == b[:3] and abs(a[3] - b[3]) < 1e-5 for a, b in zip(rows1, rows2)) and len(rows1) == len(rows2)
    print(f"{args.model}, UltraEdit, a checkpoint of {args.edits} edits + {args.held_out} held-out cases")
    print(f"  1 worker    {one:6.2f} cases/s")
    print(f"  2 workers   {two:6.2f} cases/s")
    print(f"  ratio       {two / one:6.2f}x  (issue 27: ≥ 1.7x); rows agree: {same}")


if __name__ == "__main__":
    main()

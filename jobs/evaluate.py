"""`kedit eval` as a Ray job: the same arguments, joining the cluster it runs on (--address auto).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/evaluate.py --method rome --data counterfact-edit.json --workers 8 --out /shared/runs/rome

The job's `python` is the head's: start the head (`ray start --head`) with the kedit-ray environment active, or
name its python absolutely (`-- /path/to/.venv/bin/python jobs/evaluate.py ...`). --data may be relative (it is
read from the uploaded copy of the working directory); --out must be absolute. The job prints where the results
went.
"""
from __future__ import annotations

import sys
from pathlib import Path

from paths import absolute_inputs, refuse_relative_outputs

from kedit_ray.cli import main


def job_argv(argv: list[str]) -> list[str]:
    """`kedit eval` arguments: --data absolute, --out refused when relative, --address auto unless one is given."""
    refuse_relative_outputs(argv, ("--out",), "jobs/evaluate.py")
    argv = absolute_inputs(argv, ("--data", "--editor-checkpoint", "--stats-corpus"))
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return ["eval", *argv]
    return ["eval", "--address", "auto", *argv]


def out_of(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--out="):
            return Path(arg.partition("=")[2])
        if arg == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
    return None


if __name__ == "__main__":
    args = job_argv(sys.argv[1:])
    code = main(args)
    if (out := out_of(args)) is not None:
        print(f"results: {out / 'results'} (summary: {out / 'summary.json'})", flush=True)
    sys.exit(code)

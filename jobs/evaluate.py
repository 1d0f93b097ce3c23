"""`kedit eval` as a Ray job: the same arguments, joining the cluster it runs on (--address auto).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/evaluate.py --method rome --data counterfact-edit.json --workers 8 --out /shared/runs/rome

The job's `python` is the head's: start the head (`ray start --head`) with the kedit-ray environment active, or
name its python absolutely (`-- /path/to/.venv/bin/python jobs/evaluate.py ...`). Inputs may be relative (they
are read from the uploaded copy of the working directory); outputs (--out, and `stats`' --cache) must be
absolute. The job prints where the results went.
"""
from __future__ import annotations

import sys
from pathlib import Path

from paths import absolute_inputs, refuse_relative_outputs

from kedit_ray.cli import main

INPUTS = {"eval": ("--data", "--editor-checkpoint", "--stats-corpus", "--ike-pool"), "stats": ("--corpus",)}
OUTPUTS = {"eval": ("--out",), "stats": ("--cache",)}


def job_argv(command: str, argv: list[str]) -> list[str]:
    """`kedit COMMAND` arguments: inputs made absolute, a relative output refused, --address auto unless one is
    given."""
    refuse_relative_outputs(argv, OUTPUTS[command], f"jobs ({command})")
    argv = absolute_inputs(argv, INPUTS[command])
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return [command, *argv]
    return [command, "--address", "auto", *argv]


def out_of(argv: list[str]) -> Path | None:
    """The value of --out in `argv`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--out="):
            return Path(arg.partition("=")[2])
        if arg == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
    return None


if __name__ == "__main__":
    args = job_argv("eval", sys.argv[1:])
    code = main(args)
    if (out := out_of(args)) is not None:
        print(f"results: {out / 'results'} (summary: {out / 'summary.json'})", flush=True)
    sys.exit(code)

"""`kedit suite` as a Ray job: the same arguments, joining the cluster it runs on (--address auto).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/suite.py docs/results/record.toml --workers 8 --gpus-per-worker 1 --out /shared/runs/record

As for jobs/evaluate.py: the job's `python` is the head's; the suite file and the relative paths inside it are
read from the uploaded copy of the working directory (data outside it needs an absolute path in the file); --out
must be absolute. The job prints where the report went.
"""
from __future__ import annotations

import sys
from pathlib import Path

from evaluate import out_of
from paths import refuse_relative_outputs

from kedit_ray.cli import main


def job_argv(argv: list[str]) -> list[str]:
    """`kedit suite` arguments: FILE (the first argument) made absolute, a relative --out refused, --address auto
    unless one is given."""
    refuse_relative_outputs(argv, ("--out",), "jobs (suite)")
    if argv and not argv[0].startswith("-"):
        argv = [str(Path(argv[0]).resolve()), *argv[1:]]
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return ["suite", *argv]
    return ["suite", "--address", "auto", *argv]


if __name__ == "__main__":
    args = job_argv(sys.argv[1:])
    code = main(args)
    if (out := out_of(args)) is not None:
        print(f"report: {out / 'report.txt'} (figure: {out / 'report.png'}; one folder per run)", flush=True)
    sys.exit(code)

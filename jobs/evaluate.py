"""`kedit eval` as a Ray job: the same arguments, joining the cluster it runs on (--address auto).

    ray job submit --address http://HEAD:8265 -- python jobs/evaluate.py --method rome --out runs/rome ...
"""
from __future__ import annotations

import sys

from kedit_ray.cli import main


def job_argv(command: str, argv: list[str]) -> list[str]:
    """`kedit COMMAND` arguments, with --address auto unless one is given."""
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return [command, *argv]
    return [command, "--address", "auto", *argv]


if __name__ == "__main__":
    sys.exit(main(job_argv("eval", sys.argv[1:])))

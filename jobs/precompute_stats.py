"""`kedit stats` as a Ray job: the same arguments, the shards summed by workers across the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/precompute_stats.py --model gemma-3-270m --layers 3-7 --corpus /data/wiki --samples 100000 \\
            --workers 8 --cache /shared/kedit/stats

The job joins the cluster it runs on (--address auto unless given); even --workers 1 runs on a worker actor.
--cache must be absolute (a relative one would vanish with the job's copy of the working directory); it should be
a directory every node reaches only if editors elsewhere must read the files; the driver alone writes them.
"""
from __future__ import annotations

import argparse
import sys

from paths import absolute_inputs, refuse_relative_outputs

from kedit_ray.stats import command


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_relative_outputs(argv, ("--cache",), "jobs/precompute_stats.py")
    parser = argparse.ArgumentParser(prog="precompute_stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    args = parser.parse_args(absolute_inputs(argv, ("--corpus",)))
    args.address = args.address or "auto"
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())

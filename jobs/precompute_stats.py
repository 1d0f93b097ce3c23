"""`kedit stats` as a Ray job: the same arguments, the shards summed by workers across the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/precompute_stats.py --model gemma-3-270m --layers 3-7 --corpus /data/wiki --samples 100000 \\
            --workers 8 --cache /shared/kedit/stats

The job joins the cluster it runs on (--address auto unless one is given); even --workers 1 runs on a worker
actor. --cache must be absolute (a relative one would vanish with the job's copy of the working directory); it
should be a directory every node reaches only if editors elsewhere must read the files; the driver alone writes
them.
"""
from __future__ import annotations

import sys

from evaluate import job_argv

from kedit_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(job_argv("stats", sys.argv[1:])))

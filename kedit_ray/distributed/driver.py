"""The `kedit eval` driver: EditRequests → a pool of EditWorkers → Parquet parts → summary.json.

Resume: cases with a row in OUT/results are skipped, errored ones included, so no case_id is
ever written twice. `retry_errors=True` first deletes the error rows, then reruns those cases.

Scheduling: one case in flight per actor, so a slow worker holds one case and a dead actor's
case is known exactly. Ray restarts a dead actor once and retries its case there
(max_restarts=1, max_task_retries=1); an actor that dies for good is replaced (at most
`workers` times per run) and its case goes back to the queue; a case that took two actors
down becomes an error row. (Ray's ActorPool would hand a dead actor out again, hence the
small loop here.)
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from tqdm import tqdm

from kedit_ray.distributed.sink import PartWriter, check_config, drop_error_rows, finished_case_ids, read_results
from kedit_ray.distributed.worker import EditWorker, error_row
from kedit_ray.eval.summary import summarize
from kedit_ray.io import write_json
from kedit_ray.requests import EditRequest

MAX_CASE_DEATHS = 2


def _start_ray(address: str | None, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> bool:
    """Join or start Ray; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    ray.init(address="local", num_cpus=max(1, math.ceil(workers * cpus_per_worker)), include_dashboard=False,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    need, have = workers * gpus_per_worker, ray.cluster_resources().get("GPU", 0)
    if need > have:
        ray.shutdown()
        raise ValueError(f"{workers} workers × {gpus_per_worker} GPU need {need} GPUs; this machine has {have:g}")
    return True


def _dispatch(config: dict, todo: list[EditRequest], writer: PartWriter, bar: tqdm, workers: int,
              options: dict) -> None:
    threads = max(1, int(options["num_cpus"]))

    def spawn(index: int):
        return EditWorker.options(**options).remote(config, index, threads)

    actors = {spawn(i): i for i in range(workers)}
    try:
        _loop(config, todo, writer, bar, actors, spawn)
    finally:  # free the resources even when Ray outlives this run (a job, a notebook)
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _loop(config: dict, todo: list[EditRequest], writer: PartWriter, bar: tqdm, actors: dict, spawn) -> None:
    """Hand cases to idle actors one at a time; write each returned row. `actors` maps actor → index."""
    ray.get([a.ready.remote() for a in actors])  # a runner that cannot start fails the run here
    queue, idle = deque(todo), list(actors)
    inflight: dict = {}
    deaths: Counter = Counter()
    replacements, errors = len(actors), 0
    while queue or inflight:
        while queue and idle:
            actor, request = idle.pop(), queue.popleft()
            inflight[actor.run.remote(request)] = (actor, request)
        if not inflight:
            raise RuntimeError("every worker died; the cases done so far are saved, rerun to resume")
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=writer.max_seconds)
        writer.maybe_flush()
        for ref in ready:
            actor, request = inflight.pop(ref)
            try:
                row = ray.get(ref)
                idle.append(actor)
            except ActorUnavailableError:
                queue.appendleft(request)
                idle.append(actor)
                continue
            except RayActorError as exc:  # died for good
                index = actors.pop(actor)
                if replacements:
                    replacements -= 1
                    new = spawn(index)
                    actors[new] = index
                    idle.append(new)
                deaths[request.case_id] += 1
                if deaths[request.case_id] < MAX_CASE_DEATHS:
                    queue.appendleft(request)
                    continue
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                row = error_row(config, request, RuntimeError(f"the case took down {MAX_CASE_DEATHS} workers: {cause}"))
            errors += row.get("error") is not None
            writer.add(row)
            bar.update(1)
            bar.set_postfix(errors=errors, refresh=False)


def run_eval(config: dict, requests: list[EditRequest], out: str, workers: int, cpus_per_worker: float = 1,
             gpus_per_worker: float = 0, address: str | None = None, progress: bool = True,
             retry_errors: bool = False) -> dict:
    """Evaluate `requests` on `workers` EditWorkers; results in OUT/results, returns OUT/summary.json's dict.

    `config` holds "model", "method", the editor's hyperparameters and optionally "runner"
    ("module:qualname"). address None starts a local Ray on 127.0.0.1; "auto" or "host:port"
    joins a cluster; an already initialised Ray is reused. Ray is shut down only if started here.
    """
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    ids = Counter(r.case_id for r in requests)
    if dupes := sorted(i for i, n in ids.items() if n > 1):
        raise ValueError(f"case_ids must be unique; repeated: {dupes[:10]}")
    out_dir = Path(out)
    config = check_config(out_dir, config)
    if retry_errors:
        drop_error_rows(out_dir)
    done = finished_case_ids(out_dir)
    todo = sorted((r for r in requests if r.case_id not in done), key=lambda r: r.case_id)
    start = time.time()
    try:
        if todo:
            started = _start_ray(address, workers, cpus_per_worker, gpus_per_worker)
            options = dict(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=1, max_task_retries=1)
            try:
                with PartWriter(out_dir) as writer, tqdm(total=len(requests), initial=len(requests) - len(todo),
                                                         unit="case", desc=f"eval {config.get('method', '')}",
                                                         disable=not progress, dynamic_ncols=True) as bar:
                    _dispatch(config, todo, writer, bar, min(workers, len(todo)), options)
            finally:
                if started:
                    ray.shutdown()
    finally:
        summary = summarize(read_results(out_dir))
        finished = finished_case_ids(out_dir)
        summary.update(wall_seconds=time.time() - start, workers=workers,
                       complete=all(r.case_id in finished for r in requests))
        write_json(out_dir / "summary.json", summary)
    return summary

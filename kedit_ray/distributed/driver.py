"""The `kedit eval` driver, single protocol: EditRequests → the pool's EditWorkers → Parquet parts → summary.

Before any model loads: OUT/results must be writable, and results already there must be of the same settings
(config.json; a run that wrote no row locks nothing). Resume: cases with a row in OUT/results are skipped,
errored ones included, so no case_id is ever written twice (a damaged part is quarantined first, so exactly its
cases run again); `retry_errors=True` first deletes the error rows. Each row is written as its case finishes;
the parts are compacted when the run ends. The pool's fault policy (pool.py) requeues the case of a worker that
died; a case that took two workers down becomes an error row.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from kedit_ray.distributed.pool import Lost, open_pool
from kedit_ray.distributed.worker import ModelWorker
from kedit_ray.eval.summary import summarize
from kedit_ray.io import write_json
from kedit_ray.requests import EditRequest
from kedit_ray.results import (PartWriter, check_config, check_writable, compact, drop_error_rows, finished_case_ids,
                               read_results)
from kedit_ray.spec import RUN_ONLY, EvalSpec


def load_runner(spec: str) -> type:
    """"package.module:Class" → the class. Its module must import on every node (kedit_ray is installed there; a
    module of your own goes in via PYTHONPATH or `ray job submit --runtime-env-json`)."""
    module, _, qualname = spec.partition(":")
    if not qualname:
        raise ValueError(f"runner must be 'module:qualname', got {spec!r}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def error_row(spec: EvalSpec, request: EditRequest, message: str) -> dict:
    """The row of a failed case: metrics null, `error` = what went wrong."""
    return {"case_id": request.case_id, "method": spec.method, "model": spec.model.name, "error": message}


class EditWorker(ModelWorker):
    """Runs cases one at a time with the spec's runner (default: kedit_ray.eval.runner.CaseRunner). A case whose
    runner raises becomes a row with `error` set. A runner class with `needs_model = False` gets no model."""

    def __init__(self, spec: EvalSpec, index: int, cpus: float, gpus: list | None = None):
        runner = load_runner(spec.runner)
        super().__init__(spec.model if getattr(runner, "needs_model", True) else None, index, cpus, gpus)
        self.serve(spec)

    def serve(self, spec: EvalSpec) -> None:
        """Run `spec`'s cases from now on, on the model already loaded (a suite's worker serves run after run)."""
        self.spec = spec
        self.runner = load_runner(spec.runner)(spec, self.lm)
        self.editor = getattr(self.runner, "editor", None)

    def run(self, request: EditRequest) -> dict:
        try:
            row = dict(self.runner.run(request))
        except Exception as exc:  # noqa: BLE001 - any failure of one case becomes its error row
            print(f"case {request.case_id} failed on {self.name}:\n{traceback.format_exc()}", file=sys.stderr)
            row = error_row(self.spec, request, f"{type(exc).__name__}: {exc}")
        row["worker"] = self.name
        return row


def share_covariances(pool, spec: EvalSpec) -> None:
    """Resolve the editor's C once, here (its missing layer statistics summed by the pool's own workers), and hand
    it to every worker through the object store: a worker on a node whose stats cache is empty uses it too."""
    found = pool.call("stats_need")
    if found is None:
        return
    from kedit_ray.editors.covariance import read_covariances

    need, compute = found
    covs = read_covariances(spec.model.name, need, compute, pool=pool)
    pool.broadcast("use_covariances", pool.put(covs))


def prepare(spec: EvalSpec, requests: list[EditRequest], out: Path) -> None:
    """What every protocol checks before a model loads: unique case_ids, a writable OUT, the same settings."""
    ids = Counter(r.case_id for r in requests)
    if dupes := sorted(i for i, n in ids.items() if n > 1):
        raise ValueError(f"case_ids must be unique; repeated: {dupes[:10]}")
    check_writable(out)
    check_config(out, spec.to_json(), RUN_ONLY, EvalSpec.from_json)


# what `finish` adds to the aggregates in summary.json (docs/reference/results.md describes each)
RUN_FIELDS = ("wall_seconds", "requested", "complete", "workers", "protocol", "batch_size", "timings", "stopped_at",
              "checkpoint_sample", "checkpoint_log")


def finish(out: Path, requests: list[EditRequest], start: float, dataset: str | None = None, **extra) -> dict:
    """Compact the parts, write and return summary.json: the aggregates, `requested` cases, `complete`, and
    `extra`, whose keys must be RUN_FIELDS'."""
    if unknown := set(extra) - set(RUN_FIELDS):
        raise ValueError(f"summary fields {sorted(unknown)} are not in RUN_FIELDS")
    compact(out)
    table = read_results(out)
    summary = summarize(table) if dataset is None else summarize(table, dataset)
    finished = set(table["case_id"].to_pylist())
    summary.update(wall_seconds=time.time() - start, requested=len(requests), **extra,
                   complete=all(r.case_id in finished for r in requests))
    write_json(out / "summary.json", summary)
    return summary


def run_eval(spec: EvalSpec, requests: list[EditRequest], out: str | Path, progress: bool = True,
             retry_errors: bool = False) -> dict:
    """Evaluate `requests` (single protocol) on spec.resources; results in OUT/results, returns the summary
    (also OUT/summary.json): `cases`, `errors`, `requested` and `complete` among the aggregates."""
    out = Path(out)
    prepare(spec, requests, out)
    if retry_errors:
        drop_error_rows(out)
    done = finished_case_ids(out)
    todo = sorted((r for r in requests if r.case_id not in done), key=lambda r: r.case_id)
    start = time.time()
    try:
        if todo:
            with open_pool(EditWorker, (spec,), spec.resources, size=len(todo)) as pool, PartWriter(out) as writer, \
                    tqdm(total=len(requests), initial=len(requests) - len(todo), unit="case",
                         desc=f"eval {spec.method}", disable=not progress, dynamic_ncols=True) as bar:
                share_covariances(pool, spec)
                errors = 0
                for request, row in pool.stream(todo, "run"):
                    if isinstance(row, Lost):
                        row = error_row(spec, request, f"RuntimeError: the case {row.message}")
                    writer.add(row)
                    errors += row.get("error") is not None
                    bar.update(1)
                    bar.set_postfix(errors=errors, refresh=False)
    finally:
        summary = finish(out, requests, start, workers=spec.resources.workers)
    return summary

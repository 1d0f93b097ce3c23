"""The batch and sequential protocols over the pool (`kedit eval --protocol batch|sequential`).

MEMIT-family editors (they expose targets / inputs / make_solver) are split over the workers:

    the batch's requests in W shares  ─►  each BatchWorker: z_i for its share (scatter, saved in rounds to OUT/z/)
    per edited layer                  ─►  each worker: (K, h) of its share with the layers done so far applied
                                          (scatter); the driver solves ΔW_l (float64, the editor's solver)
    pool.put(the Delta)               ─►  the workers score the batch's cases, a chunk at a time (stream)

Every call names the edits the worker must have applied (`Applied`, object-store refs): a worker applies what it
lacks and reverts what it should not have, so a replacement for a dead worker catches up by itself and no worker
holds state the driver lacks. AlphaEdit's kept keys K_p K_pᵀ are summed from the workers (`kept_keys`) on the
driver's solver, whose state() is saved with the run.

Other editors: in the batch protocol each worker edits and scores whole batches (stream), so every loaded model
works. In the sequential protocol one worker edits each batch (`turn`) on the model with Σ ΔW so far and the
editor's state, and hands both back; every worker scores a share of each checkpoint. An editor whose edits are not
weight deltas (GRACE's codebook) runs whole on one worker, streamed a checkpoint at a time, and loads only that one.

Rows are written as they are scored. Resume (files in kedit_ray.eval.resume): the unedited model's scores are kept
in OUT/pre_scores.json; the batch protocol skips the cases that have rows (a batch is edited again if some of its
cases lack one, and only those are written) and reads back the z a cut-short batch had saved; a sequential
MEMIT-family run saves Σ ΔW and the solver's state after each batch (OUT/run_state.safetensors) and resumes from
there, with the z its next batch had saved (OUT/z/batch-B/); one edited a batch at a time by a worker saves the
same file (Σ ΔW and the editor's own state, handed back by the worker) and resumes from it too.
"""
from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kedit_ray.distributed.driver import finish, prepare, share_covariances
from kedit_ray.distributed.pool import Lost, PoolError, open_pool
from kedit_ray.distributed.worker import Applied, ModelWorker
from kedit_ray.editors import Delta, make_editor
from kedit_ray.editors.contract import SplitEditor
from kedit_ray.editors.memit import spread
from kedit_ray.eval import Scorer
from kedit_ray.eval.perplexity import Probe, perplexity
from kedit_ray.eval.protocols import (apply_batch, batch_rows, batches, case_row, checkpoint_edits,
                                      checkpoint_figures, checkpoint_rows, edit_meta, edits_scored, error_rows,
                                      plan_checkpoints, revert_all, run_total, sequential_rows, weights_before)
from kedit_ray.eval.resume import CheckpointLog, PreScores, RunState, TargetStore
from kedit_ray.requests import EditRequest
from kedit_ray.results import PartWriter, finished_case_ids, read_results
from kedit_ray.spec import EvalSpec

Z_ROUND = 25       # requests per worker between two saves of z (at least the editor's z_batch)
SCORE_CHUNK = 25   # cases per scoring task (a task is the unit of progress and of loss)


def weight_deltas(editor) -> bool:
    """Editors whose edits are weight Deltas (a sequential run then hands Σ ΔW between workers)."""
    return editor.kind == "delta"


def distributable(editor) -> bool:
    """Editors whose keys and targets can be computed per share and solved on the driver (MEMIT, AlphaEdit)."""
    return isinstance(editor, SplitEditor)


class BatchWorker(ModelWorker):
    """The spec's editor on the worker's model: shares of z, keys and scores, or whole batches."""

    def __init__(self, spec: EvalSpec, index: int, cpus: float, gpus: list | None = None):
        super().__init__(spec.model, index, cpus, gpus)
        self.in_ray = gpus is None
        self.serve(spec)

    def serve(self, spec: EvalSpec) -> None:
        """Edit and score for `spec` from now on, on the model already loaded (a suite's worker serves run after
        run)."""
        self.spec = spec
        self.editor = make_editor(spec.method, spec.params)
        self.scorer = Scorer.of(spec)   # the dataset's figures, --generate, --fluency
        self.probe = Probe.of(spec)   # --ppl-docs
        self.editor.prepare(self.lm)

    def plan(self) -> dict:
        """What the driver's solver needs: layers, module names, d_in, C and its labels, λ."""
        hp, layers = self.editor.params(self.lm), self.editor.layers(self.lm)
        covs, labels = self.editor.covariances(self.lm)
        return {"layers": layers, "names": [self.lm.arch.name("mlp_out", layer) for layer in layers],
                "dims": self.editor.dims(self.lm), "covs": covs, "labels": labels, "model": self.lm.name,
                "lam": hp.mom2_update_weight, "z_batch": hp.z_batch, "fingerprint": self.lm.fingerprint}

    def targets(self, requests: list[EditRequest], applied: Applied) -> torch.Tensor:
        self.sync(applied)
        return self.editor.targets(self.lm, requests)[0]

    def inputs(self, requests: list[EditRequest], layer: int, applied: Applied) -> tuple:
        self.sync(applied)
        return self.editor.inputs(self.lm, requests, layer)

    def kept_keys(self, requests: list[EditRequest], applied: Applied) -> dict:
        self.sync(applied)
        return self.editor.kept_keys(self.lm, requests)

    def scores(self, cases: list[tuple[EditRequest, dict | None]], applied: Applied) -> tuple[str, list[dict]]:
        """(this worker's name, the scores of each (request, its pre-edit scores or None)) with `applied`."""
        self.sync(applied)
        return self.name, self.scorer.many(self.lm, cases)

    def turn(self, requests: list[EditRequest], applied: Applied, state: dict) -> tuple[dict, dict, dict]:
        """One sequential batch edited on the model with `applied` (Σ ΔW so far) and the editor's `state`: (Σ ΔW
        after it, float64; the editor's state after it; the edit's figures). The model is left as `applied` says."""
        self.sync(applied)
        if state:
            self.editor.load_state(state)
        base = weights_before([e for _, e in self.applied], {})   # W before the run, of the modules edited so far
        edits = apply_batch(self.lm, self.editor, requests)
        try:
            self.editor.commit(self.lm, requests)
            total = run_total(self.lm, weights_before(edits, base))
        finally:
            revert_all(self.lm, edits)
        return total, self.editor.state(), {**edit_meta(edits), **checkpoint_figures(edits)}

    def memory(self) -> dict:
        """This worker's resident memory now and at its peak, in bytes (Linux)."""
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {k: int(status[f].split()[0]) * 1024 for k, f in (("rss", "VmRSS"), ("peak_rss", "VmHWM"))}

    def perplexity(self, applied: Applied) -> float:
        """The perplexity (--ppl-docs) of the model with `applied`."""
        self.sync(applied)
        return perplexity(self.lm, self.probe.docs)

    def batch(self, item: tuple[int, list[EditRequest]]) -> list[dict]:
        """The batch protocol's rows of batch `b` (editors that are not split over workers)."""
        b, requests = item
        self.sync(Applied())
        [rows] = list(batch_rows(self.lm, self.editor, requests, len(requests), self.spec.method, self.scorer,
                                 progress=False, probe=self.probe))
        return [{**r, "batch": b, "worker": self.name} for r in rows]

    def sequential(self, requests: list, batch_size: int, checkpoints, held_out: list, progress: bool,
                   pre: dict[int, dict]) -> Iterator[list[dict]]:
        """The whole sequential protocol here, a batch's rows at a time (progress bars drawn on the driver)."""
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        self.sync(Applied())
        bar = ray_tqdm if progress and self.in_ray else progress
        for rows in sequential_rows(self.lm, self.editor, requests, batch_size, checkpoints, held_out,
                                    self.spec.method, self.scorer, progress=bar, probe=self.probe, pre=pre,
                                    sample=self.spec.checkpoint_sample):
            yield [{**r, "worker": self.name} for r in rows]


def shares(items: list, n: int) -> list[list]:
    """`items` in n contiguous, near-equal, non-empty parts."""
    n = max(1, min(n, len(items)))
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class Run:
    """What the protocols below share: the pool, the spec, the driver's editor, OUT, the writer, timings."""

    pool: object
    spec: EvalSpec
    editor: object
    out: Path
    writer: PartWriter
    progress: bool
    seconds: dict[str, float] = field(default_factory=dict)
    probe: Probe | None = None   # --ppl-docs: its pre-edit value is measured by a worker, on first use

    def perplexity(self, applied: Applied) -> dict:
        """The perplexity columns of the model with `applied` ({} without --ppl-docs)."""
        if self.probe is None:
            return {}
        if self.probe.pre is None:
            self.probe.pre = self.pool.call("perplexity", Applied())
        return self.probe.columns(self.pool.call("perplexity", applied))

    def timed(self, kind: str, t0: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0

    def bar(self, total: int, desc: str, unit: str = "case") -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress or not total, leave=False,
                    dynamic_ncols=True)


def _score(run: Run, cases: list[EditRequest], applied: Applied, pre: dict[int, dict] | None, desc: str,
           kind: str) -> Iterator[tuple[EditRequest, dict | None, str, str | None]]:
    """(request, its scores with `applied`, worker, error) for every case, a chunk at a time as chunks finish."""
    n = max(run.pool.size, math.ceil(len(cases) / SCORE_CHUNK))   # every worker busy, chunks ≤ SCORE_CHUNK
    chunks = [[(r, None if pre is None else pre[r.case_id]) for r in chunk] for chunk in shares(cases, n)] if cases \
        else []
    t0 = time.perf_counter()
    with run.bar(len(cases), desc) as bar:
        for chunk, result in run.pool.stream(chunks, "scores", applied):
            if isinstance(result, Lost):
                for r, _ in chunk:
                    yield r, None, None, f"scoring {result.message}"
            else:
                worker, scores = result
                for (r, _), s in zip(chunk, scores):
                    yield r, s, worker, None
            bar.update(len(chunk))
    if cases:
        run.timed(kind, t0)


def _pre_scores(run: Run, requests: list[EditRequest], fingerprint: str) -> dict[int, dict]:
    """Scores of the unedited model for `requests`, saved to OUT/pre_scores.json as they come, so a rerun scores only
    the cases that file lacks (they depend on the model and the case alone)."""
    store = PreScores(run.out)
    have = store.read(fingerprint)
    todo = [r for r in requests if r.case_id not in have]
    saved = len(have)
    for r, s, _, error in _score(run, todo, Applied(), None, "pre-edit scores", "pre"):
        if error is not None:
            raise PoolError(f"pre-edit {error} (case {r.case_id})")
        have[r.case_id] = s
        if len(have) - saved >= 100:
            store.write(have, fingerprint)
            saved = len(have)
    if todo:
        store.write(have, fingerprint)
    return {r.case_id: have[r.case_id] for r in requests}


def _write_scored(run: Run, scored: Iterator, make_row: Callable[[EditRequest, dict, dict], dict],
                  pre: dict[int, dict], batch: int) -> None:
    """Write a row per scored case, a chunk's rows as one part."""
    rows = []
    for r, post, worker, error in scored:
        if error is not None:
            rows += error_rows([r], RuntimeError(error), method=run.spec.method, model=run.spec.model.name, batch=batch)
        else:
            rows.append({**make_row(r, post, pre[r.case_id]), "worker": worker})
        if len(rows) >= SCORE_CHUNK:
            run.writer.add_many(rows)
            rows = []
    run.writer.add_many(rows)


def _targets(run: Run, batch: list[EditRequest], applied: Applied, per_worker: int, store: TargetStore) -> torch.Tensor:
    """z for `batch`, in rounds of `per_worker` requests on each worker, each round saved to `store` at once, so a
    rerun reads them back and a long batch resumes within its z. (z depend on the request and on the model: the
    unedited one in the batch protocol, the one the saved run state fixes in the sequential.)"""
    have = store.read()
    todo = [r for r in batch if r.case_id not in have]
    size = per_worker * run.pool.size
    if have:
        print(f"resuming: {len(batch) - len(todo)} of {len(batch)} targets z already in {store.folder}")
    with run.bar(len(todo), "z") as bar:
        for s in range(0, len(todo), size):
            t0 = time.perf_counter()
            part = todo[s:s + size]
            z = torch.cat(run.pool.scatter(shares(part, run.pool.size), "targets", applied))
            ids = [r.case_id for r in part]
            store.write(ids, z)
            have.update(zip(ids, z))
            run.timed("z", t0)
            bar.update(len(part))
    return torch.stack([have[r.case_id] for r in batch])


def _edit(run: Run, solver, plan: dict, batch: list[EditRequest], applied: Applied, store: TargetStore) -> Delta:
    """One MEMIT-family edit of `batch` on the model with `applied`, z and keys computed by the workers."""
    t0 = time.perf_counter()
    z = _targets(run, batch, applied, max(plan["z_batch"], Z_ROUND), store)

    def inputs(layer: int, deltas: dict) -> tuple[torch.Tensor, torch.Tensor]:
        t1 = time.perf_counter()
        with_layers = applied.then(run.pool.put(Delta(dict(deltas))))   # the layers solved so far
        parts = run.pool.scatter(shares(batch, run.pool.size), "inputs", layer, with_layers)
        run.timed("keys", t1)
        return torch.cat([k for k, _ in parts]), torch.cat([h for _, h in parts])

    deltas = spread(solver, plan["layers"], plan["names"], z, inputs)
    run.timed("edit", t0)
    return Delta(deltas, {"method": run.editor.name, "model": plan["model"], "fingerprint": plan["fingerprint"],
                          "layer": plan["layers"][-1], "layers": plan["layers"],
                          "cov": ";".join(sorted(set(plan["labels"].values()))),
                          "case_ids": [r.case_id for r in batch], "edit_s": time.perf_counter() - t0})


def _solver(run: Run) -> tuple[dict, object]:
    plan = run.pool.call("plan")
    return plan, run.editor.make_solver(plan["dims"], plan["covs"], plan["labels"], plan["lam"])


def _batch(run: Run, todo: list, done: set) -> None:
    """The batch protocol, MEMIT-family: each batch edited on the unedited model, scored, forgotten."""
    plan, solver = _solver(run)
    method, model = run.spec.method, plan["model"]
    for b, batch in tqdm(todo, desc=f"batch {method}", unit="batch", disable=not run.progress, dynamic_ncols=True):
        pre = _pre_scores(run, batch, plan["fingerprint"])
        t0 = time.perf_counter()
        try:
            delta = _edit(run, solver, plan, batch, Applied(), TargetStore(run.out / "z"))
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes its error rows
            run.writer.add_many(error_rows([r for r in batch if r.case_id not in done], exc, method=method,
                                           model=model, batch=b))
            continue
        seconds = (time.perf_counter() - t0) / len(batch)
        applied = Applied((run.pool.put(delta),))
        extra = {**edit_meta([delta]), **checkpoint_figures([delta]), **run.perplexity(applied)}
        cases = [r for r in batch if r.case_id not in done]
        _write_scored(run, _score(run, cases, applied, pre, "post-edit scores", "eval"),
                      lambda r, post, p: case_row(r, post, p, method=method, model=model, checkpoint=len(batch),
                                                  batch=b, seconds=seconds, extra=extra), pre, b)


def _batch_whole(run: Run, todo: list, done: set) -> None:
    """The batch protocol, other editors: whole batches spread over the workers."""
    method, model = run.spec.method, run.spec.model.name
    with tqdm(total=len(todo), desc=f"batch {method}", unit="batch", disable=not run.progress,
              dynamic_ncols=True) as bar:
        for (b, batch), rows in run.pool.stream(todo, "batch"):
            if isinstance(rows, Lost):
                rows = error_rows(batch, RuntimeError(f"the batch {rows.message}"), method=method, model=model, batch=b)
            run.writer.add_many([r for r in rows if r["case_id"] not in done])
            bar.update(1)


def _written(out: Path) -> set[tuple[int, int]]:
    """(case_id, checkpoint) of the rows OUT holds."""
    table = read_results(out, ["case_id", "checkpoint"]) if finished_case_ids(out) else None
    return set() if table is None else set(zip(table["case_id"].to_pylist(), table["checkpoint"].to_pylist()))


def _sequential(run: Run, todo: list, held_out: list, checkpoints, batch_size: int, split: bool) -> None:
    """The sequential protocol over the pool, for editors whose edits are weight deltas. Each batch is edited on the
    model with the edits so far: split over the workers (`split`, MEMIT family: z and keys by shares, the driver's
    solve) or by one worker (`turn`: Σ ΔW and the editor's state go in and come back). After each batch Σ ΔW and
    the solver's or editor's state are saved (OUT/run_state.safetensors) before its checkpoint is scored, every
    worker scoring a share of the cases with W₀ + Σ ΔW from the object store; so a rerun applies them, scores
    whatever rows the last checkpoint lacks, and goes on from the next batch (a split batch reading back the z it
    had saved). Each checkpoint's editing and scoring seconds and the workers' memory go to OUT/checkpoints.json."""
    if split:
        plan, solver = _solver(run)
        fingerprint, model = plan["fingerprint"], plan["model"]
    else:
        fingerprint, model = run.pool.infos[0].fingerprint, run.spec.model.name
    method, sample = run.spec.method, run.spec.checkpoint_sample
    requests = [r for _, b in todo for r in b]
    cps = plan_checkpoints(len(requests), batch_size, checkpoints)
    state, log = RunState(run.out), CheckpointLog(run.out)
    n, total, own, meta = state.read([b for _, b in todo], fingerprint)
    written = _written(run.out)
    pre = _pre_scores(run, [*requests, *held_out], fingerprint)
    applied = Applied((run.pool.put(Delta(total, {"fingerprint": fingerprint})),)) if n else Applied()
    if split:
        solver.load_state(own)
    done = [r for _, b in todo[:n] for r in b]
    seconds = dict(meta.get("edit_s", {}))
    if n:
        print(f"resuming: {n} of {len(todo)} batches already applied, from {state.path}")
    extra = meta.get("extra", {})
    first = max(n - 1, 0)   # a resumed run starts at its last saved batch, to score what its checkpoint lacks
    for b, batch in tqdm(todo[first:], desc=f"sequential {method}", unit="batch", disable=not run.progress,
                         dynamic_ncols=True, initial=first, total=len(todo)):
        if b >= n:
            t0 = time.perf_counter()
            if split:
                store = TargetStore(run.out / "z" / f"batch-{b}")   # this batch's z, until the state after it is saved
                delta = _edit(run, solver, plan, batch, applied, store)
                applied = applied.then(run.pool.put(delta))
                if solver.preserves:   # AlphaEdit: K_p += the keys of this batch, on the edited model
                    for part in run.pool.scatter(shares(batch, run.pool.size), "kept_keys", applied):
                        for layer, kkt in part.items():
                            solver.preserve(layer, kkt)
                total = {k: total.get(k, 0) + d for k, d in delta.deltas.items()}
                own = solver.state()
                extra = {**edit_meta([delta]), **checkpoint_figures([delta])}
                shutil.rmtree(store.folder, ignore_errors=True)
            else:
                total, own, extra = run.pool.call("turn", batch, applied, own)
                applied = Applied((run.pool.put(Delta(total, {"fingerprint": fingerprint})),))
                run.timed("edit", t0)
            seconds.update({r.case_id: (time.perf_counter() - t0) / len(batch) for r in batch})
            done += batch
            state.write(total, own, {"batches": b + 1, "case_ids": [r.case_id for r in done], "edit_s": seconds,
                                     "extra": extra, "fingerprint": fingerprint})
        cases = [*checkpoint_edits(done, sample, len(done) == cps[-1]), *held_out]
        missing = [r for r in cases if (r.case_id, len(done)) not in written]
        if len(done) not in cps or not missing:
            continue
        t0 = time.perf_counter()
        ppl = run.perplexity(applied)
        extra = {**extra, **ppl}
        _write_scored(run, _score(run, missing, applied, pre, f"checkpoint {len(done)}", "eval"),
                      lambda r, post, p: case_row(r, post, p, method=method, model=model, checkpoint=len(done),
                                                  batch=b, role="edit" if r.case_id in seconds else "held_out",
                                                  seconds=seconds.get(r.case_id), extra=extra), pre, b)
        log.add(len(done), edit_s=sum(seconds[r.case_id] for r in done), score_s=time.perf_counter() - t0,
                scored=len(missing), memory=run.pool.each("memory"))
        if ppl.get("collapsed") and run.probe.stop:   # --stop-on-collapse
            break


def _sequential_whole(run: Run, todo: list, held_out: list, checkpoints, batch_size: int) -> None:
    """The sequential protocol for editors whose edits are not weight deltas (GRACE's codebook): whole on one
    worker, its rows streamed a checkpoint at a time. It saves no run state (run_protocol_eval refuses an OUT that
    holds part of such a run); a worker that dies starts over on another, and only rows not yet written are
    written."""
    fingerprint = run.pool.infos[0].fingerprint
    requests = [r for _, b in todo for r in b]
    written = _written(run.out)
    pre = _pre_scores(run, [*requests, *held_out], fingerprint)
    for rows in run.pool.generate("sequential", requests, batch_size, checkpoints, list(held_out), run.progress, pre):
        new = [r for r in rows if (r["case_id"], r["checkpoint"]) not in written]
        run.writer.add_many(new)
        written |= {(r["case_id"], r["checkpoint"]) for r in new}


def _sequential_complete(out: Path, requests, held_out, batch_size, checkpoints, sample: int | None) -> bool:
    cps = plan_checkpoints(len(requests), batch_size, checkpoints)
    return read_results(out, ["case_id"]).num_rows == checkpoint_rows(cps, len(held_out), sample)


def stopped_at(out: Path, held_out: int, sample: int | None = None) -> int | None:
    """The checkpoint a --stop-on-collapse run stopped at: the first flagged `collapsed` whose rows (its edits, or
    their sample, and the `held_out` cases) are all written; None when there is none."""
    if not finished_case_ids(out):
        return None
    table = read_results(out, ["checkpoint", "collapsed"]).to_pydict()
    flagged = Counter(t for t, c in zip(table["checkpoint"], table["collapsed"]) if c)
    return min((t for t, n in flagged.items() if n == edits_scored(t, False, sample) + held_out), default=None)


def run_protocol_eval(spec: EvalSpec, requests: list[EditRequest], out: str | Path,
                      held_out: list[EditRequest] = (), progress: bool = True) -> dict:
    """The batch or sequential protocol (spec.protocol) on spec.resources; OUT as for `run_eval`, returns the
    summary."""
    if spec.protocol not in ("batch", "sequential"):
        raise ValueError(f"protocol must be batch or sequential here, got {spec.protocol!r}")
    ids = [r.case_id for r in [*requests, *held_out]]
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids must be unique across the edited and the held-out cases")
    out = Path(out)
    prepare(spec, [*requests, *held_out], out)
    editor = make_editor(spec.method, spec.params)
    split = distributable(editor)
    done = finished_case_ids(out)
    all_batches = list(enumerate(batches(requests, spec.batch_size)))
    if spec.protocol == "batch":
        TargetStore(out / "z").read()   # a bad z file fails here, before a model loads
        todo = [(i, b) for i, b in all_batches if any(r.case_id not in done for r in b)]
    else:
        plan_checkpoints(len(requests), spec.batch_size, spec.checkpoints)   # bad checkpoints fail here
        complete = _sequential_complete(out, requests, held_out, spec.batch_size, spec.checkpoints,
                                        spec.checkpoint_sample) or \
            (spec.stop_on_collapse and stopped_at(out, len(held_out), spec.checkpoint_sample) is not None)
        if done and not complete and not (split or RunState(out).path.exists()):
            raise ValueError(f"{out} holds part of a sequential {spec.method} run but no run state to resume from "
                             "(a run whose edits are not weight deltas, e.g. GRACE's, saves none); use another --out "
                             "or delete that directory")
        RunState(out).read([b for _, b in all_batches])   # as does a bad run state
        TargetStore(out / "z").check()
        todo = [] if complete else all_batches
    PreScores(out).read()   # and a bad file of pre-edit scores
    start, timings = time.time(), {}
    whole_on_one = spec.protocol == "sequential" and not weight_deltas(editor)
    if whole_on_one and spec.resources.workers > 1:
        print(f"[kedit] a sequential {spec.method} run edits on one worker (each edit depends on the last): "
              "loading one", flush=True)
    size = 1 if whole_on_one else len(requests) if spec.protocol == "sequential" or split else len(todo)
    # (no worker without work: a batch each, a case each)
    try:
        if todo:
            with open_pool(BatchWorker, (spec,), spec.resources, size=size) as pool, \
                    PartWriter(out) as writer:
                share_covariances(pool, spec)
                run = Run(pool, spec, editor, out, writer, progress, probe=Probe.of(spec))
                if spec.protocol == "batch":
                    (_batch if split else _batch_whole)(run, todo, done)
                elif weight_deltas(editor):
                    _sequential(run, todo, list(held_out), spec.checkpoints, spec.batch_size, split)
                else:
                    _sequential_whole(run, todo, list(held_out), spec.checkpoints, spec.batch_size)
                timings = {f"{k}_s": v for k, v in run.seconds.items()}
    finally:
        stop = {"stopped_at": stopped_at(out, len(held_out), spec.checkpoint_sample)} if spec.stop_on_collapse else {}
        seq = {"checkpoint_sample": spec.checkpoint_sample or "every edit",
               "checkpoint_log": CheckpointLog(out).read()} if spec.protocol == "sequential" else {}
        summary = finish(out, requests, start, spec.dataset, workers=spec.resources.workers,
                         protocol=spec.protocol, batch_size=spec.batch_size, timings=timings, **stop, **seq)
    return summary

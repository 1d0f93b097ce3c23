"""Batch and sequential protocols across Ray workers (`kedit eval --protocol batch|sequential`).

For MEMIT-family editors (they expose targets / inputs / make_solver) one batch of requests runs as:

    split the batch into W shares  ─►  each BatchWorker: pre-edit scores and z_i for its share (batched)
    driver gathers z               ─►  per edited layer: ray.put(ΔW of the layers done so far); each worker
                                       returns (K, h) of its share on the model with them applied;
                                       the driver solves ΔW_l (float64, editor's solver)
    ray.put(the Delta)             ─►  each worker scores its share on the edited model

The sequential protocol keeps the list of deltas applied for good (object refs) and passes it with every call:
a worker first applies whichever it has not yet applied, so a restarted (fresh) actor catches up by itself
and no worker holds state the driver does not have. Editors that remember earlier edits (AlphaEdit's K_p) get
the K Kᵀ of each applied batch from the workers (`kept_keys`) on the driver's solver. At a checkpoint, every
edit so far and the held-out cases are scored, split over the workers.

Other editors (ROME, GRACE, FT, ...) run the in-process protocol (kedit_ray.eval.protocols) on one worker.

Rows are written as they are scored, a round of cases at a time. Resume: the unedited model's scores are kept
in OUT/pre_scores.json, so a rerun scores only the cases it lacks. The batch protocol skips the cases that have
rows (a batch is re-edited if some of its cases are missing, and only those are written) and reads back from
OUT/z/ the z a cut-short batch had computed (z depend only on the model and the request there). A sequential
MEMIT/AlphaEdit run saves Σ ΔW so far (and AlphaEdit's kept keys) after each batch and resumes from there, with
the z its next batch had saved (OUT/z/batch-B/); one run whole on a worker (the other editors) cannot resume
midway, but keeps the checkpoints it finished.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from kedit_ray.distributed.driver import _start_ray
from kedit_ray.distributed.sink import PartWriter, check_config, finished_case_ids, read_results
from kedit_ray.editors import Delta, make_editor
from kedit_ray.editors.memit import spread
from kedit_ray.eval import scorer_name
from kedit_ray.eval.protocols import (batch_rows, batches, case_row, checkpoint_figures, edit_meta, error_rows,
                                      plan_checkpoints, sequential_rows)
from kedit_ray.eval.summary import summarize
from kedit_ray.io import save_tensors, write_json
from kedit_ray.requests import EditRequest


Z_ROUND = 25   # requests per worker between two saves of z (at least the editor's z_batch)
SCORE_ROUND = 100   # cases per worker between two progress updates (and saves of the pre-edit scores)
PRE_SCORES = "pre_scores.json"   # OUT's scores of the unedited model, per case_id


def distributable(editor) -> bool:
    """Editors whose keys and targets can be computed per share and solved on the driver (MEMIT, AlphaEdit)."""
    return all(hasattr(editor, m) for m in ("targets", "inputs", "make_solver"))


@ray.remote
class BatchWorker:
    """One model and editor; applies the run's deltas as told, computes shares of z, keys and scores."""

    def __init__(self, config: dict, index: int, threads: int = 1):
        from kedit_ray.models import load

        torch.set_num_threads(max(1, threads))
        self.name = f"w{index}@{socket.gethostname()}:{os.getpid()}"
        self.lm = load(config["model"], device_map=config.get("device_map"), templates=config.get("templates"))
        self.editor = make_editor(config["method"], config.get("params"))
        self.dataset = scorer_name(config.get("dataset"))
        self.applied: list[tuple[str, Delta]] = []     # (object ref id, delta), in the order applied
        if hasattr(self.editor, "prefixes"):   # the context prefixes come from the unedited model, as in one process
            self.editor.prefixes(self.lm)

    def ready(self) -> str:
        return self.name

    def _sync(self, state: list) -> None:
        """Make the applied deltas exactly `state` (a list of [ObjectRef of a Delta])."""
        ids = [ref[0].hex() for ref in state]
        if [i for i, _ in self.applied] != ids[:len(self.applied)]:
            for _, d in reversed(self.applied):
                d.revert(self.lm.model)
            self.applied = []
        for ref in state[len(self.applied):]:
            delta = ray.get(ref[0])
            delta.apply(self.lm.model)
            self.applied.append((ref[0].hex(), delta))

    def plan(self) -> dict:
        """What the driver's solver needs: layers, module names, d_in, C and its labels, λ."""
        layers = self.editor.layers(self.lm)
        covs, labels = self.editor.covariances(self.lm)
        return {"layers": layers, "names": [self.lm.arch.name("mlp_out", layer) for layer in layers],
                "dims": self.editor.dims(self.lm), "covs": covs, "labels": labels, "model": self.lm.name,
                "lam": self.editor.params(self.lm).mom2_update_weight, "z_batch": self.editor.params(self.lm).z_batch,
                "fingerprint": self.lm.fingerprint}

    def targets(self, requests: list[EditRequest], state: list) -> torch.Tensor:
        self._sync(state)
        return self.editor.targets(self.lm, requests)[0]

    def inputs(self, requests: list[EditRequest], layer: int, state: list, partial: list) -> tuple:
        self._sync(state)
        with Delta(dict(ray.get(partial[0]))).applied(self.lm.model):
            return self.editor.inputs(self.lm, requests, layer)

    def kept_keys(self, requests: list[EditRequest], state: list) -> dict:
        self._sync(state)
        return self.editor.kept_keys(self.lm, requests)

    def scores(self, requests: list[EditRequest], state: list, pre: list[dict] | None = None,
               extra: list | None = None) -> list[dict]:
        """Scores of each request with `state` applied, and `extra` (a [ref of a Delta]) on top if given."""
        from kedit_ray.eval import score

        self._sync(state)
        delta = ray.get(extra[0]) if extra else None
        if delta is not None:
            delta.apply(self.lm.model)
        try:
            return [score(self.dataset, self.lm, r, None if pre is None else p)
                    for r, p in zip(requests, pre or [None] * len(requests))]
        finally:
            if delta is not None:
                delta.revert(self.lm.model)

    def run_protocol(self, protocol: str, requests: list, batch_size: int, checkpoints, held_out: list,
                     method: str, progress: bool = False) -> Iterator[list[dict]]:
        """The whole in-process protocol here (editors that cannot be split over workers), streamed to the
        driver a batch (batch protocol) or a checkpoint (sequential) at a time; progress bars drawn there."""
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        self._sync([])
        bar = ray_tqdm if progress else False
        if protocol == "batch":
            parts = batch_rows(self.lm, self.editor, requests, batch_size, method, self.dataset, progress=bar)
        else:
            parts = sequential_rows(self.lm, self.editor, requests, batch_size, checkpoints, held_out, method,
                                    self.dataset, progress=bar)
        for rows in parts:
            yield [{**r, "worker": self.name} for r in rows]


def shares(items: list, n: int) -> list[list]:
    """`items` in n contiguous, near-equal, non-empty parts."""
    n = max(1, min(n, len(items)))
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)]


class Pool:
    """W BatchWorkers and the map over shares; timings of the parallel parts are kept per kind."""

    def __init__(self, config: dict, workers: int, options: dict):
        threads = max(1, int(options["num_cpus"]))
        self.actors = [BatchWorker.options(**options).remote(config, i, threads) for i in range(workers)]
        self.names = ray.get([a.ready.remote() for a in self.actors])
        self.seconds: dict[str, float] = {}

    def map(self, kind: str, method: str, items: list, *args, **kwargs) -> list:
        """Call `method(share, *args)` on each worker with its share; results in the order of `items`' shares."""
        t0 = time.perf_counter()
        parts = shares(items, len(self.actors))
        out = ray.get([getattr(a, method).remote(p, *args, **kwargs) for a, p in zip(self.actors, parts)])
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
        return out

    def map_rows(self, kind: str, requests: list, state: list, pre: dict, extra=None) -> list[tuple]:
        """(request, post scores, worker name) for every request."""
        parts = shares(requests, len(self.actors))
        pres = [[pre[r.case_id] for r in p] for p in parts]
        t0 = time.perf_counter()
        out = ray.get([a.scores.remote(p, state, q, extra) for a, p, q in zip(self.actors, parts, pres)])
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
        return [(r, s, self.names[i]) for i, (p, o) in enumerate(zip(parts, out)) for r, s in zip(p, o)]

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _in_rounds(items: list, size: int, desc: str, progress: bool) -> Iterator[list]:
    """`items` in slices of `size`, under a progress bar that counts cases."""
    with tqdm(total=len(items), desc=desc, unit="case", disable=not progress or not items, leave=False,
              dynamic_ncols=True) as bar:
        for s in range(0, len(items), size):
            yield items[s:s + size]
            bar.update(len(items[s:s + size]))


def _read_pre(path: Path, fingerprint: str | None = None) -> dict[int, dict]:
    """case_id → scores of the unedited model, from the file `_pre_scores` wrote ({} without one); with
    `fingerprint`, the file must have been made on that model."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        have = {int(k): dict(v) for k, v in saved["scores"].items()}
    except Exception as exc:  # noqa: BLE001 - name the file
        raise ValueError(f"{path}: not pre-edit scores this tool wrote ({exc}); delete it to score again") from exc
    if fingerprint is not None and saved.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: made on another model (fingerprint {saved.get('fingerprint')}, this one "
                         f"{fingerprint}); use another --out or delete the file")
    return have


def _pre_scores(pool: Pool, requests: list[EditRequest], path: Path, fingerprint: str,
                progress: bool) -> dict[int, dict]:
    """Scores of the unedited model for `requests`, saved to `path` round by round, so a rerun scores only the
    cases that file lacks (they depend on the model and the case alone)."""
    have = _read_pre(path, fingerprint)
    todo = [r for r in requests if r.case_id not in have]
    for part in _in_rounds(todo, SCORE_ROUND * len(pool.actors), "pre-edit scores", progress):
        have.update(zip([r.case_id for r in part], [s for p in pool.map("pre", "scores", part, []) for s in p]))
        write_json(path, {"fingerprint": fingerprint, "scores": {str(k): v for k, v in have.items()}})
    return {r.case_id: have[r.case_id] for r in requests}


def _read_targets(store: Path) -> dict[int, torch.Tensor]:
    """case_id → z from the files `_targets` wrote."""
    from safetensors import safe_open

    have = {}
    for f in sorted(store.glob("z-*.safetensors")):
        try:
            with safe_open(str(f), "pt") as g:
                ids, z = json.loads(g.metadata()["case_ids"]), g.get_tensor("z")
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ValueError(f"{f}: not a z file this run wrote ({exc}); delete it to recompute its targets") from exc
        if len(ids) != len(z):
            raise ValueError(f"{f}: {len(ids)} case_ids for {len(z)} targets; delete it to recompute them")
        have.update(zip(ids, z))
    return have


def _targets(pool: Pool, batch: list[EditRequest], state: list, per_worker: int, store: Path | None,
             progress: bool) -> torch.Tensor:
    """z for `batch`, in rounds of `per_worker` requests on each worker. With `store` each round's z is saved there
    at once and a rerun reads them back, so a long batch resumes within its z. (z depend on the request and on
    the model: the unedited one in the batch protocol, the one the saved run state fixes in the sequential.)"""
    have = _read_targets(store) if store else {}
    todo = [r for r in batch if r.case_id not in have]
    size = per_worker * len(pool.actors)
    rounds = range(0, len(todo), size)
    if store and have:
        print(f"resuming: {len(batch) - len(todo)} of {len(batch)} targets z already in {store}")
    for s in tqdm(rounds, desc="z", unit="round", disable=not progress or len(rounds) < 2, leave=False,
                  dynamic_ncols=True):
        part = todo[s:s + size]
        z = torch.cat(pool.map("z", "targets", part, state))
        ids = [r.case_id for r in part]
        if store:
            save_tensors(store / f"z-{ids[0]}-{ids[-1]}.safetensors", {"z": z}, {"case_ids": json.dumps(ids)})
        have.update(zip(ids, z))
    return torch.stack([have[r.case_id] for r in batch])


def _edit(pool: Pool, editor, solver, plan: dict, batch: list[EditRequest], state: list,
          store: Path | None = None, progress: bool = False) -> Delta:
    """One MEMIT-family edit of `batch` on the model with `state` applied, z and keys computed by the workers
    (z saved to and read back from `store` if given)."""
    t0 = time.perf_counter()
    z = _targets(pool, batch, state, max(plan["z_batch"], Z_ROUND), store, progress)

    def inputs(layer: int, deltas: dict) -> tuple[torch.Tensor, torch.Tensor]:
        partial = [ray.put(deltas)]
        parts = pool.map("keys", "inputs", batch, layer, state, partial)
        return torch.cat([k for k, _ in parts]), torch.cat([h for _, h in parts])

    deltas = spread(solver, plan["layers"], plan["names"], z, inputs)
    pool.seconds["edit"] = pool.seconds.get("edit", 0.0) + time.perf_counter() - t0
    return Delta(deltas, {"method": editor.name, "model": plan["model"], "fingerprint": plan["fingerprint"],
                          "layer": plan["layers"][-1], "layers": plan["layers"],
                          "cov": ";".join(sorted(set(plan["labels"].values()))),
                          "case_ids": [r.case_id for r in batch], "edit_s": time.perf_counter() - t0})


def run_protocol_eval(config: dict, requests: list[EditRequest], out: str, workers: int, protocol: str,
                      batch_size: int, checkpoints: list[int] | None = None, held_out: list[EditRequest] = (),
                      cpus_per_worker: float = 1, gpus_per_worker: float = 0, address: str | None = None,
                      progress: bool = True) -> dict:
    """The batch or sequential protocol over `workers` BatchWorkers; OUT as for `run_eval`, returns the summary."""
    if protocol not in ("batch", "sequential"):
        raise ValueError(f"protocol must be batch or sequential here, got {protocol!r}")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    ids = [r.case_id for r in [*requests, *held_out]]
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids must be unique across the edited and the held-out cases")
    out_dir = Path(out)
    config = check_config(out_dir, config)
    dataset = scorer_name(config.get("dataset"))
    method = config["method"]
    done = finished_case_ids(out_dir)
    editor = make_editor(method, config.get("params"))
    if protocol == "batch":
        _read_targets(out_dir / "z")   # a bad z file fails here, before Ray starts
        todo = [(i, b) for i, b in enumerate(batches(requests, batch_size)) if any(r.case_id not in done for r in b)]
    else:
        plan_checkpoints(len(requests), batch_size, checkpoints)   # bad checkpoints fail before Ray starts
        complete = _sequential_complete(out_dir, requests, held_out, batch_size, checkpoints)
        if done and not complete and not distributable(editor):
            raise ValueError(f"{out} holds part of a sequential {method} run, which cannot resume midway (only "
                             "MEMIT and AlphaEdit runs can); use another --out or delete that directory")
        _read_state(out_dir / "run_state.safetensors", batches(requests, batch_size))   # a bad one fails here
        for store in (out_dir / "z").glob("batch-*"):
            _read_targets(store)
        todo = [] if complete else list(enumerate(batches(requests, batch_size)))
    _read_pre(out_dir / PRE_SCORES)   # as does a bad file of pre-edit scores
    start = time.time()
    timings: dict = {}
    try:
        if todo:
            started = _start_ray(address, workers, cpus_per_worker, gpus_per_worker)
            options = dict(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
            try:
                pool = Pool(config, workers, options)
                try:
                    with PartWriter(out_dir) as writer:
                        if not distributable(editor):
                            for ref in pool.actors[0].run_protocol.remote(
                                    protocol, [r for _, b in todo for r in b], batch_size, checkpoints,
                                    list(held_out), method, progress):
                                for row in ray.get(ref):
                                    if protocol == "sequential" or row["case_id"] not in done:
                                        writer.add(row)
                                writer.flush()
                        elif protocol == "batch":
                            _batch(pool, editor, todo, done, writer, method, progress, out_dir)
                        else:
                            _sequential(pool, editor, todo, held_out, checkpoints, batch_size, writer, method,
                                        progress, out_dir)
                    timings = {f"{k}_s": v for k, v in pool.seconds.items()}
                finally:
                    pool.close()
            finally:
                if started:
                    ray.shutdown()
    finally:
        summary = summarize(read_results(out_dir), dataset)
        finished = finished_case_ids(out_dir)
        summary.update(wall_seconds=time.time() - start, workers=workers, protocol=protocol, batch_size=batch_size,
                       timings=timings, complete=all(r.case_id in finished for r in requests))
        write_json(out_dir / "summary.json", summary)
    return summary


def _sequential_complete(out_dir: Path, requests, held_out, batch_size, checkpoints) -> bool:
    cps = plan_checkpoints(len(requests), batch_size, checkpoints)
    return read_results(out_dir, ["case_id"]).num_rows == sum(c + len(held_out) for c in cps)


def _batch(pool: Pool, editor, todo: list, done: set, writer: PartWriter, method: str, progress: bool,
           out_dir: Path) -> None:
    plan = ray.get(pool.actors[0].plan.remote())
    solver = editor.make_solver(plan["dims"], plan["covs"], plan["labels"], plan["lam"])
    for b, batch in tqdm(todo, desc=f"batch {method}", unit="batch", disable=not progress, dynamic_ncols=True):
        pre = _pre_scores(pool, batch, out_dir / PRE_SCORES, plan["fingerprint"], progress)
        t0 = time.perf_counter()
        try:
            delta = _edit(pool, editor, solver, plan, batch, [], out_dir / "z", progress)
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes its error rows
            for row in error_rows([r for r in batch if r.case_id not in done], exc, method=method, model=plan["model"],
                                  batch=b):
                writer.add(row)
            continue
        seconds = (time.perf_counter() - t0) / len(batch)
        extra = {**edit_meta([delta]), **checkpoint_figures([delta])}
        ref = [ray.put(delta)]
        todo_rows = [r for r in batch if r.case_id not in done]
        for part in _in_rounds(todo_rows, SCORE_ROUND * len(pool.actors), "post-edit scores", progress):
            for r, post, worker in pool.map_rows("eval", part, [], pre, ref):
                writer.add({**case_row(r, post, pre[r.case_id], method=method, model=plan["model"],
                                       checkpoint=len(batch), batch=b, seconds=seconds, extra=extra),
                            "worker": worker})


def _read_state(path: Path, todo: list[list[EditRequest]]) -> tuple[int, dict, dict, dict]:
    """(batches applied, Σ ΔW per module, AlphaEdit's K_p K_pᵀ per layer, meta) of a cut-short sequential run;
    (0, {}, {}, {}) without one. The batches must be this run's first ones."""
    if not path.exists():
        return 0, {}, {}, {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["run_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        n = int(meta["batches"])
    except Exception as exc:  # noqa: BLE001 - name the file
        raise ValueError(f"{path}: not a run state this tool wrote ({exc}); delete it to start the run over") from exc
    want = [r.case_id for b in todo[:n] for r in b]
    if n > len(todo) or meta.get("case_ids") != want:
        raise ValueError(f"{path}: holds {n} batches of other cases than this run's first {n}; was --limit, "
                         "--batch-size or --data changed? Use another --out or delete the file")
    deltas = {k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")}
    kp = {int(k.removeprefix("kp/")): v for k, v in tensors.items() if k.startswith("kp/")}
    return n, deltas, kp, meta


def _sequential(pool: Pool, editor, todo: list, held_out: list, checkpoints, batch_size: int, writer: PartWriter,
                method: str, progress: bool, out_dir: Path) -> None:
    """After each batch, Σ ΔW so far and AlphaEdit's K_p K_pᵀ are saved (OUT/run_state.safetensors) before the
    checkpoint is scored, so a rerun applies them, scores whatever rows the last checkpoint lacks, and goes on
    from the next batch, reading back the z that batch had saved (OUT/z/batch-B/)."""
    plan = ray.get(pool.actors[0].plan.remote())
    solver = editor.make_solver(plan["dims"], plan["covs"], plan["labels"], plan["lam"])
    requests = [r for _, b in todo for r in b]
    cps = plan_checkpoints(len(requests), batch_size, checkpoints)
    path = out_dir / "run_state.safetensors"
    n, total, kp, meta = _read_state(path, [b for _, b in todo])
    if n and meta.get("fingerprint") != plan["fingerprint"]:
        raise ValueError(f"{path}: made on another model (fingerprint {meta.get('fingerprint')}, this one "
                         f"{plan['fingerprint']}); use another --out or delete the file")
    written = set()
    if finished_case_ids(out_dir):
        table = read_results(out_dir, ["case_id", "checkpoint"])
        written = set(zip(table["case_id"].to_pylist(), table["checkpoint"].to_pylist()))
    pre = _pre_scores(pool, [*requests, *held_out], out_dir / PRE_SCORES, plan["fingerprint"], progress)
    state = [[ray.put(Delta(total, {"fingerprint": plan["fingerprint"]}))]] if n else []
    getattr(solver, "kp", {}).update(kp)                       # AlphaEdit: the kept keys of those batches
    done = [r for _, b in todo[:n] for r in b]
    seconds = {int(k): v for k, v in meta.get("edit_s", {}).items()}
    if n:
        print(f"resuming: {n} of {len(todo)} batches already applied, from {path}")
    extra = meta.get("extra", {})
    first = max(n - 1, 0)   # a resumed run starts at its last saved batch, to score what its checkpoint lacks
    for b, batch in tqdm(todo[first:], desc=f"sequential {method}", unit="batch", disable=not progress,
                         dynamic_ncols=True, initial=first, total=len(todo)):
        if b >= n:
            t0 = time.perf_counter()
            store = out_dir / "z" / f"batch-{b}"   # this batch's z, until the state after it is saved
            delta = _edit(pool, editor, solver, plan, batch, state, store, progress)
            state = [*state, [ray.put(delta)]]
            if hasattr(solver, "preserve"):   # AlphaEdit: K_p += the keys of this batch, on the edited model
                for part in pool.map("keys", "kept_keys", batch, state):
                    for layer, kkt in part.items():
                        solver.preserve(layer, kkt)
            seconds.update({r.case_id: (time.perf_counter() - t0) / len(batch) for r in batch})
            done += batch
            total = {k: total.get(k, 0) + d for k, d in delta.deltas.items()}
            extra = {**edit_meta([delta]), **checkpoint_figures([delta])}
            save_tensors(path, {**{f"delta/{k}": v for k, v in total.items()},
                                **{f"kp/{layer}": v for layer, v in getattr(solver, "kp", {}).items()}},
                         {"run_state": json.dumps({"batches": b + 1, "case_ids": [r.case_id for r in done],
                                                   "edit_s": seconds, "extra": extra,
                                                   "fingerprint": plan["fingerprint"]})})
            shutil.rmtree(store, ignore_errors=True)
        missing = [r for r in [*done, *held_out] if (r.case_id, len(done)) not in written]
        if len(done) not in cps or not missing:
            continue
        for part in _in_rounds(missing, SCORE_ROUND * len(pool.actors), f"checkpoint {len(done)}", progress):
            for r, post, worker in pool.map_rows("eval", part, state, pre):
                role = "edit" if r.case_id in seconds else "held_out"
                writer.add({**case_row(r, post, pre[r.case_id], method=method, model=plan["model"],
                                       checkpoint=len(done), batch=b, role=role, seconds=seconds.get(r.case_id),
                                       extra=extra), "worker": worker})
        writer.flush()

"""The batch and sequential protocols, in one process (kedit_ray.distributed.batch runs them across Ray workers).

batch       requests in batches of B (by case_id): score each case on the unedited model, edit the whole batch
            (`editor.edit_batch`, else the requests one by one, each applied before the next is made), score
            every case of the batch on the edited model, revert. Rows: checkpoint = the batch's size.
sequential  batches applied one after another, never reverted (`editor.commit(lm, batch)` after each, for
            editors that remember earlier edits). At each checkpoint T (a multiple of B; the end of the run is
            always one) every edit made so far is scored (role "edit"), and so is a fixed held-out set of
            unrelated cases (role "held_out"), which gives TRR (kedit_ray.eval.lifelong). Pre-edit scores are
            those of the unedited model. Rows: checkpoint = T. With --stop-on-collapse the run ends after the
            first checkpoint flagged `collapsed`. (Across Ray workers, kedit_ray.distributed.batch edits batch
            after batch from Σ ΔW so far and the editor's state, saved after each: a long run resumes there.)

`scorer` is a Scorer (the dataset's figures, --generate, --fluency) or a dataset's name. Rows carry its figures,
their `pre_` twins, `checkpoint`, `role`, `batch` (index), `edit_seconds`
(the batch's edit time over its size) and the edit's `ckpt_*` figures (`edit.meta["checkpoint"]`). With a
perplexity `probe` (--ppl-docs) they also carry the model's perplexity with the batch (batch) or with every edit
so far (sequential, at each checkpoint), the unedited model's, and `collapsed`: the same on every row measured
on that model.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from kedit_ray.editors import Delta
from kedit_ray.eval import Scorer
from kedit_ray.eval.perplexity import Probe
from kedit_ray.eval.summary import summarize
from kedit_ray.models import LM
from kedit_ray.models.weights import set_weight, weight
from kedit_ray.requests import EditRequest


def bar(items: Iterable, desc: str, unit: str, progress: bool | Callable) -> Iterable:
    """`items` under a progress bar: tqdm's, none (progress False), or `progress` itself, a tqdm-like class
    (a Ray actor passes Ray's, which draws on the driver)."""
    if callable(progress):
        return progress(items, desc=desc, unit=unit)
    return tqdm(items, desc=desc, unit=unit, disable=not progress)


def batches(requests: list[EditRequest], size: int) -> list[list[EditRequest]]:
    """Consecutive batches of `size`, in case_id order."""
    if size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {size}")
    ordered = sorted(requests, key=lambda r: r.case_id)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def plan_checkpoints(total: int, batch_size: int, checkpoints: list[int] | None) -> list[int]:
    """The checkpoints ≤ total (each a multiple of the batch size), plus total itself."""
    for c in checkpoints or []:
        if c < 1 or (c % batch_size and c < total):
            raise ValueError(f"checkpoint {c} is not a positive multiple of the batch size {batch_size}")
    return sorted({c for c in checkpoints or [] if c <= total} | {total})


def apply_batch(lm: LM, editor, requests: list[EditRequest]) -> list:
    """Edit `requests` on the model as it is and apply the edits; returns them, in the order applied."""
    if editor.batched:
        edit = editor.edit_batch(lm, requests)
        edit.apply(lm.model)
        return [edit]
    edits = []
    try:
        for r in requests:
            edit = editor.edit(lm, r)
            edit.apply(lm.model)
            edits.append(edit)
    except BaseException:
        revert_all(lm, edits)
        raise
    return edits


def revert_all(lm: LM, edits: list) -> None:
    for e in reversed(edits):
        e.revert(lm.model)


def numbers(scores: dict, prefix: str = "") -> dict:
    """The scalar figures of a score dict (a scorer may return lists for its own later use)."""
    return {prefix + k: v for k, v in scores.items() if v is None or isinstance(v, (int, float))}


def checkpoint_figures(edits: list) -> dict:
    """`ckpt_*` columns from the last edit's meta["checkpoint"]."""
    figs = (edits[-1].meta.get("checkpoint") if edits else None) or {}
    return {f"ckpt_{k}": float(v) for k, v in figs.items()}


def case_row(req: EditRequest, post: dict, pre: dict, *, method: str, model: str, checkpoint: int, batch: int,
             seconds: float | None, role: str = "edit", extra: dict | None = None) -> dict:
    return {"case_id": req.case_id, "method": method, "model": model, **numbers(post), **numbers(pre, "pre_"),
            "edit_seconds": seconds, "error": None, "checkpoint": checkpoint, "role": role, "batch": batch,
            **(extra or {})}


def error_rows(reqs: list[EditRequest], exc: BaseException, *, method: str, model: str, batch: int) -> list[dict]:
    message = f"{type(exc).__name__}: {exc}"
    return [{"case_id": r.case_id, "method": method, "model": model, "error": message, "batch": batch,
             "role": "edit"} for r in reqs]


def edit_meta(edits: list) -> dict:
    """Per-row figures of the edit(s): layer and C label where the editor reports them."""
    meta = edits[-1].meta if edits else {}
    return {k: meta[k] for k in ("layer", "cov") if k in meta}


def batch_rows(lm: LM, editor, requests: list[EditRequest], batch_size: int, method: str,
               scorer: Scorer | str = "counterfact", progress: bool | Callable = True,
               probe: Probe | None = None) -> Iterator[list[dict]]:
    """The batch protocol, one batch's rows at a time. A batch whose edit raises becomes error rows; the run
    goes on."""
    scorer = Scorer.of(scorer)
    if probe:
        probe.before(lm)
    for b, batch in enumerate(bar(batches(requests, batch_size), f"batch {method}", "batch", progress)):
        pre = {r.case_id: s for r, s in zip(batch, scorer.many(lm, [(r, None) for r in batch]))}
        t0 = time.perf_counter()
        try:
            edits = apply_batch(lm, editor, batch)
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes its error rows
            yield error_rows(batch, exc, method=method, model=lm.name, batch=b)
            continue
        seconds = (time.perf_counter() - t0) / len(batch)
        try:
            extra = {**edit_meta(edits), **checkpoint_figures(edits), **(probe.after(lm) if probe else {})}
            posts = scorer.many(lm, [(r, pre[r.case_id]) for r in batch])
            rows = [case_row(r, post, pre[r.case_id], method=method, model=lm.name, checkpoint=len(batch), batch=b,
                             seconds=seconds, extra=extra) for r, post in zip(batch, posts)]
        finally:
            revert_all(lm, edits)
        yield rows


def run_batch(lm: LM, editor, requests: list[EditRequest], batch_size: int, method: str,
              scorer: Scorer | str = "counterfact", progress: bool | Callable = True,
              probe: Probe | None = None) -> list[dict]:
    """The batch protocol; returns the rows."""
    return [r for rows in batch_rows(lm, editor, requests, batch_size, method, scorer, progress, probe) for r in rows]


def edits_scored(edits: int, last: bool, sample: int | None) -> int:
    """How many of the edits so far a checkpoint scores: all at the last checkpoint or without `sample`."""
    return edits if sample is None or last else min(edits, sample)


def checkpoint_edits(done: list[EditRequest], sample: int | None, last: bool) -> list[EditRequest]:
    """The edits a checkpoint scores (edits_scored): every one, or a fixed, seeded sample of them (the cases of
    lowest rank, a case's rank drawn from its case_id alone)."""
    if edits_scored(len(done), last, sample) == len(done):
        return done
    return sorted(sorted(done, key=lambda r: random.Random(r.case_id).random())[:sample], key=lambda r: r.case_id)


def checkpoint_rows(checkpoints: list[int], held_out: int, sample: int | None) -> int:
    """The rows a complete sequential run writes."""
    return sum(edits_scored(c, c == checkpoints[-1], sample) + held_out for c in checkpoints)


def weights_before(edits: list, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` (W before the run, per module) with the modules these weight deltas touch for the first time."""
    for e in edits:
        base = {**e.weights_before(), **base}
    return base


def run_total(lm: LM, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ ΔW so far, W now − W before the run in float64 (W before + it gives W now bit for bit)."""
    return {k: (weight(lm.model, k).double() - w0.double()).cpu() for k, w0 in base.items()}


def sequential_rows(lm: LM, editor, requests: list[EditRequest], batch_size: int, checkpoints: list[int] | None,
                    held_out: list[EditRequest], method: str, scorer: Scorer | str = "counterfact",
                    progress: bool | Callable = True, probe: Probe | None = None, pre: dict[int, dict] | None = None,
                    sample: int | None = None) -> Iterator[list[dict]]:
    """The sequential protocol, a list of rows per batch (empty but at checkpoints). `pre`: the unedited model's
    scores, when known; `sample`: the edits scored at a checkpoint before the last (checkpoint_edits). The model is
    restored at the end (or when the generator is closed early). Memory does not grow with the edits: the weights
    before the run are kept once, not a copy per edit."""
    if overlap := {r.case_id for r in requests} & {r.case_id for r in held_out}:
        raise ValueError(f"held-out cases must not be edited; both hold case_ids {sorted(overlap)[:10]}")
    scorer = Scorer.of(scorer)
    todo = batches(requests, batch_size)
    cps = plan_checkpoints(len(requests), batch_size, checkpoints)
    if pre is None:
        cases = [*requests, *held_out]   # scored 32 at a time under the bar
        pre = {r.case_id: s for i in bar(range(0, len(cases), 32), "pre-edit scores", "32 cases", progress)
               for r, s in zip(cases[i:i + 32], scorer.many(lm, [(r, None) for r in cases[i:i + 32]]))}
    if probe:
        probe.before(lm)
    done: list[EditRequest] = []
    seconds: dict[int, float] = {}

    def scored(b: int, figures: dict) -> list[dict]:
        """The edits so far (or their sample) and the held-out cases, on the model as it is (checkpoint len(done))."""
        edits = checkpoint_edits(done, sample, len(done) == cps[-1])
        cases = [(role, r) for role, rs in (("edit", edits), ("held_out", held_out)) for r in rs]
        posts = scorer.many(lm, [(r, pre[r.case_id]) for _, r in cases])
        return [case_row(r, post, pre[r.case_id], method=method, model=lm.name, checkpoint=len(done), batch=b,
                         role=role, extra=figures, seconds=seconds.get(r.case_id, math.nan) if role == "edit" else None)
                for (role, r), post in zip(cases, posts)]

    base: dict[str, torch.Tensor] = {}          # W before the run, per module a weight delta has touched
    adaptors: list = []                         # edits that are not weight deltas (GRACE), reverted at the end
    try:
        for b, batch in enumerate(bar(todo, f"sequential {method}", "batch", progress)):
            t0 = time.perf_counter()
            edits = apply_batch(lm, editor, batch)
            deltas = [e for e in edits if isinstance(e, Delta)]
            base = weights_before(deltas, base)
            for e in deltas:
                e.release()                     # applied for good: `base` holds the one copy of W kept
            adaptors += [e for e in edits if not isinstance(e, Delta)]
            editor.commit(lm, batch)
            seconds.update({r.case_id: (time.perf_counter() - t0) / len(batch) for r in batch})
            done += batch
            figures = {**edit_meta(edits), **checkpoint_figures(edits)}
            ppl = probe.after(lm) if probe and len(done) in cps else {}
            rows = scored(b, {**figures, **ppl}) if len(done) in cps else []
            yield rows
            if probe and probe.stop and ppl.get("collapsed"):   # --stop-on-collapse
                return
    finally:
        revert_all(lm, adaptors)
        for name, w0 in base.items():
            set_weight(lm.model, name, w0)
        editor.reset()


def run_sequential(lm: LM, editor, requests: list[EditRequest], batch_size: int, checkpoints: list[int] | None,
                   held_out: list[EditRequest], method: str, scorer: Scorer | str = "counterfact",
                   progress: bool | Callable = True, probe: Probe | None = None) -> tuple[list[dict], dict]:
    """The sequential protocol; returns (rows, summary). The model is restored at the end."""
    rows = [r for part in sequential_rows(lm, editor, requests, batch_size, checkpoints, held_out, method, scorer,
                                          progress, probe) for r in part]
    return rows, summarize(rows, Scorer.of(scorer).dataset)

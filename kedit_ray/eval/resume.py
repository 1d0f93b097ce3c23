"""The files that let a batch or sequential run resume where it stopped (besides its results). No Ray here.

    OUT/pre_scores.json         the unedited model's scores per case_id (they depend on the model and the case)
    OUT/z/z-<first>-<last>.safetensors          the batch protocol's targets z, saved in rounds
    OUT/z/batch-<B>/z-....safetensors           the sequential protocol's z of batch B, until the state after it
    OUT/run_state.safetensors   a sequential run: batches applied, Σ ΔW so far, the solver's or editor's own
                                state (`state()`: AlphaEdit's K_p K_pᵀ, ROME's kept keys) and the figures kept
    OUT/checkpoints.json        a sequential run: per checkpoint scored, its editing and scoring seconds and the
                                workers' memory (summed over sittings: a resumed run adds to it)

Every reader names its file when the file is not one this tool wrote, or was made on another model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kedit_ray.io import save_tensors, write_json
from kedit_ray.requests import EditRequest

PRE_SCORES = "pre_scores.json"
RUN_STATE = "run_state.safetensors"
CHECKPOINTS = "checkpoints.json"


class PreScores:
    """case_id → scores of the unedited model, kept in OUT/pre_scores.json."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / PRE_SCORES

    def read(self, fingerprint: str | None = None) -> dict[int, dict]:
        """The saved scores ({} without a file); with `fingerprint`, the file must have been made on that model."""
        if not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text())
            have = {int(k): dict(v) for k, v in saved["scores"].items()}
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ValueError(f"{self.path}: not pre-edit scores this tool wrote ({exc}); delete it to score "
                             "again") from exc
        if fingerprint is not None and saved.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.path}: made on another model (fingerprint {saved.get('fingerprint')}, this one "
                             f"{fingerprint}); use another --out or delete the file")
        return have

    def write(self, scores: dict[int, dict], fingerprint: str) -> None:
        write_json(self.path, {"fingerprint": fingerprint, "scores": {str(k): v for k, v in scores.items()}})


class TargetStore:
    """The targets z of one batch, saved a round at a time in a folder, read back by case_id."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def read(self) -> dict[int, torch.Tensor]:
        from safetensors import safe_open

        have = {}
        for f in sorted(self.folder.glob("z-*.safetensors")):
            try:
                with safe_open(str(f), "pt") as g:
                    ids, z = json.loads(g.metadata()["case_ids"]), g.get_tensor("z")
            except Exception as exc:  # noqa: BLE001 - name the file
                raise ValueError(f"{f}: not a z file this run wrote ({exc}); delete it to recompute its "
                                 "targets") from exc
            if len(ids) != len(z):
                raise ValueError(f"{f}: {len(ids)} case_ids for {len(z)} targets; delete it to recompute them")
            have.update(zip(ids, z))
        return have

    def write(self, case_ids: list[int], z: torch.Tensor) -> None:
        save_tensors(self.folder / f"z-{case_ids[0]}-{case_ids[-1]}.safetensors", {"z": z},
                     {"case_ids": json.dumps(case_ids)})

    def check(self) -> None:
        """Read every z file here and in batch-*/ (a bad one fails now, before any worker starts)."""
        self.read()
        for sub in self.folder.glob("batch-*"):
            TargetStore(sub).read()


class RunState:
    """OUT/run_state.safetensors: where a sequential run stands after its last finished batch."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / RUN_STATE

    def read(self, todo: list[list[EditRequest]], fingerprint: str | None = None) -> tuple[int, dict, dict, dict]:
        """(batches applied, Σ ΔW per module, the solver's or editor's state, meta with `edit_s` keyed by case_id);
        (0, {}, {}, {}) without a file. The batches must be this run's first ones, made on the model with
        `fingerprint` (when given)."""
        if not self.path.exists():
            return 0, {}, {}, {}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads(f.metadata()["run_state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            n = int(meta["batches"])
            meta["edit_s"] = {int(k): v for k, v in meta.get("edit_s", {}).items()}   # JSON made the keys strings
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ValueError(f"{self.path}: not a run state this tool wrote ({exc}); delete it to start the run "
                             "over") from exc
        want = [r.case_id for b in todo[:n] for r in b]
        if n > len(todo) or meta.get("case_ids") != want:
            raise ValueError(f"{self.path}: holds {n} batches of other cases than this run's first {n}; was --limit, "
                             "--batch-size or --data changed? Use another --out or delete the file")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.path}: made on another model (fingerprint {meta.get('fingerprint')}, this one "
                             f"{fingerprint}); use another --out or delete the file")
        deltas = {k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")}
        solver = {k.removeprefix("solver/"): v for k, v in tensors.items() if k.startswith("solver/")}
        return n, deltas, solver, meta

    def write(self, deltas: dict[str, torch.Tensor], solver: dict[str, torch.Tensor], meta: dict) -> None:
        save_tensors(self.path, {**{f"delta/{k}": v for k, v in deltas.items()},
                                 **{f"solver/{k}": v for k, v in solver.items()}},
                     {"run_state": json.dumps(meta)})


class CheckpointLog:
    """OUT/checkpoints.json: per checkpoint, the editing seconds of every edit so far (`edit_s`), the seconds spent
    scoring it (`score_s`, added up when a resumed run scores the rest), the cases scored and each worker's memory
    then (`rss`, `peak_rss`, bytes)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / CHECKPOINTS

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            return list(json.loads(self.path.read_text()))
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ValueError(f"{self.path}: not a checkpoint log this tool wrote ({exc}); delete it") from exc

    def add(self, edits: int, edit_s: float, score_s: float, scored: int, memory: list[dict]) -> None:
        log = {e["edits"]: e for e in self.read()}
        old = log.get(edits, {})
        log[edits] = {"edits": edits, "edit_s": edit_s, "score_s": old.get("score_s", 0.0) + score_s,
                      "scored": old.get("scored", 0) + scored,
                      "rss": max(m["rss"] for m in memory), "peak_rss": max(m["peak_rss"] for m in memory)}
        write_json(self.path, [log[k] for k in sorted(log)])

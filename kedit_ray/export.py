"""Edited models you can ship: a standard Hugging Face directory that plain transformers loads. No Ray here.

    save_model(lm, out_dir)                        the model as it is now (its edits applied), config, tokenizer
    save_edited(lm, edit, out_dir)                 apply a Delta, save the model, revert
    edit_all(editor, lm, requests)                 one Delta holding every request's edit
    apply_deltas(model, delta_paths, out_dir)      load the model, check and apply saved deltas in order, save

    AutoModelForCausalLM.from_pretrained(out_dir), AutoTokenizer.from_pretrained(out_dir)   # the edited model

Adaptors are refused by their kind (`Editor.kind`), with the editor's reason: GRACE's edit is a codebook looked up
by a forward hook at one layer, not a change of weights, so no standard checkpoint can hold it. Ship the codebook
(`kedit edit --method grace --save codebook.safetensors`) and put it on the base model with
`GraceAdaptor.load(path).apply(model)`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from kedit_ray.editors.contract import Editor
from kedit_ray.editors.delta import Delta, Edit
from kedit_ray.editors.grace import Grace
from kedit_ray.models import LM, load
from kedit_ray.requests import EditRequest

GRACE_REFUSAL = Grace.refusal
# config.json keys that describe how kedit got the weights, not the model: gone from a shipped directory
LEFTOVERS = ("quantization_config", "gguf_file", "_model_name_or_path", "_name_or_path")


def _refuse_adaptors(lm: LM) -> None:
    from kedit_ray.editors.grace import active_adaptor

    for name, _ in lm.model.named_modules():
        if name and active_adaptor(lm.model, name) is not None:
            raise ValueError(f"{name} carries a GRACE adaptor: {GRACE_REFUSAL}")


def _clean_config(path: Path) -> None:
    config = json.loads(path.read_text())
    for key in [k for k in config if k in LEFTOVERS or k.startswith("kedit")]:
        del config[key]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, if a model can be written there: it does not exist, or is an empty directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose another or remove it")
    return out


def save_model(lm: LM, out_dir: str | Path) -> Path:
    """Write the model as it is now (safetensors, config.json, generation config, tokenizer) to `out_dir`,
    atomically: into a temp directory beside it, then renamed. `out_dir` must not exist or be empty. An
    offloaded model is saved with its real (edited) weights, read from accelerate's store; the weights keep the
    dtype the model was loaded in."""
    from transformers import AutoTokenizer

    out = check_out_dir(out_dir)
    _refuse_adaptors(lm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        lm.model.save_pretrained(tmp)
        # the tokenizer as shipped (load() gives it a pad token and right padding for kedit's own batches)
        tok = AutoTokenizer.from_pretrained(lm.source) if lm.source else lm.tok
        tok.save_pretrained(tmp)
        _clean_config(tmp / "config.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_edited(lm: LM, edit: Edit, out_dir: str | Path) -> Path:
    """`save_model` with `edit` applied; the model in memory is reverted afterwards."""
    if not isinstance(edit, Delta):
        raise ValueError(GRACE_REFUSAL if type(edit).__name__ == "GraceAdaptor" else
                         f"a {type(edit).__name__} is not a weight delta and cannot be saved into a model")
    with edit.applied(lm.model):
        return save_model(lm, out_dir)


def edit_all(editor: Editor, lm: LM, requests: Sequence[EditRequest]) -> Delta:
    """One Delta with every request: `edit_batch` where the editor is batched (MEMIT, AlphaEdit); otherwise each
    request is edited on the model with the earlier ones applied (the sequential protocol) and the ΔW summed in
    float32. The model is left as it was. Adaptors are refused with their reason."""
    if not requests:
        raise ValueError("no requests to edit")
    if editor.kind != "delta":
        raise ValueError(editor.refusal)
    if editor.batched:
        return editor.edit_batch(lm, list(requests))
    applied: list[Delta] = []
    total: dict[str, torch.Tensor] = {}
    try:
        for req in requests:
            delta = editor.edit(lm, req).apply(lm.model)
            applied.append(delta)
            for name, d in delta.deltas.items():
                d = d.detach().float().cpu()
                total[name] = total[name] + d if name in total else d
    finally:
        for delta in reversed(applied):
            delta.revert(lm.model)
    first = applied[0].meta
    return Delta(total, {"method": first.get("method"), "model": lm.name, "fingerprint": lm.fingerprint,
                         "layer": first.get("layer"), "case_ids": [r.case_id for r in requests], "sequential": True})


def load_delta(path: str | Path) -> Delta:
    """A saved Delta; a GRACE codebook or any other file is refused naming the path."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such delta file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if "kedit_grace" in meta:
        raise ValueError(f"{path} is a GRACE codebook: {GRACE_REFUSAL}")
    return Delta.load(path)


def apply_deltas(model: str, delta_paths: Sequence[str | Path], out_dir: str | Path, dtype: str = "float32",
                 device_map: str | dict | None = None, max_memory: str | dict | None = None,
                 templates: dict[str, str] | None = None) -> Path:
    """Load `model`, check that each delta was made for it (its fingerprint), apply them in order, `save_model`.
    Every file is read and checked before anything is written."""
    if not delta_paths:
        raise ValueError("no delta to apply")
    out = check_out_dir(out_dir)
    deltas = [load_delta(p) for p in delta_paths]
    lm = load(model, device_map=device_map, dtype=dtype, templates=templates, max_memory=max_memory)
    for path, delta in zip(delta_paths, deltas):
        try:
            delta.check_model(lm.name, lm.fingerprint)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for delta in deltas:
        delta.apply(lm.model)
    return save_model(lm, out)

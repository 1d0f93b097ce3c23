"""Editors: each turns EditRequests into an edit object over one shared toolkit (keys, values, deltas).

The interface the protocols (kedit_ray.eval.protocols) rely on:
    editor.edit(lm, request) -> edit                  one request
    editor.edit_batch(lm, requests) -> edit           optional: many at once (MEMIT, AlphaEdit)
    editor.commit(lm, requests)                       optional: called by the sequential protocol once an edit
                                                      of these requests is applied for good (AlphaEdit's K_p)
    edit.apply(model) / edit.revert(model)            revert restores the model bit for bit
    edit.applied(model)                               context manager: apply, then revert
    edit.save(path)                                   safetensors
    edit.meta                                         JSON-able dict: "method", "layer", ...; `meta["checkpoint"]`,
                                                      a dict of numbers, adds figures to the sequential summary
Delta (ΔW per module) is one such edit object. The sequential protocol applies edits batch after batch with no
revert; for an editor without edit_batch it edits a batch's requests one by one on the current model.
Registry: EDITORS[name] = (editor class, params class with from_dict(dict)).
"""
from kedit_ray.editors.alphaedit import AlphaEdit, AlphaEditParams
from kedit_ray.editors.delta import Delta, Edit
from kedit_ray.editors.ft import FT, FTLParams, FTParams
from kedit_ray.editors.grace import Grace, GraceAdaptor, GraceParams
from kedit_ray.editors.ke import KE
from kedit_ray.editors.learned import LearnedParams
from kedit_ray.editors.memit import Memit, MemitParams
from kedit_ray.editors.mend import MEND
from kedit_ray.editors.rome import Rome, RomeParams
from kedit_ray.editors.ultraedit import UltraEdit, UltraEditParams

EDITORS = {"rome": (Rome, RomeParams)}
EDITORS["memit"] = (Memit, MemitParams)
EDITORS["alphaedit"] = (AlphaEdit, AlphaEditParams)
EDITORS["grace"] = (Grace, GraceParams)
EDITORS["ft"] = (FT, FTParams)
EDITORS["ft-l"] = (FT, FTLParams)
EDITORS["ke"] = (KE, LearnedParams)
EDITORS["mend"] = (MEND, LearnedParams)
EDITORS["ultraedit"] = (UltraEdit, UltraEditParams)


def make_editor(method: str, params: dict | None = None):
    if method not in EDITORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(EDITORS))}")
    cls, params_cls = EDITORS[method]
    return cls(params_cls.from_dict(params or {}))


__all__ = ["AlphaEdit", "AlphaEditParams", "Delta", "EDITORS", "Edit", "FT", "FTParams", "FTLParams", "Grace",
           "GraceAdaptor", "GraceParams", "KE", "LearnedParams", "MEND", "Memit", "MemitParams", "Rome", "RomeParams",
           "UltraEdit", "UltraEditParams", "make_editor"]

"""Editors: each turns EditRequests into an edit object over one shared toolkit (keys, values, deltas).

The contract (kedit_ray.editors.contract.Editor) is what the protocols, workers, export and CLI rely on:
    editor.edit(lm, request) -> edit                  one request
    editor.edit_batch(lm, requests) -> edit           where `editor.batched`: many at once (MEMIT, AlphaEdit)
    editor.kind                                       "delta" (a weight Delta) or "adaptor" (GRACE), + `refusal`
    editor.prepare / commit / reset / state / load_state / check_settings / stats_need   hooks
    edit.apply(model) / edit.revert(model)            revert restores the model bit for bit
    edit.applied(model)                               context manager: apply, then revert
    edit.save(path)                                   safetensors
    edit.meta                                         JSON-able dict: "method", "layer", ...; `meta["checkpoint"]`,
                                                      a dict of numbers, adds figures to the sequential summary
Registry: EDITORS[name] = (editor class, params class with from_dict(dict)); `register` adds one, and with it its
params' options (`contract.option`) to the CLI.
"""
from kedit_ray.editors.alphaedit import AlphaEdit, AlphaEditParams
from kedit_ray.editors.contract import Editor
from kedit_ray.editors.delta import Delta, Edit, Hooked
from kedit_ray.editors.emmet import Emmet, EmmetParams
from kedit_ray.editors.ft import FT, FTLParams, FTParams
from kedit_ray.editors.grace import Grace, GraceAdaptor, GraceParams
from kedit_ray.editors.ike import Ike, IkeContext, IkeParams
from kedit_ray.editors.ke import KE
from kedit_ray.editors.learned import LearnedParams
from kedit_ray.editors.lora import LoRA, LoRAParams
from kedit_ray.editors.memit import Memit, MemitParams
from kedit_ray.editors.mend import MEND
from kedit_ray.editors.rome import Rome, RomeParams
from kedit_ray.editors.ultraedit import UltraEdit, UltraEditParams
from kedit_ray.editors.wise import Wise, WiseAdaptor, WiseParams

EDITORS: dict[str, tuple[type[Editor], type]] = {}


def register(name: str, editor: type[Editor], params: type) -> None:
    """Add an editor under `name` (`kedit eval --method NAME`); its params' options join the CLI."""
    if not (isinstance(editor, type) and issubclass(editor, Editor)):
        raise TypeError(f"{name}: {editor!r} is not an Editor subclass")
    EDITORS[name] = (editor, params)


for _name, _editor, _params in [("rome", Rome, RomeParams), ("memit", Memit, MemitParams),
                                ("alphaedit", AlphaEdit, AlphaEditParams), ("grace", Grace, GraceParams),
                                ("ft", FT, FTParams), ("ft-l", FT, FTLParams), ("ke", KE, LearnedParams),
                                ("mend", MEND, LearnedParams), ("ultraedit", UltraEdit, UltraEditParams),
                                ("emmet", Emmet, EmmetParams), ("lora", LoRA, LoRAParams),
                                ("wise", Wise, WiseParams), ("ike", Ike, IkeParams)]:
    register(_name, _editor, _params)


def make_editor(method: str, params: dict | None = None):
    if method not in EDITORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(EDITORS))}")
    cls, params_cls = EDITORS[method]
    return cls(params_cls.from_dict(params or {}))


__all__ = ["AlphaEdit", "AlphaEditParams", "Delta", "EDITORS", "Edit", "Editor", "Emmet", "EmmetParams", "FT",
           "FTParams", "FTLParams", "Grace", "GraceAdaptor", "GraceParams", "Hooked", "Ike", "IkeContext", "IkeParams",
           "KE", "LearnedParams", "LoRA", "LoRAParams", "MEND", "Memit", "MemitParams", "Rome", "RomeParams",
           "UltraEdit", "UltraEditParams", "Wise", "WiseAdaptor", "WiseParams", "make_editor", "register"]

"""The learned editors' networks by method name (KE, MEND): for training, and for reading a checkpoint whose
method is in its editor.json."""
from __future__ import annotations

from pathlib import Path

from kedit_ray.editors.ke import KE
from kedit_ray.editors.learned import META_FILE, HyperNet, make_net, read_meta, read_net
from kedit_ray.editors.mend import MEND
from kedit_ray.models import LM

NETS = {editor.name: editor.net for editor in (KE, MEND)}


def _classes(method: str) -> tuple[type, type]:
    if method not in NETS:
        raise ValueError(f"unknown learned editor {method!r}; choose {' or '.join(NETS)}")
    return NETS[method]


def build_net(lm: LM, method: str, cfg: dict) -> tuple[HyperNet, list[str]]:
    """The network of `method` for `lm` from its config dict (KEConfig / MENDConfig fields)."""
    return make_net(lm, *_classes(method), cfg)


def load_net(lm: LM, out: str | Path, method: str | None = None) -> tuple[HyperNet, list[str], dict]:
    """The trained network in OUT for `lm` (of `method`, else of the method its editor.json names)."""
    if method is None:
        meta = read_meta(out)
        if meta is None:
            raise FileNotFoundError(f"{Path(out) / META_FILE}: no editor checkpoint there; train one with "
                                    f"`kedit train --out {out}`")
        method = meta["method"]
    return read_net(lm, out, method, *_classes(method))

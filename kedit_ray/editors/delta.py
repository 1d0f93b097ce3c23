"""A weight delta: apply, revert bit for bit, save and load as safetensors."""
from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kedit_ray.io import save_tensors
from kedit_ray.models.hooks import get_module, weight_of
from kedit_ray.models.weights import set_weight, weight


class Edit(abc.ABC):
    """What every edit object shares: `apply(model)`, `revert(model)`, and `applied(model)` around a block."""

    @abc.abstractmethod
    def apply(self, model: nn.Module) -> Edit: ...

    @abc.abstractmethod
    def revert(self, model: nn.Module) -> None: ...

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[Edit]:
        self.apply(model)
        try:
            yield self
        finally:
            self.revert(model)


class Delta(Edit):
    """ΔW per module, in [out, in] orientation: W' = W + ΔW. `meta` says how it was made (JSON-able)."""

    def __init__(self, deltas: dict[str, torch.Tensor], meta: dict | None = None):
        self.deltas = deltas
        self.meta = dict(meta or {})
        self._backup: dict[str, torch.Tensor] | None = None

    def apply(self, model: nn.Module) -> Delta:
        """W' = W + ΔW for each module, summed in float32 (or wider) and cast once to W's dtype, on W's device
        (the offload store's, for an offloaded module: see kedit_ray.models.weights)."""
        if self._backup is not None:
            raise RuntimeError("this delta is already applied; revert it first")
        for name, d in self.deltas.items():   # check every shape first: a refused delta changes nothing
            shape = weight_of(get_module(model, name)).shape
            if shape != d.shape:
                raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, the weight has {tuple(shape)}")
        backup = {}
        for name, d in self.deltas.items():
            w = weight(model, name)
            backup[name] = w.detach().clone()
            acc = torch.promote_types(torch.promote_types(w.dtype, d.dtype), torch.float32)
            set_weight(model, name, (w.to(acc) + d.to(w.device, acc)).to(w.dtype))
        self._backup = backup
        return self

    def revert(self, model: nn.Module) -> None:
        """Restore the exact weights seen by `apply` (a copy, not a subtraction: bit for bit)."""
        if self._backup is None:
            raise RuntimeError("this delta is not applied")
        for name, w0 in self._backup.items():
            set_weight(model, name, w0)
        self._backup = None

    def release(self) -> None:
        """Leave the delta in the weights for good: forget the copy of W kept to revert (it can be applied again to
        a model without it)."""
        if self._backup is None:
            raise RuntimeError("this delta is not applied")
        self._backup = None

    def weights_before(self) -> dict[str, torch.Tensor]:
        """The weights `apply` saw (kept to revert)."""
        if self._backup is None:
            raise RuntimeError("this delta is not applied")
        return self._backup

    def norms(self) -> dict[str, float]:
        return {name: d.float().norm().item() for name, d in self.deltas.items()}

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, self.deltas, {"kedit_delta": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> Delta:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "kedit_delta" not in meta:
                raise ValueError(f"{path} is not a kedit delta file (no 'kedit_delta' metadata)")
            deltas = {k: f.get_tensor(k) for k in f.keys()}
        return cls(deltas, json.loads(meta["kedit_delta"]))

    def check_model(self, model_name: str, fingerprint: str) -> None:
        """Refuse a delta made for another model."""
        if self.meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"this delta was made for {self.meta.get('model')!r} (fingerprint "
                             f"{self.meta.get('fingerprint')}), not for {model_name!r} ({fingerprint})")

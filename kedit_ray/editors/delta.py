"""A weight delta: apply, revert bit for bit, save and load as safetensors."""
from __future__ import annotations

import abc
import contextlib
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from kedit_ray.io import load_tagged, save_tensors
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


class Hooked(Edit):
    """An edit made of forward hooks, not weights (GRACE's codebook, WISE's side memory, IKE's context). The edits
    of one class applied at one place (a module, or the model) stack, the last one active: a hook does nothing
    unless its edit is `stack[-1]`; `suspended(place)` (None on the stack) turns them all off. A subclass names
    its `place` and registers its `hooks`; `what` names it in errors."""

    what: ClassVar[str] = "edit"
    _stacks: ClassVar[weakref.WeakKeyDictionary]
    _handles: tuple = ()                          # the registered hooks' handles while applied
    _model: nn.Module | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._stacks = weakref.WeakKeyDictionary()     # place -> the edits applied there, the last one active

    @abc.abstractmethod
    def place(self, model: nn.Module) -> nn.Module: ...

    @abc.abstractmethod
    def hooks(self, model: nn.Module, stack: list) -> list:
        """Register the hooks on `model`; their handles."""

    def reset(self) -> None:
        """Forget what the hooks cached (after revert)."""

    def apply(self, model: nn.Module) -> Hooked:
        if self._handles:
            raise RuntimeError(f"this {self.what} is already applied; revert it first")
        stack = self._stacks.setdefault(self.place(model), [])
        stack.append(self)
        try:
            self._handles, self._model = tuple(self.hooks(model, stack)), model
        except BaseException:                         # e.g. a module it hooks is missing: nothing applied
            stack.remove(self)
            raise
        return self

    def revert(self, model: nn.Module) -> None:
        if not self._handles or self._model is not model:
            raise RuntimeError(f"this {self.what} is not applied to this model")
        for h in self._handles:
            h.remove()
        self._stacks[self.place(model)].remove(self)
        self._handles, self._model = (), None
        self.reset()

    @classmethod
    def active(cls, place: nn.Module) -> Hooked | None:
        stack = cls._stacks.get(place)
        return stack[-1] if stack else None

    @classmethod
    @contextlib.contextmanager
    def suspended(cls, place: nn.Module) -> Iterator[None]:
        """No edit of this class acts at `place` inside (e.g. while an edit trains there)."""
        stack = cls._stacks.setdefault(place, [])
        stack.append(None)
        try:
            yield
        finally:
            stack.remove(None)


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
        deltas, meta = load_tagged(path, "kedit_delta", "a kedit delta file")
        return cls(deltas, json.loads(meta))

    def check_model(self, model_name: str, fingerprint: str) -> None:
        """Refuse a delta made for another model."""
        if self.meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"this delta was made for {self.meta.get('model')!r} (fingerprint "
                             f"{self.meta.get('fingerprint')}), not for {model_name!r} ({fingerprint})")

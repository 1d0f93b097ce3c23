"""Editors: each turns an EditRequest into a Delta over one shared toolkit (keys, values, deltas)."""
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.rome import Rome, RomeParams

EDITORS = {"rome": (Rome, RomeParams)}


def make_editor(method: str, params: dict | None = None):
    if method not in EDITORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(EDITORS))}")
    cls, params_cls = EDITORS[method]
    return cls(params_cls.from_dict(params or {}))


__all__ = ["Delta", "EDITORS", "Rome", "RomeParams", "make_editor"]

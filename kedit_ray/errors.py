"""Errors the user can act on; `kedit` prints them as one line and exits non-zero."""
from __future__ import annotations


class SettingError(ValueError):
    """A setting an editor cannot work without or with; `param` names it (the CLI names its flag)."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"{param}: {reason}")
        self.param, self.reason = param, reason

    def __reduce__(self):   # rebuilt from its fields when it crosses processes (Ray workers)
        return type(self), (self.param, self.reason)


class PoolError(RuntimeError):
    """A run on workers cannot go on: a worker could not start, none could be placed, a task took down every
    worker that tried it, or a sequential run's task raised (the work finished so far is saved)."""

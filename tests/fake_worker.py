"""A pool worker for the pool tests: no model; `echo` returns its item with the value last broadcast, and makes
its process exit on die["item"], die["times"] times in all (counted in the file die["file"])."""
from __future__ import annotations

import os
import time
from pathlib import Path

from kedit_ray.distributed.worker import ModelWorker


class FakeWorker(ModelWorker):
    def __init__(self, index: int, cpus: float, gpus: list | None = None):
        super().__init__(None, index, cpus, gpus)
        self.value = None

    def set(self, value) -> None:
        self.value = value

    def echo(self, item, die: dict | None = None) -> tuple:
        if die and item == die["item"]:
            counter = Path(die["file"])
            died = int(counter.read_text()) if counter.exists() else 0
            if died < die.get("times", 1):
                counter.write_text(str(died + 1))
                os._exit(1)
        time.sleep(0.01)
        return item, self.value, self.name

    def count(self, n: int, die: dict | None = None, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad step {i}")
            yield self.echo(i, die)


class FakeEditor:
    """What share_covariances asks of an editor: the statistics it needs, and C to use instead of its cache."""

    def __init__(self):
        self.hp, self.covs = type("Hp", (), {"compute_stats": False})(), None

    def stats_need(self, lm) -> tuple:
        return ("mlp_out", (1, 2))

    def use_covariances(self, lm, covs: dict) -> None:
        self.covs = covs


class CovWorker(FakeWorker):
    def __init__(self, index: int, cpus: float, gpus: list | None = None):
        super().__init__(index, cpus, gpus)
        self.editor = FakeEditor()

    def covs(self, item) -> tuple:
        return self.name, self.editor.covs

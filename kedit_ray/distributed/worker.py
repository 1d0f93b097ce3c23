"""EditWorker: a Ray actor holding one case runner (so one model) that runs cases one at a time.

The runner class is named by `config["runner"]` ("module:qualname", default the CounterFact
CaseRunner); its module must be importable on every node (kedit_ray is installed there; a
module of your own goes in via PYTHONPATH or `ray job submit --runtime-env-json`).
A case whose runner raises becomes a row with `error` set; the worker keeps no other state.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import traceback

import ray

from kedit_ray.requests import EditRequest

DEFAULT_RUNNER = "kedit_ray.eval.runner:CaseRunner"


def load_runner(spec: str) -> type:
    """"package.module:Class" → the class."""
    module, _, qualname = spec.partition(":")
    if not qualname:
        raise ValueError(f"runner must be 'module:qualname', got {spec!r}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def error_row(config: dict, request: EditRequest, exc: BaseException) -> dict:
    """The row of a failed case: metrics null, `error` = exception type and message."""
    return {"case_id": request.case_id, "method": config.get("method"), "model": config.get("model"),
            "error": f"{type(exc).__name__}: {exc}"}


@ray.remote
class EditWorker:
    def __init__(self, config: dict, index: int, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.config = config
        self.name = f"w{index}@{socket.gethostname()}:{os.getpid()}"
        self.runner = load_runner(config.get("runner", DEFAULT_RUNNER))(config)

    def ready(self) -> str:
        return self.name

    def run(self, request: EditRequest) -> dict:
        try:
            row = dict(self.runner.run(request))
        except Exception as exc:  # noqa: BLE001 - any failure of one case becomes its error row
            print(f"case {request.case_id} failed on {self.name}:\n{traceback.format_exc()}", file=sys.stderr)
            row = error_row(self.config, request, exc)
        row["worker"] = self.name
        return row

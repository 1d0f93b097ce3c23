"""`kedit train` on Ray Train: a TorchTrainer runs kedit_ray.train.train_loop on `workers` CPU workers, with
torch.distributed over gloo (the loop all-reduces the network's gradients). Ray Train's own files go under
OUT/ray; the editor's checkpoint is the loop's (OUT/editor.*), so a rerun resumes from it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kedit_ray.editors.learned import read_meta


def _worker(config: dict) -> None:
    from kedit_ray.train import train_loop

    train_loop(config)


def run_train(config: dict, workers: int, address: str | None = None) -> dict:
    """Train with `workers` Ray Train workers (one CPU and `threads` torch threads each); returns the last
    step's figures (averaged over workers, from OUT/editor.json). Joins `address` (or $RAY_ADDRESS), else starts
    a local Ray."""
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    started = not ray.is_initialized()
    address = address or os.environ.get("RAY_ADDRESS")
    if started and address:
        ray.init(address=address, logging_level=logging.WARNING)
    elif started:
        ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")
    try:
        trainer = TorchTrainer(
            _worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="ray", storage_path=str(Path(config["out"]).resolve())))
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    return read_meta(config["out"])["figures"]

"""`kedit train` on Ray Train: a TorchTrainer runs the training loop on `workers` workers, with torch.distributed
over gloo (the loop all-reduces the network's gradients). Ray Train's own files go under OUT/ray; the editor's
checkpoint is the loop's (OUT/editor.*), so a rerun resumes from it. Ray is joined or started by cluster.connect,
like every other command's."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kedit_ray.distributed.cluster import connect
from kedit_ray.spec import Resources


def run_train(loop: Callable[[dict], object], config: dict, resources: Resources) -> None:
    """`loop(config)` on resources.workers Ray Train workers (each resources.cpus() CPUs and its GPUs)."""
    gpus = resources.gpus_per_worker
    with connect(resources):
        trainer = TorchTrainer(
            loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": resources.cpus(), **({"GPU": gpus} if gpus else {})}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="ray", storage_path=str(Path(config["out"]).resolve())))
        result = trainer.fit()
    if result.error is not None:
        raise result.error

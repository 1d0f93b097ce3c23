"""The distributed layer's pieces: the device policy, the capacity check, GPUs on Ray's logical resources, and the
pool's fault policy (scatter, broadcast, generate) with a worker that holds no model."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kedit_ray.distributed.cluster import fits
from kedit_ray.distributed.worker import placement
from kedit_ray.spec import Resources, usable_cores

TESTS = str(Path(__file__).resolve().parent)


def test_placement_with_cuda_and_without():
    assert placement([], None, 0) == (None, "cpu")
    assert placement([], None, 2) == (None, "cpu")                       # GPUs there, none assigned: the CPU
    for gpu_map in ("auto", {"model": 0, "lm_head": "cpu"}):             # maps that would take a GPU not reserved
        device_map, said = placement([], gpu_map, 2)
        assert device_map is None and f"--device-map {gpu_map} set aside" in said
    offload = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    assert placement([], offload, 2)[0] == offload                        # CPU and disk only: kept
    assert placement([], "auto", 0)[0] == "auto"                          # no GPU to take: kept
    assert placement([3], None, 1) == ({"": 0}, "GPU [3]")                # Ray's id 3 is CUDA's 0 in the worker
    assert placement([0, 1], None, 2) == ("auto", "GPU [0, 1]")
    assert placement([0, 1], {"model": 1}, 2)[0] == {"model": 1}          # the user's map, on assigned GPUs
    device_map, said = placement([0], None, 0)                            # a GPU assigned to a CPU-only torch
    assert device_map is None and "sees no CUDA device" in said


def test_capacity_counts_whole_workers_per_node():
    two = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}]
    assert fits(two, 3, 1, 0) == 3 and fits(two, 4, 1, 0) == 3
    assert fits(two, 3, 0.5, 0) == 3 and fits(two, 6, 0.5, 0) == 6        # 0.5 CPU: no rounding away
    assert fits(two, 2, 1, 0.5) == 2 and fits(two, 3, 1, 0.5) == 2        # two share the one GPU
    assert fits(two, 2, 1, 1) == 1
    assert fits([{"CPU": 2.0}], 3, 2 / 3, 0) == 3                          # Ray takes 2/3 as 0.6666
    assert fits([{"CPU": 2.0}], 3, 0.6667, 0) == 2                         # 3 × 0.6667 > 2


def test_resources_defaults_and_checks(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert Resources(1).in_process and Resources(1).cpus() == float(usable_cores())
    assert not Resources(2).in_process and Resources(2, 0.5).cpus() == 0.5
    monkeypatch.setenv("RAY_ADDRESS", "auto")                              # honoured like --address
    assert not Resources(1).in_process and Resources(1).cluster == "auto" and Resources(1).cpus() == 1.0
    for bad in (dict(workers=0), dict(workers=1, cpus_per_worker=0), dict(workers=1, gpus_per_worker=-1)):
        with pytest.raises(ValueError, match="--"):
            Resources(**bad)


def test_in_process_worker_takes_every_core(monkeypatch):
    import torch
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import open_pool

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = torch.get_num_threads()
    with open_pool(FakeWorker, (), Resources(1)) as pool:
        assert pool.infos[0].threads == usable_cores() == torch.get_num_threads()
    assert torch.get_num_threads() == before                              # given back to the driver


def test_in_process_pool_refuses_other_weights():
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import open_pool

    with pytest.raises(ValueError, match="different weights"):
        with open_pool(FakeWorker, (), Resources(1), expected="0123456789abcdef"):
            pass


def test_three_workers_of_half_a_cpu_start_a_local_ray_that_holds_them(monkeypatch):
    """(Before any test here initialises Ray.) 3 × 0.5 CPU: the local Ray gets the CPUs for all three, not
    int(1.5) = 1, and is shut down by the pool that started it."""
    import ray
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import open_pool

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with open_pool(FakeWorker, (), Resources(3, cpus_per_worker=0.5)) as pool:
        assert len(pool.infos) == 3 and ray.cluster_resources()["CPU"] >= 1.5
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def logical_gpus():
    """A local Ray with two logical GPUs on this CPU machine; the tests' modules on the workers' path."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1")
        yield
        ray.shutdown()


@pytest.mark.parametrize("gpus,workers", [(1, 2), (0.5, 2)])
def test_workers_given_gpus_are_scheduled_and_place_through_the_policy(logical_gpus, gpus, workers):
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import open_pool

    with open_pool(FakeWorker, (), Resources(workers, cpus_per_worker=0.5, gpus_per_worker=gpus)) as pool:
        infos = pool.infos
    assert len(infos) == workers
    ids = [placement_ids(i.device) for i in infos]
    for info, gpu_ids in zip(infos, ids):
        assert info.device == placement(gpu_ids, None, 0)[1]               # the one function decided
    if gpus == 1:
        assert sorted(i for g in ids for i in g) == [0, 1]                 # one GPU each
    else:
        assert all(len(g) == 1 for g in ids)                               # each on (half of) one GPU


def placement_ids(device: str) -> list[int]:
    """The GPU ids in placement's description ("cpu (GPU [0] assigned, ...)")."""
    import json

    return json.loads(device[device.index("["):device.index("]") + 1])


def test_more_gpus_than_the_cluster_has_fail_at_once(logical_gpus):
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import open_pool

    with pytest.raises(ValueError, match=r"3 workers × 0.5 CPUs × 1 GPUs do not fit .*2 GPU.*room for 2"):
        with open_pool(FakeWorker, (), Resources(3, cpus_per_worker=0.5, gpus_per_worker=1)):
            pass


def test_scatter_broadcast_and_generate_survive_a_dead_worker(logical_gpus, tmp_path):
    from fake_worker import FakeWorker

    from kedit_ray.distributed.pool import Lost, RayPool
    from kedit_ray.errors import PoolError

    with RayPool(FakeWorker, (), Resources(2, cpus_per_worker=0.5), 2) as pool:
        first = {i.name for i in pool.infos}
        pool.broadcast("set", "C")
        die = {"item": 3, "file": str(tmp_path / "scatter")}
        out = pool.scatter(list(range(6)), "echo", die)
        assert [o[0] for o in out] == list(range(6)) and {o[1] for o in out} == {"C"} and pool.replaced == 1
        deadline = time.monotonic() + 60
        while len(pool.infos) < 2 and time.monotonic() < deadline:   # the replacement joins once it has started
            out += pool.scatter(list(range(4)), "echo")
        out += pool.scatter(list(range(8)), "echo")   # both workers take part
        new = {o[2] for o in out} - first
        assert len(new) == 1 and {o[1] for o in out if o[2] in new} <= {"C"}   # replayed the broadcast first
        assert len(pool.infos) == 2
        die = {"item": 1, "file": str(tmp_path / "stream"), "times": 2}
        got = dict(pool.stream(range(4), "echo", die))
        assert isinstance(got[1], Lost) and "took down 2 workers" in got[1].message
        assert [got[i][0] for i in (0, 2, 3)] == [0, 2, 3] and pool.replaced == 3
        die = {"item": 2, "file": str(tmp_path / "generate")}
        values = [v[0] for v in pool.generate("count", 4, die)]
        assert values == [0, 1, 0, 1, 2, 3]                                # started over on another worker
        deadline = time.monotonic() + 60
        while len(pool.infos) < 2 and time.monotonic() < deadline:   # the replacement joins
            pool.scatter(list(range(4)), "echo")
        replaced = pool.replaced
        with pytest.raises(PoolError, match="count raised on a worker: ValueError: bad step 2; the work finished"):
            list(pool.generate("count", 4, None, 2))
        names = {o[2] for o in pool.scatter(list(range(8)), "echo")}       # it raised, and serves on: both do
        assert pool.replaced == replaced and len(names) == 2


def test_driver_resolves_c_once_and_ships_it_to_every_worker(logical_gpus, monkeypatch):
    """The hook of `kedit eval`: the driver asks one worker what C its editor needs, reads it once (computing what is
    missing on the pool's own workers), and every worker's editor gets it through the object store."""
    import sys
    import types

    from fake_worker import CovWorker

    from kedit_ray.distributed.driver import share_covariances
    from kedit_ray.distributed.pool import RayPool
    from kedit_ray.spec import EvalSpec, ModelSpec

    calls = []

    def read_covariances(model, need, compute, pool=None):
        calls.append((model, need, compute, pool))
        return {1: ("C1", {"path": "stats/L01"}), 2: ("C2", {"path": "stats/L02"})}

    monkeypatch.setitem(sys.modules, "kedit_ray.editors.covariance",
                        types.SimpleNamespace(read_covariances=read_covariances))
    with RayPool(CovWorker, (), Resources(2, cpus_per_worker=0.5), 2) as pool:
        share_covariances(pool, EvalSpec(ModelSpec("org/model"), "rome"))
        got = dict(pool.scatter(["a", "b"], "covs"))
    assert calls == [("org/model", ("mlp_out", (1, 2)), False, pool)]
    assert len(got) == 2 and all(c == {1: ("C1", {"path": "stats/L01"}), 2: ("C2", {"path": "stats/L02"})}
                                 for c in got.values())

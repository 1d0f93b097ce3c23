"""The pool under faults, on a two-node Ray cluster simulated here (ray.cluster_utils.Cluster, one CPU a node):
a worker process killed (SIGKILL) in the middle of its task, for eval (single, batch MEMIT, sequential AlphaEdit,
a sequential checkpoint's scoring),
stats and trace; a whole node removed mid-run; the driver and all it started killed, then the same command run
again. Each run ends complete, every case_id once, no error rows; the statistics equal an uninterrupted run's.
The runs use a tiny random Llama saved to a directory (conftest's tiny_dir: the workers load it by path)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import make_tiny_lm
from ray_procs import MARK, KillWhenBusy, kill, marked, new_mark
from test_protocols import cases
from test_stats import write_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(Path(__file__).resolve().parent)
ROME = {"layer": 1, "n_prefixes": 2, "prefix_len": 4, "use_cov": False, "values": {"steps": 30, "early_stop": False}}
MEMIT = {"layers": [1, 2], "n_prefixes": 2, "prefix_len": 4, "mom2_update_weight": 1e-3, "use_cov": False,
         "values": {"steps": 30, "early_stop": False}}


@pytest.fixture
def cluster(monkeypatch):
    """A head and a second node, one CPU each; their processes carry a mark of their own. The driver is
    connected; yields (the Cluster, the second node, the mark)."""
    import ray
    from ray.cluster_utils import Cluster

    mark = new_mark()
    monkeypatch.setenv(MARK, mark)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), TESTS, os.environ.get("PYTHONPATH", "")]))
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    node = c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING")
    try:
        yield c, node, mark
    finally:
        ray.shutdown()
        c.shutdown()
        kill(marked(mark))


def spec(tiny_dir: str, method: str, params: dict, workers: int = 2, **kw):
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    return EvalSpec(ModelSpec(tiny_dir), method, params, "counterfact", resources=Resources(workers), **kw)


def rows_of(out) -> list[dict]:
    from kedit_ray.results import read_results

    return read_results(out).to_pylist()


def assert_whole(rows: list[dict], want: list) -> None:
    """Every wanted key once, no error row."""
    keys = [r["case_id"] if isinstance(want[0], int) else (r["case_id"], r["checkpoint"]) for r in rows]
    assert sorted(keys) == sorted(want) and not [r["error"] for r in rows if r["error"] is not None]


def assert_same(rows: list[dict], reference: list[dict], columns: tuple[str, ...]) -> None:
    key = (lambda r: (r["case_id"], r.get("checkpoint")))
    ref = {key(r): r for r in reference}
    for r in rows:
        for c in columns:
            assert r[c] == pytest.approx(ref[key(r)][c], abs=2e-3), (key(r), c)


def test_eval_single_survives_a_killed_worker(cluster, tiny_dir, tmp_path):
    from kedit_ray.distributed.driver import run_eval

    _, _, mark = cluster
    killer = KillWhenBusy(mark, "ray::EditWorker.run")
    killer.start()
    summary = run_eval(spec(tiny_dir, "rome", ROME), cases(6), tmp_path / "ray", progress=False)
    killer.join()
    assert killer.killed is not None and summary["complete"] and summary["errors"] == 0
    rows = rows_of(tmp_path / "ray")
    assert_whole(rows, list(range(6)))
    assert str(killer.killed) not in {r["worker"].rsplit(":", 1)[1] for r in rows}   # its case went elsewhere
    run_eval(spec(tiny_dir, "rome", ROME, workers=1), cases(6), tmp_path / "one", progress=False)
    assert_same(rows, rows_of(tmp_path / "one"), ("efficacy_magnitude", "neighborhood_magnitude"))


def test_batch_memit_survives_a_killed_worker(cluster, tiny_dir, tmp_path):
    from kedit_ray.distributed.batch import run_protocol_eval

    _, _, mark = cluster
    killer = KillWhenBusy(mark, "ray::BatchWorker.targets")             # in the middle of computing z
    killer.start()
    run = spec(tiny_dir, "memit", MEMIT, protocol="batch", batch_size=6)
    summary = run_protocol_eval(run, cases(6), tmp_path / "ray", progress=False)
    killer.join()
    assert killer.killed is not None and summary["complete"] and summary["errors"] == 0
    rows = rows_of(tmp_path / "ray")
    assert_whole(rows, list(range(6)))
    one = spec(tiny_dir, "memit", MEMIT, workers=1, protocol="batch", batch_size=6)
    run_protocol_eval(one, cases(6), tmp_path / "one", progress=False)
    assert_same(rows, rows_of(tmp_path / "one"), ("efficacy_magnitude", "paraphrase_magnitude",
                                                  "neighborhood_magnitude"))


def test_sequential_alphaedit_survives_a_killed_worker(cluster, tiny_dir, tmp_path):
    """Killed while computing the second batch's z, on the model edited by the first: the replacement applies the
    first batch's ΔW from the object store by itself."""
    from kedit_ray.distributed.batch import run_protocol_eval

    _, _, mark = cluster
    out = tmp_path / "ray"
    killer = KillWhenBusy(mark, "ray::BatchWorker.targets", ready=lambda: (out / "run_state.safetensors").exists())
    killer.start()
    kw = dict(protocol="sequential", batch_size=2, checkpoints=[2, 4], held_out=[4, 5])
    summary = run_protocol_eval(spec(tiny_dir, "alphaedit", MEMIT, **kw), cases(4), out, held_out=cases(2, 4),
                                progress=False)
    killer.join()
    assert killer.killed is not None and summary["complete"] and summary["errors"] == 0
    rows = rows_of(out)
    assert_whole(rows, [(i, 2) for i in (0, 1, 4, 5)] + [(i, 4) for i in range(6)])
    run_protocol_eval(spec(tiny_dir, "alphaedit", MEMIT, workers=1, **kw), cases(4), tmp_path / "one",
                      held_out=cases(2, 4), progress=False)
    assert_same(rows, rows_of(tmp_path / "one"), ("efficacy_magnitude", "neighborhood_magnitude"))


def test_sequential_ultraedit_checkpoint_scoring_survives_a_killed_worker(cluster, tiny_dir, tmp_path):
    """Killed while scoring a checkpoint share (every worker scores one, with Σ ΔW from the object store): the
    share goes to the other worker or the replacement, nothing is lost, and the rows equal one worker's run."""
    from kedit_ray.distributed.batch import run_protocol_eval

    _, _, mark = cluster
    out = tmp_path / "ray"
    killer = KillWhenBusy(mark, "ray::BatchWorker.scores", ready=lambda: (out / "run_state.safetensors").exists())
    killer.start()
    params = {"layers": [1, 2], "eta": 1e-2}
    kw = dict(protocol="sequential", batch_size=2, checkpoints=[2, 4], held_out=[4, 5])
    summary = run_protocol_eval(spec(tiny_dir, "ultraedit", params, **kw), cases(4), out, held_out=cases(2, 4),
                                progress=False)
    killer.join()
    assert killer.killed is not None and summary["complete"] and summary["errors"] == 0
    rows = rows_of(out)
    assert_whole(rows, [(i, 2) for i in (0, 1, 4, 5)] + [(i, 4) for i in range(6)])
    run_protocol_eval(spec(tiny_dir, "ultraedit", params, workers=1, **kw), cases(4), tmp_path / "one",
                      held_out=cases(2, 4), progress=False)
    assert_same(rows, rows_of(tmp_path / "one"), ("efficacy_magnitude", "neighborhood_magnitude"))


def test_stats_survive_a_killed_worker(cluster, tiny_dir, tmp_path):
    """Against an uninterrupted run on the same workers (one thread each, so each shard's sums are the same
    arithmetic): the C differ only by the order the float64 shard sums were added in, far below 1e-6."""
    from kedit_ray.models import load
    from kedit_ray.stats import compute_stats, layer_stats

    _, _, mark = cluster
    text = write_corpus(tmp_path / "corpus.raw", n_sections=12)
    kw = dict(corpus=text, samples=40, dtype="float64", shard_docs=2, progress=False)
    killer = KillWhenBusy(mark, "ray::ModelWorker.stats_shard")
    killer.start()
    killed = compute_stats(tiny_dir, [0, 2], cache=tmp_path / "killed", workers=2, **kw)
    killer.join()
    assert killer.killed is not None
    whole = compute_stats(tiny_dir, [0, 2], cache=tmp_path / "whole", workers=2, **kw)
    lm = load(tiny_dir)
    for a, b in zip(whole, killed):
        assert a["count"] == b["count"] and a["documents"] == b["documents"] > 30
        ca, cb = (layer_stats(lm, a["layer"], cache=tmp_path / d, compute=False, corpus=text, samples=40,
                              dtype="float64")[0] for d in ("whole", "killed"))
        assert float((cb - ca).norm() / ca.norm()) < 1e-6


def test_trace_survives_a_killed_worker(cluster, tiny_dir, tmp_path):
    import numpy as np

    from kedit_ray.tracing import command
    from test_tracing import tiny_facts_file

    _, _, mark = cluster
    data = tiny_facts_file(make_tiny_lm(), tmp_path)   # the model of tiny_dir: its own answers

    def trace(*argv: str) -> dict:
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        common = ["--model", tiny_dir, "--data", str(data), "--samples", "4", "--window", "3", "--no-fact-plots"]
        assert command.run(parser.parse_args(common + list(argv))) == 0
        return json.loads((Path(argv[1]) / "summary.json").read_text())

    killer = KillWhenBusy(mark, "ray::TraceWorker.trace")
    killer.start()
    killed = trace("--out", str(tmp_path / "killed"), "--workers", "2")
    killer.join()
    whole = trace("--out", str(tmp_path / "whole"), "--workers", "2")   # each fact: the same arithmetic
    assert killer.killed is not None and killed["traced"] == whole["traced"] == 4 and not killed["errors"]
    np.testing.assert_allclose(killed["ie"]["mlp"]["last_subject"], whole["ie"]["mlp"]["last_subject"], atol=1e-6)


def test_a_node_removed_mid_run(cluster, tmp_path):
    """The second node's raylet and workers killed while it holds a case: its case goes to the head's worker, the
    replacement that cannot be placed does not hold the run up."""
    import threading

    from kedit_ray.distributed.driver import run_eval
    from kedit_ray.requests import EditRequest
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    c, node, _ = cluster
    out = tmp_path / "out"
    run = EvalSpec(ModelSpec("toy"), "FAKE", runner="fake_runner:FakeRunner", options={"sleep": 0.5},
                   resources=Resources(2))

    def remove_when_rows():
        while len(list((out / "results").glob("part-*.parquet"))) < 3:
            time.sleep(0.05)
        c.remove_node(node, allow_graceful=False)

    remover = threading.Thread(target=remove_when_rows, daemon=True)
    remover.start()
    t0 = time.monotonic()
    requests = [EditRequest(i, f"S{i}", "{} is in", "Goa", "Paris") for i in range(10)]
    summary = run_eval(run, requests, out, progress=False)
    remover.join()
    assert summary["complete"] and summary["errors"] == 0 and time.monotonic() - t0 < 120
    rows = rows_of(out)
    assert_whole(rows, list(range(10)))
    assert len({r["worker"] for r in rows}) == 2                          # no worker came back on the lost node


def test_driver_killed_with_all_it_started_then_the_same_command_resumes(tiny_dir, tmp_path):
    """`kedit eval --workers 2` (its own local Ray) killed with SIGKILL, with every process it started; run again,
    it resumes: every case once, no error rows, and no Ray process of either run is left."""
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(6)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "kedit_ray.cli", "eval", "--method", "rome", "--model", tiny_dir, "--data",
            str(data), "--out", str(out), "--workers", "2", "--layer", "1", "--no-cov", "--v-steps", "30"]
    mark, ray_tmp = new_mark(), tempfile.mkdtemp(prefix="kr", dir="/tmp")   # short: Ray's socket paths live there
    env = {**os.environ, MARK: mark, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((out / "results").glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        assert first.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    started = marked(mark)
    assert len(started) > 3                                               # the driver, Ray's services, workers
    kill(started)
    first.wait(timeout=30)
    assert marked(mark) == []
    written = {r["case_id"] for r in rows_of(out)}
    assert 2 <= len(written) < 6
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = rows_of(out)
    assert_whole(rows, list(range(6)))
    assert json.loads((out / "summary.json").read_text())["complete"]
    time.sleep(1)
    assert marked(mark) == []                                             # the rerun left no Ray process behind
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_workers_with_an_empty_stats_cache_use_the_c_the_driver_resolved(cluster, tiny_dir, tmp_path, monkeypatch):
    """Workers whose nodes have no layer statistics (KEDIT_STATS_CACHE empty for them) do not fall back to C = I:
    the driver computes C once with the pool's own workers (it loads no model itself), into its cache, and ships
    it to every worker."""
    import ray

    from kedit_ray.distributed.driver import run_eval
    from kedit_ray.stats.cache import default_cache

    c, _, _ = cluster
    empty = tmp_path / "worker-cache"
    empty.mkdir()
    ray.shutdown()
    ray.init(address=c.address, logging_level="WARNING", runtime_env={"env_vars": {"KEDIT_STATS_CACHE": str(empty)}})
    assert ray.get(ray.remote(lambda: os.environ["KEDIT_STATS_CACHE"]).remote()) == str(empty)

    def no_load(*_a, **_k):
        raise AssertionError("the driver loaded the model")

    monkeypatch.setattr("kedit_ray.models.load", no_load)
    text = write_corpus(tmp_path / "corpus.raw")
    params = {**ROME, "use_cov": True, "stats_corpus": str(text), "stats_samples": 12,
              "values": {"steps": 4}}
    summary = run_eval(spec(tiny_dir, "rome", params), cases(4), tmp_path / "out", progress=False)
    assert summary["complete"] and summary["errors"] == 0
    covs = {r["cov"] for r in rows_of(tmp_path / "out")}
    assert len(covs) == 1 and "identity" not in covs
    [path] = covs
    assert Path(path).is_file() and Path(path).is_relative_to(default_cache())   # the driver's cache
    assert list(empty.rglob("*")) == []                                          # the workers' stayed empty

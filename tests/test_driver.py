"""The eval driver: summary maths, the Parquet sink, resume, and Ray runs with a fake runner."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from fake_runner import fake_row
from kedit_ray.eval.summary import harmonic_mean, summarize
from kedit_ray.requests import EditRequest
from kedit_ray.results import ConfigMismatch, PartWriter, check_config, drop_error_rows, finished_case_ids, read_results
from kedit_ray.spec import RUN_ONLY, EvalSpec, ModelSpec, Resources

TESTS = str(Path(__file__).resolve().parent)
OPTIONS = {"fail": [5], "sleep": 0.02}


def spec(workers: int = 2, method: str = "FAKE", **options) -> EvalSpec:
    """A run of the fake runner (no model) on `workers` workers."""
    return EvalSpec(ModelSpec("toy"), method, runner="fake_runner:FakeRunner", options={**OPTIONS, **options},
                    resources=Resources(workers))


def requests(n: int) -> list[EditRequest]:
    return [EditRequest(i, f"S{i}", "{} is in", "Goa", "Paris") for i in range(n)]


def table_ids(out) -> list[int]:
    return sorted(ds.dataset(str(Path(out) / "results")).to_table()["case_id"].to_pylist())


# --- no Ray ---------------------------------------------------------------------------------

def test_summary_known_values():
    rows = [{"case_id": 1, "method": "M", "model": "m", "efficacy_score": 1.0, "paraphrase_score": 0.5,
             "neighborhood_score": 0.8, "pre_efficacy_score": 0.0, "pre_paraphrase_score": 0.5,
             "pre_neighborhood_score": 1.0, "efficacy_magnitude": 0.2, "edit_seconds": 1.0, "error": None},
            {"case_id": 2, "method": "M", "model": "m", "efficacy_score": 0.0, "paraphrase_score": 1.0,
             "neighborhood_score": 0.6, "pre_efficacy_score": 0.5, "pre_paraphrase_score": 0.5,
             "pre_neighborhood_score": 1.0, "efficacy_magnitude": None, "edit_seconds": 3.0, "error": None},
            {"case_id": 3, "method": "M", "model": "m", "efficacy_score": None, "edit_seconds": None,
             "error": "ValueError: bad"}]
    s = summarize(rows)
    assert (s["cases"], s["rows"], s["errors"], s["method"], s["model"]) == (3, 3, 1, "M", "m")
    assert s["efficacy_score"] == 0.5 and s["paraphrase_score"] == 0.75
    assert s["neighborhood_score"] == pytest.approx(0.7)
    assert s["efficacy_magnitude"] == pytest.approx(0.2)  # nulls skipped
    assert s["score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.75 + 1 / 0.7))
    assert s["pre_score"] == pytest.approx(3 / (1 / 0.25 + 1 / 0.5 + 1 / 1.0))
    assert s["seconds_per_edit"] == 2.0
    assert harmonic_mean([0.0, 1.0]) == 0.0 and harmonic_mean([1.0, None]) is None


def test_sink_widens_schema_and_drops_errors(tmp_path):
    with PartWriter(tmp_path, rows=2) as writer:
        writer.add({"case_id": 0, "method": "M", "model": "m", "error": "ValueError: x", "worker": "w0"})
        writer.add({"case_id": 1, "method": "M", "model": "m", "error": "ValueError: y", "worker": "w0"})
        for i in (2, 3, 4):  # two parts: the first error-only, without the runner's extra columns
            writer.add({**fake_row(i, "M", "m"), "worker": "w1", "fluency": 5.0})
    assert len(list((tmp_path / "results").glob("part-*.parquet"))) == 3
    for part in (tmp_path / "results").glob("part-*.parquet"):  # each part alone shows every column
        names = ds.dataset(str(part)).schema.names
        assert {"layer", "fluency", "pre_efficacy_score"} <= set(names)
    table = ds.dataset(str(tmp_path / "results")).to_table()
    assert sorted(table["case_id"].to_pylist()) == [0, 1, 2, 3, 4]
    assert str(table.schema.field("case_id").type) == "int64" and str(table.schema.field("layer").type) == "int64"
    assert finished_case_ids(tmp_path) == {0, 1, 2, 3, 4}
    assert finished_case_ids(tmp_path, include_errors=False) == {2, 3, 4}
    assert drop_error_rows(tmp_path) == {0, 1}
    assert sorted(read_results(tmp_path)["case_id"].to_pylist()) == table_ids(tmp_path) == [2, 3, 4]
    assert len(list((tmp_path / "results").glob("part-*.parquet"))) == 2  # the error-only part is gone


def test_config_mismatch_refused_only_with_results(tmp_path):
    config = spec().to_json()
    check_config(tmp_path, config, RUN_ONLY)
    check_config(tmp_path, {**config, "method": "ROME"}, RUN_ONLY)   # no results yet: nothing is locked
    with PartWriter(tmp_path) as writer:
        writer.add(fake_row(0, "ROME", "toy"))
    moved = spec(workers=1).to_json()                                  # how it runs may change
    check_config(tmp_path, {**moved, "method": "ROME"}, RUN_ONLY)
    assert json.loads((tmp_path / "config.json").read_text())["resources"]["workers"] == 1
    with pytest.raises(ConfigMismatch, match="method: 'ROME' there, 'FAKE' now"):
        check_config(tmp_path, config, RUN_ONLY)
    from kedit_ray.distributed.driver import run_eval

    with pytest.raises(ConfigMismatch, match="sleep"):  # refused before any worker starts
        run_eval(spec(method="ROME", sleep=1.0), requests(2), str(tmp_path), progress=False)


def test_unwritable_out_refused_before_any_work(tmp_path):
    from kedit_ray.distributed.driver import run_eval

    (tmp_path / "results").write_text("a file where the results folder should be")   # root or not
    with pytest.raises(PermissionError, match="results: cannot write results there"):
        run_eval(spec(workers=1), requests(2), str(tmp_path), progress=False)
    assert not (tmp_path / "config.json").exists()


def test_one_worker_runs_in_this_process(tmp_path):
    import ray

    from kedit_ray.distributed.driver import run_eval

    summary = run_eval(spec(workers=1), requests(3), str(tmp_path), progress=False)
    assert not ray.is_initialized()
    rows = read_results(tmp_path).to_pylist()
    assert sorted(r["case_id"] for r in rows) == [0, 1, 2]
    assert {r["worker"].split(":")[-1] for r in rows} == {str(os.getpid())}   # this process is the worker
    assert (summary["cases"], summary["errors"], summary["requested"], summary["complete"]) == (3, 0, 3, True)


# --- Ray (local, 2 CPUs) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker_path():
    """Ray workers inherit the driver's environment: put fake_runner on their PYTHONPATH."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
        yield


@pytest.fixture(scope="module")
def ray_up(worker_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_two_workers_one_row_per_case(tmp_path, worker_path):
    import ray

    from kedit_ray.distributed.driver import run_eval

    summary = run_eval(spec(), requests(12), str(tmp_path), progress=False)
    assert not ray.is_initialized()  # started here, so shut down here
    table = ds.dataset(str(tmp_path / "results")).to_table()
    assert sorted(table["case_id"].to_pylist()) == list(range(12))
    rows = {r["case_id"]: r for r in table.to_pylist()}
    assert rows[5]["error"] == "ValueError: case 5 is bad" and rows[5]["efficacy_score"] is None
    assert rows[7]["efficacy_magnitude"] == 0.07 and rows[7]["layer"] == 3 and rows[7]["error"] is None
    assert {r["worker"].split("@")[0] for r in rows.values()} == {"w0", "w1"}
    ok = [i for i in range(12) if i != 5]
    assert summary["cases"] == 12 and summary["errors"] == 1 and summary["complete"]
    assert summary["efficacy_magnitude"] == pytest.approx(sum(ok) / len(ok) / 100)
    assert summary["score"] == pytest.approx(3 / (1 + 2 + 1 / 0.8))
    assert json.loads((tmp_path / "summary.json").read_text())["errors"] == 1


def test_interrupted_run_resumes_without_duplicates(tmp_path, ray_up, monkeypatch):
    import ray

    from kedit_ray.distributed import driver

    add = PartWriter.add

    def add_then_interrupt(self, row):
        add(self, row)
        if len(self.buffer) + self.written == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        driver.run_eval(spec(), requests(10), str(tmp_path), progress=False)
    assert len(table_ids(tmp_path)) == 4  # flushed on the way out
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is False
    assert ray.is_initialized()  # not ours to shut down
    monkeypatch.setattr(PartWriter, "add", add)

    summary = driver.run_eval(spec(), requests(10), str(tmp_path), progress=False)
    assert table_ids(tmp_path) == list(range(10)) and summary["complete"] and summary["errors"] == 1
    before = {r["case_id"]: r["worker"] for r in read_results(tmp_path).to_pylist()}

    summary = driver.run_eval(spec(), requests(10), str(tmp_path), progress=False, retry_errors=True)
    after = {r["case_id"]: r["worker"] for r in read_results(tmp_path).to_pylist()}
    assert table_ids(tmp_path) == list(range(10)) and summary["errors"] == 1
    assert after[5] != before[5] and all(after[i] == before[i] for i in range(10) if i != 5)  # only 5 reran


@pytest.mark.parametrize("deaths", [1, 2])
def test_dead_worker_replaced_and_its_case_requeued(tmp_path, ray_up, deaths):
    from kedit_ray.distributed.driver import run_eval

    run = spec(fail=[], die_case=3, die_file=str(tmp_path / "deaths"), die_times=deaths)
    summary = run_eval(run, requests(6), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "deaths").read_text() == str(deaths)
    assert table_ids(tmp_path / "out") == list(range(6)) and summary["complete"]
    rows = {r["case_id"]: r for r in read_results(tmp_path / "out").to_pylist()}
    if deaths == 1:   # died once: the case went to another worker, and the pool is whole again
        assert summary["errors"] == 0 and rows[3]["error"] is None
    else:             # took down two workers: given up, as an error row
        assert summary["errors"] == 1 and "took down 2 workers" in rows[3]["error"]


def test_a_run_that_failed_or_did_nothing_locks_nothing(tmp_path):
    from kedit_ray.distributed.driver import run_eval

    empty = run_eval(spec(workers=1, method="A"), [], tmp_path, progress=False)
    assert (empty["requested"], empty["cases"], empty["errors"]) == (0, 0, 0)
    broken = EvalSpec(ModelSpec("toy"), "B", runner="no_such_module:Runner", resources=Resources(1))
    with pytest.raises(ModuleNotFoundError):
        run_eval(broken, requests(2), tmp_path, progress=False)
    summary = run_eval(spec(workers=1, method="C"), requests(2), tmp_path, progress=False)   # the corrected run
    assert summary["cases"] == 2 and summary["method"] == "C"


def test_ray_address_puts_even_one_worker_on_the_cluster(tmp_path, ray_up, monkeypatch):
    import ray

    from kedit_ray.distributed.driver import run_eval

    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    run_eval(spec(workers=1), requests(2), tmp_path, progress=False)
    workers = {r["worker"] for r in read_results(tmp_path).to_pylist()}
    assert len(workers) == 1 and workers.pop().rsplit(":", 1)[1] != str(os.getpid())   # an actor, not this process


def test_summary_fields_are_declared(tmp_path):
    """finish writes the declared run fields (docs/reference/results.md lists RUN_FIELDS) and refuses others."""
    from kedit_ray.distributed.driver import RUN_FIELDS, finish

    with PartWriter(tmp_path) as w:
        w.add({"case_id": 0, "method": "m", "model": "x", "worker": "w", "efficacy_score": 1.0, "error": None})
    summary = finish(tmp_path, requests(1), 0.0, workers=1)
    assert {"wall_seconds", "requested", "complete", "workers"} <= set(summary) and "workers" in RUN_FIELDS
    with pytest.raises(ValueError, match=r"\['wokers'\] are not in RUN_FIELDS"):
        finish(tmp_path, requests(1), 0.0, wokers=1)

"""The results directory: damaged parts quarantined and exactly their cases run again, compaction (also when cut
short), as `kedit eval` and `kedit report` read it. In-process runs of the fake runner: no Ray, no model."""
from __future__ import annotations

import json
import uuid

import pyarrow.parquet as pq
import pytest

from fake_runner import fake_row
from kedit_ray.requests import EditRequest
from kedit_ray.results import REPLACES, PartWriter, compact, part_files, read_results, results_dir, write_part
from kedit_ray.spec import EvalSpec, ModelSpec, Resources


def spec() -> EvalSpec:
    return EvalSpec(ModelSpec("toy"), "FAKE", runner="fake_runner:FakeRunner", resources=Resources(1))


def requests(n: int) -> list[EditRequest]:
    return [EditRequest(i, f"S{i}", "{} is in", "Goa", "Paris") for i in range(n)]


def three_parts(out) -> list:
    """Cases 0-5 in three parts of two rows, written by "earlier"."""
    with PartWriter(out, rows=2) as w:
        for i in range(6):
            w.add({**fake_row(i, "FAKE", "toy"), "worker": "earlier"})
    return part_files(out)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_part_is_named_quarantined_and_only_its_cases_rerun(tmp_path, capsys, damage):
    from kedit_ray.distributed.driver import run_eval

    parts = three_parts(tmp_path)
    victim = parts[1]
    lost = set(pq.read_table(victim)["case_id"].to_pylist())
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:                                   # bytes inside the first data page: only its checksum tells
        data[8:16] = b"\xff" * 8
    victim.write_bytes(bytes(data))
    summary = run_eval(spec(), requests(6), tmp_path, progress=False)
    err = capsys.readouterr().err
    assert f"{victim}: damaged results part" in err and str(tmp_path / "quarantine" / victim.name) in err
    assert (tmp_path / "quarantine" / victim.name).read_bytes() == bytes(data)
    rows = read_results(tmp_path).to_pylist()
    assert sorted(r["case_id"] for r in rows) == list(range(6)) and summary["complete"] and summary["errors"] == 0
    assert {r["case_id"] for r in rows if r["worker"] != "earlier"} == lost      # exactly its cases again
    assert len(part_files(tmp_path)) == 1                                        # compacted at the end


def test_report_names_a_damaged_part(tmp_path, capsys):
    from kedit_ray.eval.report import load_summary

    victim = three_parts(tmp_path)[0]
    victim.write_bytes(victim.read_bytes()[:40])
    summary = load_summary(tmp_path)
    assert summary["cases"] == 4 and f"{victim}: damaged results part" in capsys.readouterr().err
    assert not victim.exists() and (tmp_path / "quarantine" / victim.name).exists()


def test_compaction_and_a_compaction_cut_short(tmp_path):
    with PartWriter(tmp_path) as w:                    # one part per row, as a run writes them
        for i in range(30):
            w.add({**fake_row(i, "FAKE", "toy"), "worker": "w"})
    assert len(part_files(tmp_path)) == 30
    [whole] = compact(tmp_path)
    assert part_files(tmp_path) == [whole]
    assert pq.read_table(whole)["case_id"].to_pylist() == list(range(30))          # sorted by case_id
    small = three_parts(tmp_path / "cut")
    table = read_results(tmp_path / "cut").replace_schema_metadata(
        {REPLACES: json.dumps([p.name for p in small]).encode()})
    merged = write_part(results_dir(tmp_path / "cut") / f"part-{uuid.uuid4().hex}.parquet", table)
    # killed before the small parts were deleted: the next read finishes the job, no row twice
    assert sorted(read_results(tmp_path / "cut")["case_id"].to_pylist()) == list(range(6))
    assert part_files(tmp_path / "cut") == [merged]

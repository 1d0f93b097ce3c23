"""`kedit eval` end to end: 2 Ray workers on CPU, the real Gemma 3 270M, Parquet read back; `kedit report`; what
eval ends with (the report's table, counts, paths; `--json`: the summary); editor options on the command line reach
each method."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from kedit_ray.cli import build_parser, editor_params, main
from kedit_ray.editors import make_editor
from kedit_ray.options import UsageError

from conftest import data_file


def test_eval_two_workers_then_report(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--method", "rome", "--data", str(data_file("counterfact-edit.json")), "--limit", "2",
            "--workers", "2", "--out", str(out), "--no-cov", "--v-steps", "4"]
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "ES pre→post" in said and "2 of 2 requested cases" in said and str(out / "summary.json") in said
    table = ds.dataset(str(out / "results"), format="parquet").to_table()
    assert sorted(table.column("case_id").to_pylist()) == [0, 1]
    assert table.schema.field("case_id").type == "int64"
    assert set(table.column("error").to_pylist()) == {None}
    assert len(set(table.column("worker").to_pylist())) >= 1
    assert set(table.column("cov").to_pylist()) == {"identity"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["errors"] == 0 and summary["seconds_per_edit"] > 0
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "pre_efficacy_score"):
        assert key in summary
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rome" in text and (out / "report.png").stat().st_size > 1000
    assert summary["cov"] == "identity" and "C = identity" in text                   # --no-cov, said
    assert main([*argv, "--json"]) == 0  # resume: nothing to do, nothing written twice
    assert ds.dataset(str(out / "results"), format="parquet").to_table().num_rows == 2
    assert json.loads(capsys.readouterr().out)["cases"] == 2


def _cases(tmp_path, n: int) -> str:
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": i, "subject": s, "prompt": "The {} is located in the city of",
                                 "target_new": "Goa", "target_true": t}
                                for i, (s, t) in enumerate([("Space Needle", "Seattle"), ("Eiffel Tower", "Paris"),
                                                            ("Michel Rocard", "France")][:n])]))
    return str(data)


def test_eval_ends_with_the_report_table_counts_and_paths(tiny_dir, tmp_path, capsys):
    """Not the summary JSON: the table `kedit report` prints, the counts and where the results are; --json prints
    exactly summary.json (for scripts)."""
    out = tmp_path / "run"
    argv = ["eval", "--method", "rome", "--model", tiny_dir, "--data", _cases(tmp_path, 2), "--out", str(out),
            "--no-cov", "--layer", "1", "--v-steps", "2"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(said)
    head, row = said.splitlines()[:2]
    assert head.split()[:4] == ["run", "method", "cases", "errors"] and "ES pre→post" in head
    assert row.split()[:4] == [str(out), "rome", "2", "0"] and "C = identity" in row
    assert "2 of 2 requested cases have results (2 rows, 0 with an error); complete;" in said
    for line in (f"results: {out / 'results'} (Parquet)", f"summary: {out / 'summary.json'} (--json prints it)",
                 f"chart:   kedit report {out}"):
        assert line in said.splitlines()
    assert len(said.splitlines()) < 10
    assert main([*argv, "--json"]) == 0                       # resumed: nothing to do; the summary as before
    printed, written = json.loads(capsys.readouterr().out), json.loads((out / "summary.json").read_text())
    assert printed == written and printed["cases"] == 2 and printed["complete"] is True


def test_a_sequential_eval_ends_with_the_checkpoint_table(tiny_dir, tmp_path, capsys):
    """A sequential run also ends with the report's table per checkpoint (TRR, ERR) and counts its held-out cases."""
    out = tmp_path / "seq"
    assert main(["eval", "--method", "rome", "--model", tiny_dir, "--data", _cases(tmp_path, 3), "--out", str(out),
                 "--no-cov", "--layer", "1", "--v-steps", "2", "--protocol", "sequential", "--limit", "2",
                 "--held-out", "1", "--checkpoints", "1,2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines if line.startswith(str(out)) and " rome " in line][1:] == \
        [[str(out), "rome", "1"], [str(out), "rome", "2"]]                            # one row per checkpoint
    assert any(line.split()[:5] == ["run", "method", "edits", "TRR", "ERR"] for line in lines)
    assert any("2 of 2 requested cases" in line and "1 held-out cases for TRR" in line for line in lines)


def _params(*argv: str) -> dict:
    return editor_params(build_parser().parse_args(["eval", "--data", "x.json", "--out", "o", *argv]))


def test_editor_options_reach_each_method():
    assert _params("--method", "rome", "--v-clamp", "2", "--v-lr", "0.1") == {"values": {"lr": 0.1, "clamp_norm": 2}}
    grace = _params("--method", "grace", "--eps-init", "90", "--replacement", "all", "--v-steps", "7")
    assert grace == {"eps_init": 90, "replacement": "all", "steps": 7}
    hp = make_editor("grace", grace).hp
    assert (hp.eps_init, hp.replacement, hp.steps) == (90, "all", 7)
    assert make_editor("ft-l", _params("--method", "ft-l", "--norm-constraint", "1e-3")).hp.norm_constraint == 1e-3
    assert make_editor("memit", _params("--method", "memit", "--z-module", "layer")).hp.z_module == "layer"
    for wrong in (["--method", "rome", "--eps-init", "1"], ["--method", "ft", "--v-clamp", "2"],
                  ["--method", "memit", "--norm-constraint", "1"]):
        with pytest.raises(UsageError, match="not apply to --method"):
            _params(*wrong)

"""`kedit eval` end to end: 2 Ray workers on CPU, the real Gemma 3 270M, Parquet read back; `kedit report`; editor
options on the command line reach each method."""
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
    assert main(argv) == 0
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
    assert main(argv) == 0  # resume: nothing to do, nothing written twice
    assert ds.dataset(str(out / "results"), format="parquet").to_table().num_rows == 2


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

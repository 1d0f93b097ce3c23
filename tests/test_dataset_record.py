"""A dataset is one record (kedit_ray.datasets.registry): a toy dataset registered here alone, without touching the
CLI or any table, is read, scored and summarised by `kedit eval` and titled by `kedit report`; the CLI offers the
registered names; an unknown name is a clear error everywhere."""
from __future__ import annotations

import argparse
import json

import pyarrow.dataset as ds
import pytest

from kedit_ray.cli import build_parser, main
from kedit_ray.datasets import DATASETS, Dataset, load_requests, register
from kedit_ray.datasets.load import dataset_of
from kedit_ray.datasets.records import Layout, need
from kedit_ray.eval import Scorer
from kedit_ray.eval.lifelong import trr
from kedit_ray.requests import EditRequest

FACTS = [("Eiffel Tower", "Paris", "Rome"), ("Space Needle", "Seattle", "London"), ("Michel Rocard", "France", "Italy")]


def from_toy(record: dict, source: str, index: int) -> EditRequest:
    thing = need(record, "thing", source, index)
    return EditRequest(index, thing, "The {} is located in the city of", need(record, "now_in", source, index),
                       need(record, "was_in", source, index), [f"Where can the {thing} be found ?"],
                       ["The Space Needle is located in the city of"], ["Seattle"]).validate(source, index)


def held_out_accuracy(row: dict, pre: str) -> float:
    """Not CounterFact's: 0.5 before the edits, 0.25 after, so TRR = 0.25 shows this one was read."""
    return 0.5 if pre else 0.25


@pytest.fixture
def toy_data(tmp_path) -> str:
    """A file of the toy dataset, registered for the test alone."""
    register(Dataset("toy", "Toy facts", (Layout("toy", ("thing", "was_in", "now_in"), from_toy, {}),),
                     DATASETS["counterfact"].scorer, held_out_accuracy))
    try:
        path = tmp_path / "toy.json"
        path.write_text(json.dumps([{"thing": t, "was_in": o, "now_in": new} for t, o, new in FACTS]))
        yield str(path)
    finally:
        del DATASETS["toy"]


def test_kedit_eval_with_a_toy_dataset(toy_data, tiny_dir, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    assert dataset_of(toy_data) == "toy" and len(load_requests(toy_data)[0]) == 3   # "auto" tries its layout too
    common = ["eval", "--model", tiny_dir, "--dataset", "toy", "--data", toy_data, "--no-cov", "--layer", "1",
              "--v-steps", "2", "--workers", "1"]
    for protocol, more in (("single", []), ("sequential", ["--held-out", "1"])):
        out = tmp_path / protocol
        assert main([*common, "--out", str(out), "--protocol", protocol, *more]) == 0, protocol
        rows = ds.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
        edits = [r for r in rows if r.get("role") != "held_out"]
        assert sorted(r["case_id"] for r in edits) == ([0, 1, 2] if protocol == "single" else [0, 1])
        assert all(r["error"] is None and 0 <= r["efficacy_score"] <= 1 for r in rows)   # CounterFact's figures
        summary = json.loads((out / "summary.json").read_text())
        assert summary["errors"] == 0 and "efficacy_score" in summary and "score" in summary
        assert json.loads((out / "config.json").read_text())["dataset"] == "toy"
    assert summary["TRR"] == pytest.approx(0.25) and summary["held_out_cases"] == 1   # the toy's held-out accuracy
    titles, set_title = [], Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda ax, text, **kw: titles.append(text) or set_title(ax, text, **kw))
    assert main(["report", str(tmp_path / "single"), str(tmp_path / "sequential")]) == 0
    assert any(t.endswith("· Toy facts") for t in titles), titles                   # the figure names its title


def test_the_cli_offers_the_registered_datasets(toy_data):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dataset = next(a for a in commands.choices["eval"]._actions if a.dest == "dataset")
    assert dataset.choices == ["auto", *DATASETS] and "toy" in dataset.choices


def test_an_unknown_dataset_is_a_clear_error(tmp_path, capsys):
    known = "known datasets: counterfact, zsre, user"
    with pytest.raises(ValueError, match=f"unknown dataset 'nope'; {known}"):
        load_requests(tmp_path / "x.json", "nope")
    with pytest.raises(ValueError, match=known):
        Scorer("nope")
    with pytest.raises(ValueError, match=known):
        trr([], "nope")                                   # no silent fallback to CounterFact's held-out accuracy
    with pytest.raises(ValueError, match="already registered"):
        register(DATASETS["zsre"])
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "nope", "--data", "x.json", "--out", str(tmp_path / "o")])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_user_requests_are_scored_as_counterfact():
    user, counterfact = DATASETS["user"], DATASETS["counterfact"]
    assert user.scorer is counterfact.scorer and user.held_out_accuracy is counterfact.held_out_accuracy
    row = {"pre_efficacy_score": 0.0, "efficacy_score": 1.0}
    assert trr([row], "user") == trr([row], "counterfact") == 0.0

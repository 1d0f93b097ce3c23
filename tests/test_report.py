"""`kedit report`: the figure of two fake runs (one with error rows, one whose every case failed) and the bootstrap
intervals over cases."""
from __future__ import annotations

import numpy as np

from kedit_ray.results import PartWriter
from kedit_ray.eval.report import bootstrap, load_run, report


def fake_run(out, method: str, n: int, errors: int, seed: int = 0) -> str:
    """n cases of 0/1 scores (`errors` of them error rows), written as `kedit eval` writes them."""
    rng = np.random.default_rng(seed)
    with PartWriter(out, rows=8) as w:
        for i in range(n):
            if i < errors:
                w.add({"case_id": i, "method": method, "model": "tiny", "worker": "w0",
                       "error": f"ValueError: case {i} has no target"})
                continue
            post, pre = rng.random(3) < (0.9, 0.7, 0.6), rng.random(3) < (0.1, 0.2, 0.9)
            w.add({"case_id": i, "method": method, "model": "tiny", "worker": "w0", "error": None, "cov": "identity",
                   **{k: float(v) for k, v in zip(("efficacy_score", "paraphrase_score", "neighborhood_score"), post)},
                   **{f"pre_{k}": float(v) for k, v in zip(("efficacy_score", "paraphrase_score",
                                                             "neighborhood_score"), pre)}})
    return str(out)


def test_report_draws_runs_and_names_their_errors(tmp_path):
    good = fake_run(tmp_path / "rome", "rome", 32, errors=2)
    bad = fake_run(tmp_path / "grace", "grace", 3, errors=3)
    png = tmp_path / "fig" / "report.png"
    png.parent.mkdir()
    text = report([good, bad], str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert f"errors in {good}: 2 of 32 rows; 1× ValueError: case 0 has no target" in text
    assert f"errors in {bad}: 3 of 3 rows (every case failed, not drawn)" in text
    assert f"chart: {png}" in text
    assert "Port" not in text                                 # no run measured portability: no such column
    run = load_run(good)
    assert len(run.final_rows()) == 30 and run.summary["errors"] == 2 and run.scores().shape == (30, 3)
    assert np.allclose(run.scores().mean(0), [run.summary[k] for k in ("efficacy_score", "paraphrase_score",
                                                                       "neighborhood_score")])
    assert load_run(bad).final_rows() == []


def test_many_runs_get_a_row_each(tmp_path, monkeypatch):
    """Past MANY runs the figure is a panel per metric and a labelled row per run, in the order given, and the
    run whose every case failed is named in the legend."""
    from matplotlib.figure import Figure

    from kedit_ray.eval.report import MANY, plot

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    names = [f"m{i}" for i in range(MANY + 2)]
    runs = [load_run(fake_run(tmp_path / n, n, 10, errors=0, seed=i)) for i, n in enumerate(names)]
    runs.append(load_run(fake_run(tmp_path / "broken", "broken", 2, errors=2)))
    plot(runs, tmp_path / "report.png")
    fig, = saved
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split()[0] for ax in panels] == ["ES", "PS", "NS", "S"]
    rows = sorted(zip(panels[0].get_yticks(), (t.get_text() for t in panels[0].get_yticklabels())), reverse=True)
    assert [label for _, label in rows] == [f"{n} (C = I) (edited, n=10)" for n in names]   # the first on top
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("not drawn: broken: all 2 cases failed") for t in legend)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = (rng.random((20, 3)) < (0.8, 0.6, 0.7)).astype(float)
    large = (rng.random((1000, 3)) < (0.8, 0.6, 0.7)).astype(float)
    for scores in (small, large):
        ci = bootstrap(scores)
        means = scores.mean(0)
        point = np.append(means, 3 / (1 / means).sum())                     # ES, PS, NS and S
        assert ci.shape == (4, 2) and (ci[:, 0] <= point).all() and (point <= ci[:, 1]).all()
    assert ((bootstrap(large)[:, 1] - bootstrap(large)[:, 0]) < (bootstrap(small)[:, 1] - bootstrap(small)[:, 0])).all()
    assert (bootstrap(small) == bootstrap(small)).all()                      # a fixed seed
    constant = np.ones((15, 3)) * (1.0, 0.5, 0.0)
    ci = bootstrap(constant)
    assert (ci[:, 0] == ci[:, 1]).all() and ci[3].tolist() == [0.0, 0.0]   # S = 0 when a score is 0
    with_nan = small.copy()
    with_nan[:, 2] = np.nan                                                  # NS not measured: no S either
    assert np.isnan(bootstrap(with_nan)[2:]).all() and not np.isnan(bootstrap(with_nan)[:2]).any()
    assert np.isnan(bootstrap(np.empty((0, 3)))).all()


def test_table_shows_portability_when_a_run_has_it():
    from kedit_ray.eval.report import checkpoint_table, table

    zsre = {"method": "rome", "cases": 2, "errors": 0, "portability_score": 0.5, "pre_portability_score": 0.25}
    cf = {"method": "memit", "cases": 2, "errors": 0, "checkpoints": {"2": {"efficacy_score": 1.0}}}
    head, *lines = table({"a": zsre, "b": cf}).splitlines()
    assert head.split()[-4:-2] == ["Port", "pre→post"]
    assert lines[0].split()[-3] == "0.250→0.500" and lines[1].split()[-3] == "-→-"
    assert "Port" not in table({"b": cf}) and "Port" not in checkpoint_table({"b": cf})
    with_port = {**cf, "checkpoints": {"2": {"efficacy_score": 1.0, "portability_score": 0.75}}}
    head, line = checkpoint_table({"b": with_port}).splitlines()
    assert head.split()[-1] == "Port" and line.split()[-1] == "0.750"


def test_checkpoint_table_shows_the_logged_seconds_and_memory():
    from kedit_ray.eval.report import checkpoint_table

    run = {"method": "ultraedit", "checkpoints": {"100": {"efficacy_score": 1.0}, "200": {"efficacy_score": 0.9}},
           "checkpoint_log": [{"edits": 100, "edit_s": 12.4, "score_s": 30.0, "scored": 120, "rss": 3 * 2**30,
                               "peak_rss": 3 * 2**30}]}
    head, first, second = checkpoint_table({"r": run}).splitlines()
    assert head.split()[-6:] == ["edit", "s", "score", "s", "RSS", "GB"]
    assert first.split()[-3:] == ["12", "30", "3.00"] and second.split()[-3:] == ["-", "-", "-"]

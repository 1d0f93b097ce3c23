"""Batch and sequential protocols on a tiny random Llama, the lifelong metrics, and the Ray drivers."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from kedit_ray.editors import AlphaEdit, AlphaEditParams, Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.toolkit import ValueParams
from kedit_ray.eval.lifelong import err, trr
from kedit_ray.eval.protocols import batches, plan_checkpoints, run_batch, run_sequential
from kedit_ray.eval.summary import summarize
from kedit_ray.requests import EditRequest

SUBJECTS = [("Space Needle", "Goa", "Seattle"), ("Eiffel Tower", "Rome", "Paris"),
            ("Danielle Darrieux", "London", "Paris"), ("Michel Rocard", "Berlin", "Paris"),
            ("Germany", "Goa", "Berlin"), ("Italy", "London", "Rome")]


def cases(n: int, start: int = 0) -> list[EditRequest]:
    return [EditRequest(start + i, s, "the city of {}", new, true, [f"Where is the city of {s}"],
                        ["the city of Paris"], ["France"])
            for i, (s, new, true) in enumerate(SUBJECTS[start:start + n])]


def small(cls, params, **kw):
    return cls(params(layers=[1, 2], n_prefixes=2, prefix_len=4, **kw))


def state(lm) -> dict:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same(lm, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_batch_protocol_edits_batches_and_restores(tiny_lm):
    before = state(tiny_lm)
    editor = small(Memit, MemitParams, mom2_update_weight=1e-3)
    editor.hp.values.steps = 10
    rows = run_batch(tiny_lm, editor, cases(4), batch_size=2, method="memit", progress=False)
    assert same(tiny_lm, before)
    assert [r["case_id"] for r in rows] == [0, 1, 2, 3] and {r["checkpoint"] for r in rows} == {2}
    assert [r["batch"] for r in rows] == [0, 0, 1, 1] and all(r["error"] is None for r in rows)
    assert sum(r["efficacy_magnitude"] - r["pre_efficacy_magnitude"] for r in rows) > 0
    # an editor without edit_batch edits a batch's requests one by one
    rome = Rome(RomeParams(layer=1, n_prefixes=2, prefix_len=4, values=ValueParams(steps=4)))
    rows = run_batch(tiny_lm, rome, cases(3), batch_size=3, method="rome", progress=False)
    assert same(tiny_lm, before) and len(rows) == 3 and rows[0]["checkpoint"] == 3


def test_sequential_protocol_checkpoints_err_trr(tiny_lm):
    before = state(tiny_lm)
    editor = small(AlphaEdit, AlphaEditParams)
    editor.hp.values.steps = 10
    commits = []
    commit = editor.commit
    editor.commit = lambda lm, reqs: (commits.append([r.case_id for r in reqs]), commit(lm, reqs))
    rows, summary = run_sequential(tiny_lm, editor, cases(4), batch_size=2, checkpoints=[2, 4, 1000],
                                   held_out=cases(2, start=4), method="alphaedit", progress=False)
    assert same(tiny_lm, before) and commits == [[0, 1], [2, 3]]
    assert all(editor.solver(tiny_lm).kp[layer].abs().sum() == 0 for layer in (1, 2))  # reset at the end
    roles = [(r["checkpoint"], r["role"], r["case_id"]) for r in rows]
    assert roles == [(2, "edit", 0), (2, "edit", 1), (2, "held_out", 4), (2, "held_out", 5),
                     (4, "edit", 0), (4, "edit", 1), (4, "edit", 2), (4, "edit", 3), (4, "held_out", 4),
                     (4, "held_out", 5)]
    assert set(summary["checkpoints"]) == {"2", "4"}
    last = summary["checkpoints"]["4"]
    assert last["cases"] == 4 and last["held_out_cases"] == 2 and summary["cases"] == 4
    assert last["ERR"] == last["efficacy_score"]
    with pytest.raises(ValueError, match="must not be edited"):
        run_sequential(tiny_lm, editor, cases(2), 1, None, cases(1), "alphaedit", progress=False)


def test_lifelong_metrics_and_checkpoint_summary():
    held = [{"pre_efficacy_score": 0.0, "efficacy_score": 0.0, "error": None},   # right before, still right
            {"pre_efficacy_score": 0.0, "efficacy_score": 1.0, "error": None},   # right before, lost
            {"pre_efficacy_score": 1.0, "efficacy_score": 0.0, "error": None},   # wrong before: not counted
            {"pre_efficacy_score": 0.0, "efficacy_score": None, "error": "X"}]
    assert trr(held) == 0.5 and trr([]) is None
    assert err([{"efficacy_score": 1.0}, {"efficacy_score": 0.0}, {"efficacy_score": 1.0, "error": "X"}]) == 0.5
    rows = [{"case_id": i, "checkpoint": t, "role": "edit", "efficacy_score": e, "paraphrase_score": 1.0,
             "neighborhood_score": 1.0, "error": None, "ckpt_keys": float(t)}
            for t, i, e in [(1, 0, 1.0), (2, 0, 0.0), (2, 1, 1.0)]]
    rows += [{"case_id": 9, "checkpoint": t, "role": "held_out", "pre_efficacy_score": 0.0,
              "efficacy_score": float(t == 2), "error": None} for t in (1, 2)]
    s = summarize(rows)
    assert s["checkpoints"]["1"]["ERR"] == 1.0 and s["checkpoints"]["1"]["TRR"] == 1.0
    assert s["checkpoints"]["2"]["ERR"] == 0.5 and s["checkpoints"]["2"]["TRR"] == 0.0
    assert s["checkpoints"]["2"]["ckpt_keys"] == 2.0 and s["cases"] == 2 and s["efficacy_score"] == 0.5
    assert json.loads(json.dumps(s)) == s


def test_batching_and_checkpoint_plans():
    assert [[r.case_id for r in b] for b in batches(cases(5)[::-1], 2)] == [[0, 1], [2, 3], [4]]
    assert plan_checkpoints(100, 10, [10, 100, 1000]) == [10, 100]
    assert plan_checkpoints(25, 10, None) == [25]
    with pytest.raises(ValueError, match="multiple of the batch size"):
        plan_checkpoints(100, 10, [15])
    with pytest.raises(ValueError, match="batch size"):
        batches(cases(2), 0)


# ------------------------------------------------------------------------------------ across Ray workers

def test_distributed_batch_and_sequential_match_one_process(tiny_dir, tmp_path, capsys, monkeypatch):
    """2 Ray workers split z, keys and scoring; the driver solves. Same figures as in one process (z are
    per-request and the steps fixed, so the shares do not change them); sequential checkpoints and TRR."""
    import ray

    from collections import Counter

    import pyarrow.compute as pc

    from kedit_ray.distributed.batch import run_protocol_eval
    from kedit_ray.eval.resume import PreScores
    from kedit_ray.results import read_results
    from kedit_ray.models import load
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    params = {"layers": [1, 2], "n_prefixes": 2, "prefix_len": 4, "mom2_update_weight": 1e-3,
              "values": {"steps": 6, "early_stop": False}}
    config = EvalSpec(ModelSpec(str(tiny_dir)), "memit", params, "counterfact", protocol="batch", batch_size=4,
                      resources=Resources(2))
    lm = load(str(tiny_dir))
    local = run_batch(lm, Memit(MemitParams.from_dict(params)), cases(4), batch_size=4, method="memit",
                      progress=False)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        summary = run_protocol_eval(config, cases(4), str(tmp_path / "b"), progress=False)
        import pyarrow.dataset as ds

        table = ds.dataset(str(tmp_path / "b" / "results")).to_table().to_pylist()
        assert sorted(r["case_id"] for r in table) == [0, 1, 2, 3] and len({r["worker"] for r in table}) == 2
        by_id = {r["case_id"]: r for r in table}
        for r in local:
            for k in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
                      "pre_efficacy_magnitude"):
                assert by_id[r["case_id"]][k] == pytest.approx(r[k], abs=2e-3), k
        assert summary["cases"] == 4 and summary["timings"]["z_s"] > 0 and summary["complete"]
        # cut short after z: the rerun reads the targets back, computes none, and writes the same rows
        z_files = sorted((tmp_path / "b" / "z").glob("z-*.safetensors"))
        assert len(z_files) == 1                                   # one round: 2 workers × Z_ROUND 25 ≥ 4
        for f in (tmp_path / "b" / "results").glob("part-*"):
            f.unlink()
        again = run_protocol_eval(config, cases(4), str(tmp_path / "b"), progress=False)
        assert "z_s" not in again["timings"] and "pre_s" not in again["timings"] and again["complete"]
        assert again["efficacy_magnitude"] == pytest.approx(summary["efficacy_magnitude"], abs=1e-6)
        pre = tmp_path / "b" / "pre_scores.json"
        with pytest.raises(ValueError, match="pre_scores.json: made on another model"):
            PreScores(tmp_path / "b").read("another fingerprint")
        z_files[0].write_bytes(b"not safetensors")
        pre.write_text("{")
        for bad in (z_files[0], pre):   # each names its file, before Ray starts
            with pytest.raises(ValueError, match=bad.name):
                run_protocol_eval(config, cases(4), str(tmp_path / "b"), progress=False)
            bad.unlink()
        # sequential AlphaEdit through `kedit eval`: checkpoints, held-out TRR, report, no midway resume
        from kedit_ray.cli import main

        data = tmp_path / "cases.jsonl"
        data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(6)))
        out = tmp_path / "s"
        def sequential(out, limit: int = 4) -> list[str]:
            return ["eval", "--method", "alphaedit", "--model", str(tiny_dir), "--data", str(data), "--limit",
                    str(limit), "--layers", "1,2", "--v-steps", "6", "--workers", "2", "--out", str(out),
                    "--protocol", "sequential", "--batch-size", "2", "--checkpoints", "2,4", "--held-out", "2"]

        argv = sequential(out)
        assert main(argv) == 0
        s = json.loads((out / "summary.json").read_text())
        assert set(s["checkpoints"]) == {"2", "4"} and s["checkpoints"]["4"]["held_out_cases"] == 2
        assert s["checkpoints"]["2"]["cases"] == 2 and s["TRR"] is not None and s["protocol"] == "sequential"
        assert main(["report", str(out)]) == 0 and (out / "lifelong.png").exists()
        # cut short after batch 0 was saved and part of its checkpoint scored: the rerun applies Σ ΔW and
        # AlphaEdit's kept keys, scores the rows checkpoint 2 lacks on the model as it was, and edits batch 1;
        # cut once more after batch 1's z, the next rerun reads them back
        rows = lambda: sorted((r["case_id"], r["checkpoint"], r["efficacy_magnitude"])  # noqa: E731
                              for p in (out / "results").glob("part-*") for r in pq.read_table(p).to_pylist())
        before = rows()
        state = out / "run_state.safetensors"
        assert main(sequential(tmp_path / "cut", limit=2)) == 0     # the first batch alone: the state after it
        for p in (out / "results").glob("part-*"):
            p.unlink()
        state.write_bytes((tmp_path / "cut" / "run_state.safetensors").read_bytes())
        import kedit_ray.distributed.batch as batch_module

        def cut(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(batch_module, "spread", cut)
            assert main(argv) == 130                                   # interrupted, what was done is kept
        assert len(list((out / "z" / "batch-1").glob("z-*.safetensors"))) == 1
        capsys.readouterr()
        assert main(argv) == 0
        said = capsys.readouterr().out
        assert "resuming: 1 of 2 batches already applied" in said and "2 of 2 targets z already in" in said
        assert not (out / "z" / "batch-1").exists()
        assert "pre_s" not in json.loads((out / "summary.json").read_text())["timings"]   # read back
        assert [r[:2] for r in rows()] == [r[:2] for r in before]
        for got, want in zip(rows(), before):   # checkpoint 2: the saved ΔW; 4: batch 1 edited again
            assert got[2] == pytest.approx(want[2], abs=1e-5), (got, want)
        state.write_bytes(b"junk")
        capsys.readouterr()
        assert main(argv) == 2 and "run_state.safetensors" in capsys.readouterr().err
        # an editor that is not split (ROME): one worker edits each batch from Σ ΔW and the editor's state, every
        # worker scores a share of each checkpoint; the rows equal one worker's (which runs 2 torch threads to
        # their 1: equal to float32 rounding). --checkpoint-sample 1 scores one edit at checkpoint 2, every one at 4
        def rome(out, *more) -> list[str]:
            return ["eval", "--method", "rome", "--model", str(tiny_dir), "--data", str(data), "--limit", "4",
                    "--layer", "1", "--no-cov", "--v-steps", "4", "--rome-keep-edits", "--out", str(out),
                    "--protocol", "sequential", "--batch-size", "1", "--checkpoints", "2", "--held-out", "2", *more]

        def figures(out) -> list:
            t = read_results(out).sort_by([("checkpoint", "ascending"), ("case_id", "ascending")])
            return list(zip(*(t[c].to_pylist() for c in ("case_id", "checkpoint", "role", "efficacy_magnitude",
                                                          "neighborhood_magnitude", "pre_efficacy_magnitude"))))

        capsys.readouterr()
        assert main(rome(tmp_path / "rome1", "--workers", "1")) == 0
        assert main(rome(tmp_path / "rome2", "--workers", "2")) == 0
        assert "[kedit] 2 workers" in capsys.readouterr().err
        table = read_results(tmp_path / "rome2")
        assert Counter(table["checkpoint"].to_pylist()) == {2: 2 + 2, 4: 4 + 2}
        assert len(set(table.filter(pc.equal(table["checkpoint"], 4))["worker"].to_pylist())) == 2
        for got, want in zip(figures(tmp_path / "rome2"), figures(tmp_path / "rome1"), strict=True):
            assert got[:3] == want[:3] and got[3:] == pytest.approx(want[3:], abs=1e-6)
        log = json.loads((tmp_path / "rome2" / "checkpoints.json").read_text())
        assert [e["edits"] for e in log] == [2, 4] and all(e["peak_rss"] >= e["rss"] > 0 for e in log)
        assert main(rome(tmp_path / "sampled", "--workers", "2", "--checkpoint-sample", "1")) == 0
        table = read_results(tmp_path / "sampled")
        assert Counter(table["checkpoint"].to_pylist()) == {2: 1 + 2, 4: 4 + 2}
        assert json.loads((tmp_path / "sampled" / "summary.json").read_text())["checkpoint_sample"] == 1
        assert main(rome(tmp_path / "sampled", "--workers", "2", "--checkpoint-sample", "1")) == 0   # complete
    finally:
        ray.shutdown()


def test_sequential_rome_resumes_midway(tmp_path, tiny_dir, monkeypatch, capsys):
    """A sequential ROME run (whole on one worker) cut short after its third edit goes on from the state saved
    after it: Σ ΔW (W bit for bit) and the kept keys of --rome-keep-edits, so every row equals an uninterrupted
    run's exactly. A saved point whose checkpoint lacks rows is scored again; a GRACE run, which saves no state,
    still refuses to resume."""
    import pyarrow.compute as pc

    from kedit_ray.cli import main
    from kedit_ray.eval.resume import RunState
    from kedit_ray.results import read_results, write_part

    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(6)))

    def argv(out, method="rome") -> list[str]:
        flags = ["--layer", "1", *(["--no-cov", "--v-steps", "4", "--rome-keep-edits"] if method == "rome"
                                   else ["--eps-init", "1.0"])]
        return ["eval", "--method", method, "--model", str(tiny_dir), "--data", str(data), "--limit", "4", *flags,
                "--out", str(out), "--protocol", "sequential", "--batch-size", "1", "--checkpoints", "2",
                "--held-out", "2", "--workers", "1"]

    def rows(out) -> list:
        t = read_results(out).sort_by([("checkpoint", "ascending"), ("case_id", "ascending")])
        return list(zip(*(t[c].to_pylist() for c in ("case_id", "checkpoint", "role", "efficacy_magnitude",
                                                      "paraphrase_magnitude", "neighborhood_magnitude"))))

    assert main(argv(tmp_path / "whole")) == 0
    out = tmp_path / "cut"
    real, calls = Rome.edit, []

    def cut(self, lm, request):
        calls.append(request.case_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, lm, request)

    with monkeypatch.context() as m:
        m.setattr(Rome, "edit", cut)
        assert main(argv(out)) == 130
    n, deltas, own, _ = RunState(out).read([[r] for r in cases(4)])
    assert n == 3 and own["kept"].shape == (6, 64) and list(deltas) == ["model.layers.1.mlp.down_proj"]  # k*, k_p each
    capsys.readouterr()
    assert main(argv(out)) == 0
    assert "resuming: 3 of 4 batches already applied" in capsys.readouterr().out
    assert rows(out) == rows(tmp_path / "whole") and len(rows(out)) == (2 + 2) + (4 + 2)
    table = read_results(out)
    for p in (out / "results").glob("part-*"):
        p.unlink()
    write_part(out / "results" / "part-0.parquet", table.filter(pc.equal(table["checkpoint"], 2)))
    assert main(argv(out)) == 0   # the saved point (4 edits) is the last checkpoint: scored again
    assert rows(out) == rows(tmp_path / "whole")
    grace = tmp_path / "grace"
    assert main(argv(grace, "grace")) == 0 and not (grace / "run_state.safetensors").exists()
    table = read_results(grace)
    for p in (grace / "results").glob("part-*"):
        p.unlink()
    write_part(grace / "results" / "part-0.parquet", table.filter(pc.equal(table["checkpoint"], 2)))
    capsys.readouterr()
    assert main(argv(grace, "grace")) == 2 and "no run state to resume from" in capsys.readouterr().err


def test_report_plots_scores_against_edits(tmp_path):
    from kedit_ray.results import PartWriter
    from kedit_ray.eval.report import report

    dirs = []
    for method, drop in (("memit", 0.3), ("alphaedit", 0.1)):
        out = tmp_path / method
        with PartWriter(out) as w:
            for t in (10, 100):
                for i in range(3):
                    w.add({"case_id": i, "method": method, "model": "m", "checkpoint": t, "role": "edit",
                           "efficacy_score": 1.0 - drop * (t == 100), "paraphrase_score": 0.5,
                           "neighborhood_score": 0.7, "error": None})
                w.add({"case_id": 99, "method": method, "model": "m", "checkpoint": t, "role": "held_out",
                       "efficacy_score": 0.0, "pre_efficacy_score": 0.0, "error": None,
                       **({"ckpt_codebook_keys": t // 10} if method == "alphaedit" else {})})
        dirs.append(str(out))
    text = report(dirs)
    rows = {tuple(line.split()[1:3]): line.split()[3:] for line in text.splitlines() if line.startswith(str(tmp_path))}
    # TRR, ERR, Avg, #keys, ES, PS, NS, S
    assert rows[("memit", "100")][:5] == ["1.000", "0.700", "0.850", "-", "0.700"]
    assert rows[("alphaedit", "10")][:4] == ["1.000", "1.000", "1.000", "1"]
    assert rows[("alphaedit", "100")][:4] == ["1.000", "0.900", "0.950", "10"]
    assert (tmp_path / "memit" / "lifelong.png").stat().st_size > 1000


def test_several_data_files_and_drop_repeats(tmp_path, tiny_dir, capsys):
    """--data A B reads both, in order; --drop-repeats drops the later copy of a subject and prompt and says how
    many; case_ids that repeat across the files are refused, naming the files."""
    import argparse

    from kedit_ray.cli import UsageError, _requests

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(3)))
    again = [EditRequest(10 + r.case_id, r.subject, r.prompt, "Rome", r.target_true) for r in cases(2, start=2)]
    b.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in again))

    def read(*data, drop=False, limit=None):
        args = argparse.Namespace(model=tiny_dir, data=[str(d) for d in data], dataset="auto", skip_invalid=False,
                                  drop_repeats=drop)
        return [r.case_id for r in _requests(args, limit)]

    assert read(a, b) == [0, 1, 2, 12, 13]
    capsys.readouterr()
    assert read(a, b, drop=True) == [0, 1, 2, 13] and "dropped 1 requests" in capsys.readouterr().err
    assert read(a, b, drop=True, limit=2) == [0, 1] and read(a, b, limit=4) == [0, 1, 2, 12]
    with pytest.raises(UsageError, match="case_ids repeat across the files"):
        read(a, a)
    z = tmp_path / "z.json"   # zsRE records are numbered by their index: a second file's go on after the first's
    z.write_text(json.dumps([{"subject": s, "src": f"Where is {s}?", "alt": "Rome", "pred": "Paris"}
                             for s in ("Space Needle", "Eiffel Tower")]))
    assert read(z, z) == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="different datasets"):
        read(a, z)


def test_sequential_keeps_one_copy_of_the_weights(tiny_lm):
    """Nothing held grows with the edits: each batch's delta stays in the weights and lets go of its copy of W as
    soon as it is applied (the run keeps W before the run once, to restore it at the end)."""
    from kedit_ray.editors import UltraEdit, UltraEditParams
    from kedit_ray.eval.protocols import sequential_rows

    editor, made = UltraEdit(UltraEditParams(layers=[1], eta=1e-2)), []
    edit_batch = editor.edit_batch
    editor.edit_batch = lambda lm, reqs: made.append(edit_batch(lm, reqs)) or made[-1]
    before = state(tiny_lm)
    for _ in sequential_rows(tiny_lm, editor, cases(4), 2, None, [], "ultraedit", progress=False):
        for delta in made:
            with pytest.raises(RuntimeError, match="not applied"):
                delta.weights_before()
    assert len(made) == 2 and same(tiny_lm, before)
    with made[0].applied(tiny_lm.model):    # a released delta applies again to the restored model
        assert not same(tiny_lm, before)

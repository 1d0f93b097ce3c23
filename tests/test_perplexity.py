"""Perplexity and collapse (issue 19 §2): the metric against exp(mean NLL) computed directly, and `kedit eval
--ppl-docs` end to end on the tiny model: columns, summary, report, --collapse-factor, all three protocols."""
from __future__ import annotations

import json
import math

import pyarrow.dataset as ds
import pytest
import torch

from kedit_ray.cli import main
from kedit_ray.eval.perplexity import corpus_docs, perplexity
from kedit_ray.eval.report import table
from kedit_ray.eval.summary import summarize
from test_errors import GOOD, eval_argv, one_error, run, write

DOCS = ["The Space Needle is located in the city of Seattle .", "Paris is the capital of France",
        "Rome", "", "Danielle Darrieux speaks French , the language of France .", "the city of " * 50]
CONTEXT = 128   # the tiny model's: the last document (151 tokens) is cut to it, and its head runs in 64-row chunks


def direct(lm, docs: list[str], max_len: int) -> float:
    """exp(Σ NLL / Σ predicted tokens), from each document's full float64 log-softmax."""
    nll, n = 0.0, 0
    for doc in docs:
        ids = lm.tok(doc).input_ids[:max_len]
        if len(ids) < 2:
            continue
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        nll -= sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
        n += len(ids) - 1
    return math.exp(nll / n)


def test_perplexity_is_exp_mean_token_nll(tiny_lm64, one_thread):
    """Pooled over every predicted token ("Rome" predicts one, "" none), documents truncated to max_len and the
    context; float64 throughout, so any correct arithmetic agrees to far below 1e-9."""
    with torch.no_grad():
        for max_len in (256, 5):
            expected = direct(tiny_lm64, DOCS, min(max_len, CONTEXT))
            assert perplexity(tiny_lm64, DOCS, max_len) == pytest.approx(expected, rel=1e-9)
        assert perplexity(tiny_lm64, DOCS, 5) != pytest.approx(perplexity(tiny_lm64, DOCS), rel=1e-3)
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(tiny_lm64, ["", "Rome"], 1)


def _rows(out) -> list[dict]:
    return ds.dataset(str(out / "results")).to_table().sort_by("case_id").to_pylist()


def test_eval_ppl_docs_end_to_end(tmp_path, tiny_dir, tiny_lm, capsys, one_thread):
    data = write(tmp_path / "d.jsonl", [GOOD, {**GOOD, "case_id": 1, "subject": "Eiffel Tower", "target_new": "Rome"}])
    out = tmp_path / "o"
    assert main(eval_argv(tiny_dir, data, out, "--workers", "1", "--ppl-docs", "2", "--dtype", "float32")) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    pre = perplexity(tiny_lm, corpus_docs(2))   # the unedited float32 model's, once per worker: the same in every row
    for r in rows:
        assert r["pre_perplexity"] == pytest.approx(pre, rel=1e-5)
        assert r["perplexity"] > 0 and r["perplexity"] != r["pre_perplexity"]   # the edit changed the model
        assert r["collapsed"] == (r["perplexity"] > 2 * r["pre_perplexity"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pre_perplexity"] == pytest.approx(pre, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(sum(r["perplexity"] for r in rows) / 2)
    assert summary["collapsed_count"] == sum(r["collapsed"] for r in rows)
    assert json.loads((out / "config.json").read_text())["ppl_docs"] == 2
    capsys.readouterr()
    assert main(["report", str(out), "--png", str(tmp_path / "r.png")]) == 0
    assert "PPL pre→post" in capsys.readouterr().out

    # --collapse-factor decides the flag: below every ratio post/pre all edits collapse, above every one none does
    ratios = [r["perplexity"] / r["pre_perplexity"] for r in rows]
    for factor, flagged in ((min(ratios) / 2, 2), (max(ratios) * 2, 0)):
        o = tmp_path / f"f{factor}"
        assert main(eval_argv(tiny_dir, data, o, "--workers", "1", "--ppl-docs", "2",
                              "--collapse-factor", repr(factor))) == 0
        assert [r["collapsed"] for r in _rows(o)] == [flagged == 2] * 2
        assert json.loads((o / "summary.json").read_text())["collapsed_count"] == flagged


def test_without_ppl_docs_the_columns_are_null():
    rows = [{"case_id": 0, "efficacy_score": 1.0, "perplexity": None, "pre_perplexity": None, "collapsed": None,
             "error": None}]
    s = summarize(rows)
    assert s["perplexity"] is None and s["collapsed_count"] is None
    assert "PPL" not in table({"run": {**s, "method": "rome"}})
    measured = summarize([{**rows[0], "perplexity": 30.0, "pre_perplexity": 10.0, "collapsed": True},
                          {**rows[0], "case_id": 1, "perplexity": 12.0, "pre_perplexity": 10.0, "collapsed": False}])
    assert (measured["perplexity"], measured["pre_perplexity"], measured["collapsed_count"]) == (21.0, 10.0, 1)
    assert "10.000→21.000" in table({"run": {**measured, "method": "rome"}})


def test_protocols_measure_the_model_at_each_batch_and_checkpoint(tiny_lm, one_thread):
    """Batch: every row of a batch carries the perplexity of the model with that batch's edit; sequential: every row
    of a checkpoint (edits and held-out cases) that of the model with every edit so far. Checked against the
    edits themselves, applied again after the run (which restored the model)."""
    from test_protocols import cases, small

    from kedit_ray.editors import Memit, MemitParams
    from kedit_ray.eval.perplexity import Probe
    from kedit_ray.eval.protocols import run_batch, run_sequential

    docs = corpus_docs(2)
    pre = perplexity(tiny_lm, docs)
    editor = small(Memit, MemitParams, mom2_update_weight=1e-3)
    editor.hp.values.steps = 4
    made = []
    edit_batch = editor.edit_batch
    editor.edit_batch = lambda lm, reqs: made.append(edit_batch(lm, reqs)) or made[-1]

    def with_edits(edits) -> float:
        for e in edits:
            e.apply(tiny_lm.model)
        try:
            return perplexity(tiny_lm, docs)
        finally:
            for e in reversed(edits):
                e.revert(tiny_lm.model)

    rows = run_batch(tiny_lm, editor, cases(4), 2, "memit", progress=False, probe=Probe(docs, 1.0))
    for b in (0, 1):
        post = with_edits([made[b]])
        at = [r for r in rows if r["batch"] == b]   # the same computation: equal to float rounding, any arithmetic
        assert [r["perplexity"] for r in at] == pytest.approx([post, post], rel=1e-9)
        assert [(r["pre_perplexity"], r["collapsed"]) for r in at] == [(pre, post > pre)] * 2
    made.clear()
    rows, summary = run_sequential(tiny_lm, editor, cases(4), 2, [2, 4], cases(2, start=4), "memit",
                                   progress=False, probe=Probe(docs, 2.0))
    for t, edits in ((2, made[:1]), (4, made)):
        post = with_edits(edits)
        at = [r for r in rows if r["checkpoint"] == t]
        assert len(at) == t + 2 and {r["pre_perplexity"] for r in at} == {pre}
        assert [r["perplexity"] for r in at] == pytest.approx([post] * (t + 2), rel=1e-9)
        assert summary["checkpoints"][str(t)]["perplexity"] == pytest.approx(post, rel=1e-9)
        assert summary["checkpoints"][str(t)]["collapsed_count"] == (t if post > 2 * pre else 0)
    assert perplexity(tiny_lm, docs) == pytest.approx(pre, rel=1e-9)   # the model restored


def test_eval_ppl_docs_in_batch_and_sequential(tmp_path, tiny_dir, capsys, one_thread):
    """Through `kedit eval`: MEMIT sequential (split over the pool: the driver asks a worker) and ROME batch (whole
    batches on a worker); the report's checkpoint table and lifelong figure carry perplexity."""
    from test_protocols import cases

    data = write(tmp_path / "d.jsonl", [r.to_dict() for r in cases(6)])
    common = ["--model", tiny_dir, "--data", data, "--no-cov", "--v-steps", "3", "--workers", "1", "--ppl-docs", "2",
              "--batch-size", "2"]
    seq, bat = tmp_path / "seq", tmp_path / "bat"
    assert main(["eval", "--method", "memit", "--layers", "1,2", "--protocol", "sequential", "--checkpoints", "2,4",
                 "--held-out", "2", "--limit", "4", "--out", str(seq), *common]) == 0
    assert main(["eval", "--method", "rome", "--layer", "1", "--protocol", "batch", "--limit", "4", "--out", str(bat),
                 *common]) == 0
    for out, key in ((seq, "checkpoint"), (bat, "batch")):
        rows = _rows(out)
        assert len({r["pre_perplexity"] for r in rows}) == 1 and None not in {r["pre_perplexity"] for r in rows}
        for k in {r[key] for r in rows}:
            at = {(r["perplexity"], r["collapsed"]) for r in rows if r[key] == k}
            (post, flag), = at   # one model, one value
            assert flag == (post > 2 * rows[0]["pre_perplexity"])
    s = json.loads((seq / "summary.json").read_text())
    assert s["checkpoints"]["2"]["perplexity"] != s["checkpoints"]["4"]["perplexity"]
    capsys.readouterr()
    assert main(["report", str(seq), "--png", str(tmp_path / "r.png")]) == 0
    said = capsys.readouterr().out
    assert said.count("PPL") == 2 and (tmp_path / "lifelong.png").exists()   # the run table and the checkpoints'


def test_a_run_from_before_ppl_docs_resumes(tmp_path):
    """A config.json written before --ppl-docs existed reads as not measuring it: resumed as such, refused with it."""
    from kedit_ray.results import ConfigMismatch, PartWriter, check_config
    from kedit_ray.spec import RUN_ONLY, EvalSpec, ModelSpec

    spec = EvalSpec(ModelSpec("toy"), "rome")
    before = {k: v for k, v in spec.to_json().items() if k not in ("ppl_docs", "collapse_factor")}
    (tmp_path / "config.json").write_text(json.dumps(before))
    with PartWriter(tmp_path) as writer:
        writer.add({"case_id": 0, "method": "rome", "model": "toy", "error": None})
    check_config(tmp_path, spec.to_json(), RUN_ONLY, EvalSpec.from_json)
    with pytest.raises(ConfigMismatch, match="ppl_docs: 0 there, 2 now"):
        check_config(tmp_path, EvalSpec(ModelSpec("toy"), "rome", ppl_docs=2).to_json(), RUN_ONLY, EvalSpec.from_json)


def test_stop_on_collapse(tmp_path, tiny_dir, capsys, one_thread):
    """A factor below every checkpoint's ratio flags the first checkpoint: the run ends there, says so in its
    summary, and a rerun finds it complete (MEMIT, split; ROME, whole on a worker). Refused where it cannot apply."""
    from test_protocols import cases

    from kedit_ray.results import read_results

    data = write(tmp_path / "d.jsonl", [r.to_dict() for r in cases(6)])
    for method, where in (("memit", ["--layers", "1,2"]), ("rome", ["--layer", "1"])):
        out = tmp_path / method
        argv = ["eval", "--method", method, *where, "--model", tiny_dir, "--data", data, "--no-cov", "--v-steps", "3",
                "--workers", "1", "--ppl-docs", "2", "--protocol", "sequential", "--batch-size", "2",
                "--checkpoints", "2,4", "--held-out", "2", "--limit", "4", "--out", str(out), "--stop-on-collapse",
                "--collapse-factor", "1e-9"]
        assert main(argv) == 0
        assert sorted(set(read_results(out)["checkpoint"].to_pylist())) == [2]
        s = json.loads((out / "summary.json").read_text())
        assert s["stopped_at"] == 2 and s["collapsed_count"] == 2
        assert main(argv) == 0 and len(read_results(out)) == 4   # nothing to do again
    out = tmp_path / "none"   # a factor no checkpoint reaches: the run goes on to the end
    assert main([*argv[:argv.index("--out")], "--out", str(out), "--stop-on-collapse", "--collapse-factor", "1e9"]) == 0
    assert sorted(set(read_results(out)["checkpoint"].to_pylist())) == [2, 4]
    assert json.loads((out / "summary.json").read_text())["stopped_at"] is None
    for bad in (["--protocol", "batch"], ["--ppl-docs", "0"]):   # the last --protocol / --ppl-docs wins
        code, err = run(capsys, *eval_argv(tiny_dir, data, tmp_path / "o", "--protocol", "sequential", "--ppl-docs",
                                           "2", "--stop-on-collapse", *bad))
        assert code == 2
        one_error(err, "eval", "--stop-on-collapse needs --protocol sequential and --ppl-docs")

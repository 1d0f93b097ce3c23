"""zsRE metrics on a tiny random Llama: token accuracy and locality checked by hand."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest
import torch

from kedit_ray.eval.zsre import loc_prompt, teacher_forced, zsre_scores
from kedit_ray.requests import EditRequest

from conftest import WORDS


pytestmark = pytest.mark.usefixtures("one_thread")


def argmax_after(lm, ids: list[int]) -> int:
    with torch.no_grad():
        return int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())


def test_token_accuracy_by_hand(tiny_lm64):
    tiny_lm = tiny_lm64
    tok = tiny_lm.tok
    words = {tok.convert_tokens_to_ids(w): w for w in WORDS}
    prompt = next(p for p in ("the city of", "Where is the", "What is the", "The mother tongue of")
                  if argmax_after(tiny_lm, tok(p).input_ids) in words)
    ctx = tok(prompt).input_ids
    g1 = argmax_after(tiny_lm, ctx)                      # the greedy first token: right
    g2 = argmax_after(tiny_lm, ctx + [g1])
    wrong = next(t for t in words if t != g2)            # a second token that is not the argmax: wrong
    req = EditRequest(3, prompt.split()[-1], prompt.rsplit(" ", 1)[0] + " {}", f"{words[g1]} {words[wrong]}",
                      "Paris", [prompt], ["Where is the Eiffel Tower"], [f"{words[g1]} {words[wrong]}"])
    pre = zsre_scores(tiny_lm, req)
    assert pre["efficacy_score"] == 0.5 and pre["paraphrase_score"] == 0.5     # 1 of 2 tokens
    assert pre["neighborhood_score"] == 1.0                                      # the reference itself
    (am, probs), = teacher_forced(tiny_lm, [prompt], [[g1, wrong]])
    assert am[0] == g1 and am[1] == g2
    # a float64 model: both read the same logits, rounded to float32 (a flip costs 2⁻²⁴ |l|), and take a float32
    # softmax over V tokens (within (V + 4) 2⁻²⁴, relative), on any correct arithmetic
    with torch.no_grad():
        top = tiny_lm.model(input_ids=torch.tensor([ctx + [g1]])).logits.abs().max().item()
    rel = 2 * (len(tok) + 4 + top) * 2.0 ** -24
    assert pre["efficacy_magnitude"] == pytest.approx((probs[0, g1] + probs[1, wrong]).item() / 2, rel=rel)

    # locality: the share of the loc answer's argmaxes left unchanged
    ref = list(pre["neighborhood_argmax"])
    assert len(ref) == 2
    ref[1] = ref[1] + 1
    post = zsre_scores(tiny_lm, req, {"pre_neighborhood_argmax": ref})
    assert post["neighborhood_score"] == 0.5
    with pytest.raises(ValueError, match="pre-edit predictions"):
        zsre_scores(tiny_lm, req, {"efficacy_score": 0.0})


def test_loc_prompt_gets_a_question_mark():
    assert loc_prompt("nq question: who wrote hamlet") == "nq question: who wrote hamlet?"
    assert loc_prompt("who wrote hamlet?") == "who wrote hamlet?"


@pytest.mark.parametrize("method, params", [("grace", {"layer": 1, "eps_init": 0.5, "steps": 10}),
                                            ("ft", {"layer": 1, "steps": 5}), ("ft-l", {"layer": 1, "steps": 5})])
def test_every_new_editor_runs_under_both_scorers(tiny_lm, method, params):
    from kedit_ray.editors import make_editor
    from kedit_ray.eval.protocols import run_batch

    req = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle", ["Where is the Space Needle"],
                      ["the city of Eiffel Tower"], ["Paris"])
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    for dataset in ("counterfact", "zsre"):
        rows = run_batch(tiny_lm, make_editor(method, params), [req], 1, method, scorer=dataset, progress=False)
        assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["method"] == method
        assert all(isinstance(rows[0][k], float) for k in ("efficacy_score", "pre_efficacy_score",
                                                            "neighborhood_score", "paraphrase_score"))
    assert rows[0]["pre_neighborhood_score"] == 1.0 and "neighborhood_argmax" not in rows[0]
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_portability_score_by_hand(tiny_lm64):
    """The portability answer's teacher-forced token accuracy after its question, from the model's own logits:
    the first and third tokens are the argmax, the second is not (2 of 3). Without a portability question: None."""
    lm, tok = tiny_lm64, tiny_lm64.tok
    words = {tok.convert_tokens_to_ids(w): w for w in WORDS}
    for question in ("What is the capital of", "Where is the", "What is the", "the city of", "The mother tongue of"):
        ctx = tok(question).input_ids
        g1 = argmax_after(lm, ctx)
        wrong = next(t for t in words if t != argmax_after(lm, ctx + [g1]))
        g3 = argmax_after(lm, ctx + [g1, wrong])
        if g1 in words and g3 in words:
            break
    answer = [g1, wrong, g3]
    with torch.no_grad():   # by hand: one unpadded pass over question + answer[:-1]
        logits = lm.model(input_ids=torch.tensor([ctx + answer[:-1]])).logits[0]
    by_hand = sum(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(answer)) / len(answer)
    assert by_hand == pytest.approx(2 / 3)
    req = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle", ["Where is the Space Needle"],
                      ["the city of Eiffel Tower"], ["Paris"], [question], [" ".join(words[t] for t in answer)])
    scores = zsre_scores(lm, req)
    assert scores["portability_score"] == by_hand
    bare = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle", ["Where is the Space Needle"],
                       ["the city of Eiffel Tower"], ["Paris"])
    plain = zsre_scores(lm, bare)
    assert plain["portability_score"] is None
    assert {k: v for k, v in scores.items() if k != "portability_score"} == \
        {k: v for k, v in plain.items() if k != "portability_score"}          # the other figures are untouched


def test_portability_columns_in_batch_and_sequential_protocols(tiny_lm):
    """pre_ and post portability in the rows of both protocols; null for a case without a portability question;
    the summary's means skip the nulls."""
    from kedit_ray.editors import make_editor
    from kedit_ray.eval.protocols import run_batch, run_sequential
    from kedit_ray.eval.summary import summarize

    a = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle", ["Where is the Space Needle"],
                    ["the city of Eiffel Tower"], ["Paris"], ["What is the capital of Goa"], ["Paris France"])
    b = EditRequest(1, "Eiffel Tower", "the city of {}", "Rome", "Paris", [], ["the city of Space Needle"], ["Seattle"])
    held = EditRequest(2, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                       portability_prompts=["Where is the"], portability_answers=["London"])
    editor = make_editor("ft", {"layer": 1, "steps": 3})
    rows = run_batch(tiny_lm, editor, [a, b], 1, "ft", scorer="zsre", progress=False)
    seq, summary = run_sequential(tiny_lm, editor, [a, b], 1, None, [held], "ft", scorer="zsre", progress=False)
    for r in [*rows, *seq]:
        port = r["case_id"] != 1
        for key in ("portability_score", "pre_portability_score"):
            assert (isinstance(r[key], float) and 0 <= r[key] <= 1) if port else r[key] is None, (r, key)
    edits = [r for r in seq if r["role"] == "edit"]
    assert summary["portability_score"] == edits[0]["portability_score"]          # b's null is skipped
    assert summary["pre_portability_score"] == edits[0]["pre_portability_score"]
    assert summarize(rows, "zsre")["portability_score"] == rows[0]["portability_score"]


def test_summary_means_portability_over_the_cases_that_have_it():
    from kedit_ray.eval.summary import summarize

    rows = [{"case_id": i, "method": "rome", "model": "m", "error": e, "efficacy_score": 1.0,
             "portability_score": p, "pre_portability_score": q}
            for i, (p, q, e) in enumerate([(1.0, 0.0, None), (None, None, None), (0.5, 0.25, None),
                                           (0.0, 0.0, "ValueError: boom")])]
    s = summarize(rows, "zsre")
    assert s["portability_score"] == 0.75 and s["pre_portability_score"] == 0.125
    assert summarize([{k: v for k, v in r.items() if "portability" not in k}
                      for r in rows]).get("portability_score") is None     # CounterFact rows: not measured


def test_kedit_eval_zsre_portability_end_to_end(tmp_path, tiny_dir, capsys):
    """`kedit eval --dataset zsre` on a file whose second record has no portability block (single protocol, then
    batch MEMIT with its pre_scores.json, --dataset left to auto, which finds zsRE): both portability columns,
    float64, null for that case; the report's Port."""
    import json

    import pyarrow as pa

    from kedit_ray.cli import main
    from kedit_ray.eval.report import report
    from kedit_ray.results import read_results

    record = {"subject": "Space Needle", "src": "Where is the Space Needle", "alt": "Rome", "pred": "Seattle",
              "rephrase": "the city of Space Needle", "loc": "the city of Eiffel Tower", "loc_ans": "Paris",
              "portability": {"New Question": "What is the capital of the country of the Space Needle",
                              "New Answer": "Rome Italy"}}
    data = tmp_path / "port.json"
    data.write_text(json.dumps([record, {k: v for k, v in record.items() if k != "portability"}]))
    runs = []
    for protocol, method, flags in (("single", "rome", ["--layer", "1", "--dataset", "zsre"]),
                                    ("batch", "memit", ["--layers", "1,2"])):
        out = tmp_path / protocol
        assert main(["eval", "--model", tiny_dir, "--method", method, "--data", str(data), "--out", str(out),
                     "--workers", "1", "--cpus-per-worker", "1", "--no-cov", *flags, "--v-steps", "2",
                     "--protocol", protocol, "--batch-size", "2"]) == 0
        assert json.loads((out / "config.json").read_text())["dataset"] == "zsre"
        table = read_results(out)
        rows = {r["case_id"]: r for r in table.to_pylist()}
        for key in ("portability_score", "pre_portability_score"):
            assert table.schema.field(key).type == pa.float64()
            assert 0 <= rows[0][key] <= 1 and rows[1][key] is None
        summary = json.loads((out / "summary.json").read_text())
        assert summary["portability_score"] == rows[0]["portability_score"]
        assert summary["pre_portability_score"] == rows[0]["pre_portability_score"]
        runs.append(str(out))
    pre = json.loads((tmp_path / "batch" / "pre_scores.json").read_text())["scores"]
    assert pre["0"]["portability_score"] == rows[0]["pre_portability_score"] and pre["1"]["portability_score"] is None
    head = report(runs).splitlines()[0]
    assert "Port pre→post" in head


@pytest.mark.slow
def test_rome_on_20_portability_records_gives_every_new_column(tmp_path, capsys):
    """The issue's check: `kedit eval` with ROME's defaults (C computed on first use) on the first 20 records of
    zsre_portability.json with --ppl-docs 5 --generate: every new column in every row, non-null, within range."""
    from conftest import data_file

    from kedit_ray.cli import main

    out = tmp_path / "o"
    assert main(["eval", "--method", "rome", "--dataset", "zsre", "--data", str(data_file("zsre_portability.json")),
                 "--limit", "20", "--ppl-docs", "5", "--generate", "--out", str(out)]) == 0
    rows = ds.dataset(str(out / "results")).to_table().to_pylist()
    assert len(rows) == 20 and all(r["error"] is None for r in rows)
    shares = [f"{pre}{m}" for pre in ("", "pre_") for m in ("portability_score", "efficacy_generated",
                                                              "paraphrase_generated")]
    for r in rows:
        for key in shares:
            assert r[key] is not None and 0 <= r[key] <= 1, (r["case_id"], key, r[key])
        assert 1 < r["pre_perplexity"] < 1e4 and 1 < r["perplexity"] < 1e4, r["case_id"]
        assert r["collapsed"] == (r["perplexity"] > 2 * r["pre_perplexity"])
    s = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    print(f"ROME, 20 zsRE portability records: ES {s['pre_efficacy_score']:.3f} → {s['efficacy_score']:.3f} "
          f"(generated {s['pre_efficacy_generated']:.3f} → {s['efficacy_generated']:.3f}), PS "
          f"{s['pre_paraphrase_score']:.3f} → {s['paraphrase_score']:.3f} (generated "
          f"{s['pre_paraphrase_generated']:.3f} → {s['paraphrase_generated']:.3f}), portability "
          f"{s['pre_portability_score']:.3f} → {s['portability_score']:.3f}, perplexity {s['pre_perplexity']:.2f} → "
          f"{s['perplexity']:.2f}, collapsed {s['collapsed_count']}, {s['seconds_per_edit']:.1f} s/edit")
    assert s["efficacy_score"] >= 0.8

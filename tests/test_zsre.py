"""zsRE metrics on a tiny random Llama: token accuracy and locality checked by hand."""
from __future__ import annotations

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
        rows = run_batch(tiny_lm, make_editor(method, params), [req], 1, method, dataset=dataset, progress=False)
        assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["method"] == method
        assert all(isinstance(rows[0][k], float) for k in ("efficacy_score", "pre_efficacy_score",
                                                            "neighborhood_score", "paraphrase_score"))
    assert rows[0]["pre_neighborhood_score"] == 1.0 and "neighborhood_argmax" not in rows[0]
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k

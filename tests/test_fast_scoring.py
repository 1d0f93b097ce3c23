"""The batched scorers (`Scorer.many`: counterfact_many, zsre_many) against the per-case reference
(counterfact_scores, zsre_scores), on tiny random float64 models and on the real gemma-3-270m.

In float64 the two computations differ by ~1e-16 before the scorers' float32 softmax, so a float32 logit differs
by at most one rounding (2⁻²⁴ relative): figures agree to 1e-6 and booleans and argmaxes are identical on any
CPU or BLAS. In float32 (gemma) the attention kernel's sums depend on the padded width of the pass (the reference
moves by as much when only its own padding changes): magnitudes agree to 1e-5, scores exactly."""
from __future__ import annotations

import math

import pytest
import torch

from families import make_family_lm
from kedit_ray.eval import Scorer, score
from kedit_ray.eval.counterfact import counterfact_many, counterfact_scores
from kedit_ray.eval.forced import passes, plan_rows
from kedit_ray.eval.zsre import zsre_many, zsre_scores
from kedit_ray.requests import EditRequest

from conftest import data_file

pytestmark = pytest.mark.usefixtures("one_thread")

# prompts of 2 to 9 words; targets of one or two tokens (o* and o both two: two rows for one prompt); the
# neighbour prompt "the city of Rome" is in two cases (one row for both)
CASES = [
    EditRequest(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                ["Danielle Darrieux speaks", "Where is Danielle Darrieux from ? the language of"],
                ["The mother tongue of Michel Rocard is", "the city of Rome"], ["French", "Italy"],
                ["What is the capital of France"], ["Paris"]),
    EditRequest(1, "Space Needle", "{} is located in", "Eiffel Tower", "Space Needle", [],
                ["the city of Rome", "Paris"], ["Rome", "France"]),
    EditRequest(2, "Space Needle", "the {}", "Paris France", "Seattle",
                ["Where is the Space Needle ? It is in the city of", "Space Needle can be found in"],
                ["London is the capital of"], ["Space Needle"],
                ["What is the capital of Space Needle", "Paris is in"], ["Eiffel Tower", "France"]),
    EditRequest(3, "Michel Rocard", "{} was born in", "Berlin Germany", "Paris France", ["Michel Rocard ,"],
                ["Goa is in", "the company made by Michel Rocard", "What is the religion of"],
                ["Spain", "product", "Germany"]),
]


def tiny(family: str):
    lm = make_family_lm(family)
    lm.model.to(torch.float64)
    return lm


def check_equal(ref: list[dict], new: list[dict], tol: float) -> None:
    """Same keys; booleans-based scores and argmax lists identical, magnitudes within `tol`, NaN and None alike."""
    for a, b in zip(ref, new, strict=True):
        assert list(a) == list(b)
        for k, v in a.items():
            if v is None or isinstance(v, list) or k.endswith("_score"):
                assert (v == b[k]) or (math.isnan(v) and math.isnan(b[k])), (k, v, b[k])
            else:
                assert b[k] == pytest.approx(v, abs=tol, nan_ok=True), k


def test_rows_share_prompts_and_passes_cover_them():
    # (ctx, target): a one-token o beside a two-token o*: one row; two two-token targets: two rows; the same
    # prompt in another case: no row more
    ctxs = [[1, 5], [1, 5], [1, 6], [1, 6], [1, 5]]
    targets = [[7, 8], [9], [7, 8], [9, 10], [7, 8]]
    rows, row_of = plan_rows(ctxs, targets)
    assert sorted(rows) == [[1, 5, 7], [1, 6, 7], [1, 6, 9]]
    assert row_of[0] == row_of[1] == row_of[4] and row_of[2] != row_of[3]
    lengths = [[0] * n for n in (3, 3, 3, 9, 9, 2, 2, 2, 2)]
    groups = passes(lengths, tokens=10, overhead=1)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert all(len(g) * max(len(lengths[r]) for r in g) <= 10 or len(g) == 1 for g in groups)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_batched_equals_reference_on_tiny_models(family):
    lm = tiny(family)
    cases = [(r, None) for r in CASES]
    check_equal([counterfact_scores(lm, r) for r in CASES], counterfact_many(lm, cases), 1e-6)
    pre = [zsre_scores(lm, r) for r in CASES]
    check_equal(pre, zsre_many(lm, cases), 1e-6)
    # after an edit: the locality against pre-edit argmaxes that differ from the model's (every other one moved)
    moved = [{"neighborhood_argmax": [t if i % 2 else (t + 1) % len(lm.tok) for i, t in enumerate(p[
        "neighborhood_argmax"])]} for p in pre]
    post = zsre_many(lm, list(zip(CASES, moved)))
    check_equal([zsre_scores(lm, r, p) for r, p in zip(CASES, moved)], post, 1e-6)
    assert all(0 < p["neighborhood_score"] < 1 for p in post)
    with pytest.raises(ValueError, match="pre-edit predictions"):
        zsre_many(lm, [(CASES[0], {"efficacy_score": 1.0})])


def test_scorer_one_case_is_many_of_one(tiny_lm64):
    for dataset in ("counterfact", "zsre"):
        scorer = Scorer(dataset)
        many = scorer.many(tiny_lm64, [(r, None) for r in CASES])
        assert [scorer(tiny_lm64, r) for r in CASES] == [score(dataset, tiny_lm64, r) for r in CASES]
        check_equal([scorer(tiny_lm64, r) for r in CASES], many, 1e-6)


def test_batched_equals_reference_on_gemma(gemma):
    from kedit_ray.datasets import load_requests

    cf, _ = load_requests(str(data_file("counterfact-edit.json")), "counterfact", limit=10)
    check_equal([counterfact_scores(gemma, r) for r in cf], counterfact_many(gemma, [(r, None) for r in cf]), 1e-5)
    zs, _ = load_requests(str(data_file("zsre_portability.json")), "zsre", limit=5)
    check_equal([zsre_scores(gemma, r) for r in zs], zsre_many(gemma, [(r, None) for r in zs]), 1e-5)

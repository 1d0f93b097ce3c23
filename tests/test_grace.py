"""GRACE on a tiny random Llama: the codebook rules, bit-identical misses, stacking, save/load."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import Grace, GraceAdaptor, GraceParams, make_editor
from kedit_ray.editors.grace import distances
from kedit_ray.editors.toolkit import target_ids
from kedit_ray.eval.zsre import zsre_scores
from kedit_ray.models import Trace
from kedit_ray.requests import EditRequest

LAYER = 1
A = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle")
B = EditRequest(1, "Eiffel Tower", "the city of {}", "Goa", "Paris")        # the same label as A
C = EditRequest(2, "Eiffel Tower", "the city of {}", "Rome", "Paris")       # B's query, another label
FAR = "Danielle Darrieux speaks French"


pytestmark = pytest.mark.usefixtures("one_thread")


def query(lm, text: str) -> torch.Tensor:
    """h^{l-1}: the wrapped module's input (block LAYER's) at the prompt's last token."""
    ids = torch.tensor([lm.tok(text).input_ids])
    with Trace(lm.model, lm.arch.name("layer", LAYER), retain_input=True, stop=True) as t:
        lm.model(input_ids=ids)
    return t.input[0, -1]


def grace(eps: float, **kw) -> Grace:
    return Grace(GraceParams(**{"layer": LAYER, "eps_init": eps, "steps": 30, **kw}))


def logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([lm.tok(text).input_ids])).logits


def test_add_expand_split_give_the_papers_radii(tiny_lm64):
    """Float64 end to end: the editor's queries and these agree to ~1e-15 ‖q‖, so radii match to 1e-9 relative
    (d is well above 1e-6 ‖q‖) and ε_init is kept exactly."""
    tiny_lm = tiny_lm64
    d = (query(tiny_lm, A.text) - query(tiny_lm, B.text)).norm().item()
    assert d > 1e-3 * query(tiny_lm, A.text).norm()
    eps = 0.75 * d                                    # B is out of A's radius but within ε_init + ε_A
    g = grace(eps)
    a = g.edit(tiny_lm, A)
    assert a.meta["rule"] == "add" and len(a) == 1 and a.meta["codebook_keys"] == 1
    assert a.radii.tolist() == [eps]
    with a.applied(tiny_lm.model):
        b = g.edit(tiny_lm, B)                        # continues the active codebook
        assert b.meta["rule"] == "expand" and len(b) == 1
        assert b.radii.tolist() == pytest.approx([d], rel=1e-9)   # expanded to cover B's query
        with b.applied(tiny_lm.model):
            c = g.edit(tiny_lm, C)
    assert c.meta["rule"] == "split" and len(c) == 2
    assert c.radii.tolist() == pytest.approx([d / 2, d / 2], rel=1e-9)
    assert c.labels == [target_ids(tiny_lm, "Goa"), target_ids(tiny_lm, "Rome")]
    torch.testing.assert_close(c.keys[1], query(tiny_lm, C.text), rtol=1e-9, atol=1e-12)

    # far enough away: a second key with radius ε_init
    g2 = grace(0.4 * d)
    a2 = g2.edit(tiny_lm, A)
    with a2.applied(tiny_lm.model):
        b2 = g2.edit(tiny_lm, B)
    assert b2.meta["rule"] == "add" and b2.radii.tolist() == [0.4 * d, 0.4 * d]
    assert a2.meta["codebook_keys"] == 1 and b2.meta["codebook_keys"] == 2


def test_an_expand_in_a_large_codebook_routes_its_query(tiny_lm):
    """Past 25 keys the distance an edit sets a radius by is the one the codebook routes the query by, bit for bit,
    so the value trains (torch.cdist's batched default rounds a row by the batch around it: on gemma-3's 2048-wide
    queries a query expanded to exactly its distance missed its key half the time, and its value got no gradient)."""
    gen = torch.Generator().manual_seed(0)
    keys, queries = 3 * torch.randn(41, 2048, generator=gen), 3 * torch.randn(7, 2048, generator=gen)
    batched = distances(queries, keys)
    assert all(torch.equal(distances(q[None], keys)[0], row) for q, row in zip(queries, batched))

    a = grace(1.0).edit(tiny_lm, A)
    far = a.keys + 1e3 * torch.randn(40, a.keys.shape[1], generator=gen)
    big = GraceAdaptor(a.module, torch.cat([far, a.keys]), torch.cat([a.values.expand(40, -1), a.values]),
                       torch.tensor([1e-3] * 41), [a.labels[0]] * 41, a.replacement)   # A's key: a tiny radius
    with big.applied(tiny_lm.model):
        b = grace(1e3).edit(tiny_lm, B)                               # expands A's key to B's query's distance
    assert b.meta["rule"] == "expand" and b.meta["key"] == 40 and b.meta["v_steps"] > 0
    assert b.radii[40].item() == b.meta["distance"]


def test_edit_takes_effect_and_a_miss_is_bit_identical(tiny_lm):
    before = logits(tiny_lm, FAR)
    pre = zsre_scores(tiny_lm, A)
    adaptor = grace(0.5, module="mlp_out", lr=1.0).edit(tiny_lm, A)
    far = tiny_lm.tok(FAR).input_ids
    with Trace(tiny_lm.model, adaptor.module, retain_input=True) as t:
        tiny_lm.model(input_ids=torch.tensor([far]))
    assert torch.cdist(t.input[0], adaptor.keys).min() > adaptor.radii.max()   # every position misses
    with adaptor.applied(tiny_lm.model):
        assert torch.equal(logits(tiny_lm, FAR), before)
        post = zsre_scores(tiny_lm, A, pre)
    assert pre["efficacy_score"] == 0 and post["efficacy_score"] == 1
    assert torch.equal(logits(tiny_lm, FAR), before)                            # reverted


def test_adaptors_stack_and_revert(tiny_lm):
    g = grace(0.5)
    base = logits(tiny_lm, A.text)
    a = g.edit(tiny_lm, A).apply(tiny_lm.model)
    after_a = logits(tiny_lm, A.text)
    b = g.edit(tiny_lm, B).apply(tiny_lm.model)        # holds A's key and B's; only b is active
    assert len(b) == 2
    torch.testing.assert_close(logits(tiny_lm, A.text), after_a)
    b.revert(tiny_lm.model)
    assert torch.equal(logits(tiny_lm, A.text), after_a)
    with pytest.raises(RuntimeError):
        b.revert(tiny_lm.model)
    a.revert(tiny_lm.model)
    assert torch.equal(logits(tiny_lm, A.text), base)
    assert g.edit(tiny_lm, B).meta["codebook_keys"] == 1    # nothing applied: a fresh codebook


def test_replacement_modes():
    torch.manual_seed(0)
    h, out = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    keys, values = h[0, 2][None].clone(), torch.ones(1, 4)
    last = GraceAdaptor("m", keys, values, torch.tensor([1e-3]), [[7]], "last").replace(h, out)
    every = GraceAdaptor("m", keys, values, torch.tensor([1e-3]), [[7]], "all").replace(h, out)
    hit = torch.zeros(2, 5, dtype=torch.bool)
    hit[0, 2] = True
    assert torch.equal(last, torch.where(hit[..., None], values[0], out))
    hit[0, :2] = True                                                  # the prompt up to the hit
    assert torch.equal(every, torch.where(hit[..., None], values[0], out))


def test_save_load_round_trip(tiny_lm, tmp_path):
    g = grace(0.5, replacement="all")
    a = g.edit(tiny_lm, A).apply(tiny_lm.model)
    b = g.edit(tiny_lm, B)
    a.revert(tiny_lm.model)
    path = b.save(tmp_path / "grace.safetensors")
    again = GraceAdaptor.load(path)
    for name in ("keys", "values", "radii"):
        assert torch.equal(getattr(again, name), getattr(b, name))
    assert again.labels == b.labels and again.module == b.module and again.replacement == "all"
    assert again.meta == b.meta
    with b.applied(tiny_lm.model):
        expected = logits(tiny_lm, B.text)
    with again.applied(tiny_lm.model):
        assert torch.equal(logits(tiny_lm, B.text), expected)
    from kedit_ray.io import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a GRACE adaptor"):
        GraceAdaptor.load(tmp_path / "x.safetensors")


def test_registry_and_bad_settings(tiny_lm):
    assert isinstance(make_editor("grace", {"eps_init": 2.0, "replacement": "all"}), Grace)
    with pytest.raises(ValueError, match="replacement"):
        GraceParams(replacement="middle")
    with pytest.raises(ValueError, match="no measured ε_init"):
        Grace().edit(tiny_lm, A)


@pytest.mark.slow
def test_grace_50_sequential_zsre_edits_on_gemma(gemma):
    """The issue's bar: 50 zsRE edits applied one after another, ERR ≥ 0.9, TRR ≥ 0.95, ≤ 50 keys."""
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_sequential

    from conftest import data_file

    cases, _ = load_requests(data_file("zsre_mend_train-1k.json"), "zsre", limit=80)
    rows, summary = run_sequential(gemma, Grace(), cases[:50], 1, [10, 50], cases[50:], "grace", scorer="zsre",
                                   progress=False)
    last = summary["checkpoints"]["50"]
    print({t: {k: c.get(k) for k in ("ERR", "TRR", "paraphrase_score", "neighborhood_score", "ckpt_codebook_keys",
                                      "seconds_per_edit")} for t, c in summary["checkpoints"].items()})
    assert last["ERR"] >= 0.9 and last["TRR"] >= 0.95
    assert last["ckpt_codebook_keys"] <= 50

"""ROME on a tiny random Llama: the closed form, apply/revert, save/load; and on the real Gemma 3 270M."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import Delta, Rome, RomeParams
from kedit_ray.editors.rome import rank_one
from kedit_ray.editors.toolkit import ValueParams, compute_keys, context_prefixes, optimize_values
from kedit_ray.eval.counterfact import counterfact_scores, target_nll
from kedit_ray.models import weight_of
from kedit_ray.requests import EditRequest

from conftest import data_file

REQ = EditRequest(0, "Space Needle", "The {} is located in the city of", "Goa", "Seattle",
                  ["The Space Needle can be found in the city of"],
                  ["The Eiffel Tower is located in the city of"], ["Paris"])

# In a random tiny model attention dilutes a single position's influence, so the tiny tests put the
# subject last: its MLP output then feeds the prediction directly through the residual stream.
TAIL = EditRequest(1, "Space Needle", "the city of {}", "Goa", "Seattle")


def test_closed_form_maps_k_star_to_v_star(tiny_lm):
    """W' k* = v* = W k* + δ, in float64 from the same float64 W, k*, δ (errors ~ n κ(C) ε ≪ assert_close's 1e-7)."""
    layer = 1
    prefixes = context_prefixes(tiny_lm, 2, 4)
    k = compute_keys(tiny_lm, layer, [REQ], prefixes)                        # k*
    v0, delta, info = optimize_values(tiny_lm, layer, [REQ], prefixes, k, ValueParams(steps=5))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k.shape[1], k.shape[1] * 2, generator=g, dtype=torch.float64)
    w = weight_of(tiny_lm.model.get_submodule(tiny_lm.arch.name("mlp_out", layer))).double()
    k, d = k[0].double(), delta[0].double()
    for c in (None, a @ a.T / a.shape[1]):                                   # C = I and a real C
        dw = rank_one(k, d, c)
        torch.testing.assert_close((w + dw) @ k, w @ k + d)                  # W' k* = v*
        assert torch.linalg.matrix_rank(dw) == 1
    # the norm bound, ||δ|| ≤ 4 ||v0||, as the editor enforces it: with float32 norms, each within γ_n = n 2⁻²⁴
    assert d.norm() <= 4.0 * v0[0].double().norm() * (1 + (2 * len(d) + 4) * 2.0 ** -24)


def test_original_key_divides_by_the_bare_prompts_key(tiny_lm64, one_thread):
    """--rome-original-key (same_key=False): the same u and δ, but Λ divided by uᵀk_p, k_p the bare prompt's key, so
    the update maps k_p (not k*) to δ; with the default, k* is. ΔW is kept in float32: relative errors ~1e-7."""
    lm = tiny_lm64
    k_star = compute_keys(lm, 1, [TAIL], context_prefixes(lm, 2, 4))[0].double()
    k_p = compute_keys(lm, 1, [TAIL], [""])[0].double()
    dw = {}
    for same in (True, False):
        editor = Rome(RomeParams(layer=1, n_prefixes=2, prefix_len=4, use_cov=False, same_key=same))
        [dw[same]] = [d.double() for d in editor.edit(lm, TAIL).deltas.values()]
    delta = dw[True] @ k_star                                                  # δ = v* − W k*
    torch.testing.assert_close(dw[False] @ k_p, delta, rtol=1e-5, atol=1e-6 * delta.norm().item())
    assert (dw[False] @ k_star - delta).norm() > 1e-3 * delta.norm()            # k* ≠ k_p: the two updates differ


def test_rank_one_with_kept_keys_is_the_c_smallest_update_that_leaves_them(one_thread):
    """Float64, a random C: ΔW k* = δ and ΔW k_i = 0 for the kept keys; no other rank-one update δ u'ᵀ meeting both
    has a smaller u'ᵀ C u'; with no kept key it is ROME's u = C⁻¹k* / (k*ᵀC⁻¹k*). Errors are bounded by κ(AᵀC⁻¹A)
    times a few ulps, far below the 1e-8 asserted."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 5
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    c = a @ a.T / (2 * d)
    k, delta = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    kept = torch.randn(n, d, generator=g, dtype=torch.float64)
    dw = rank_one(k, delta, c, kept=kept)
    scale = dw.norm() * k.norm()
    assert (dw @ k - delta).norm() <= 1e-8 * scale and (dw @ kept.T).norm() <= 1e-8 * scale
    u = dw[0] / delta[0]
    basis = torch.linalg.svd(torch.cat([k[None], kept])).Vh[n + 1:]            # directions keeping uᵀk*, uᵀk_i
    for _ in range(5):
        other = u + torch.randn(d - n - 1, generator=g, dtype=torch.float64) @ basis
        assert other @ c @ other >= u @ c @ u * (1 - 1e-12)
    plain = torch.linalg.solve(c, k) / (k @ torch.linalg.solve(c, k))
    torch.testing.assert_close(rank_one(k, delta, c), torch.outer(delta, plain), rtol=1e-10, atol=0)


def test_keep_edits_leaves_the_committed_edits_keys(tiny_lm64, one_thread):
    """Sequentially (commit after each edit), a later update maps an earlier edit's k* and bare-prompt key k_p to ~0,
    so W' k_1 = v_1* holds after the second edit and the question's key is left alone; without keep_edits neither
    holds; reset() forgets the keys."""
    lm = tiny_lm64
    second = EditRequest(2, "Eiffel Tower", "the city of {}", "Rome", "Paris")
    prefixes = context_prefixes(lm, 2, 4)
    k1 = compute_keys(lm, 1, [TAIL], prefixes)[0].double()
    kp = compute_keys(lm, 1, [TAIL], [""])[0].double()
    moved = {}
    for keep in (True, False):
        editor = Rome(RomeParams(layer=1, n_prefixes=2, prefix_len=4, use_cov=False, keep_edits=keep))
        first = editor.edit(lm, TAIL)
        with first.applied(lm.model):
            editor.commit(lm, [TAIL])
            assert len(editor.kept) == (2 if keep else 0)
            [dw] = editor.edit(lm, second).deltas.values()
        moved[keep] = max(((dw.double() @ k).norm() / (dw.double().norm() * k.norm())).item() for k in (k1, kp))
        editor.reset()
        assert editor.kept == []
    assert moved[True] < 1e-5 < 1e-2 < moved[False]   # ΔW is kept in float32: d · 2⁻²⁴ ≈ 4e-6 at most


def test_edit_raises_target_and_reverts_bit_for_bit(tiny_lm, tmp_path):
    model = tiny_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll0 = target_nll(tiny_lm, [TAIL.text], [TAIL.target_new])
    delta = Rome(RomeParams(layer=1, n_prefixes=2, prefix_len=4)).edit(tiny_lm, TAIL)
    assert delta.meta["cov"].endswith(".safetensors") and delta.meta["layer"] == 1       # C, computed on first use
    with delta.applied(model):
        assert target_nll(tiny_lm, [TAIL.text], [TAIL.target_new]) < nll0 - 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    path = delta.save(tmp_path / "d.safetensors")
    again = Delta.load(path)
    assert again.meta == delta.meta
    for name, d in delta.deltas.items():
        assert torch.equal(again.deltas[name], d)
    with pytest.raises(RuntimeError):
        delta.revert(model)


def test_delta_refuses_wrong_shape_and_non_delta_files(tiny_lm, tmp_path):
    name = tiny_lm.arch.name("mlp_out", 0)
    with pytest.raises(ValueError, match="shape"):
        Delta({name: torch.zeros(3, 3)}).apply(tiny_lm.model)
    from kedit_ray.io import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a kedit delta"):
        Delta.load(tmp_path / "x.safetensors")


def test_missing_layer_is_a_clear_error(tiny_lm):
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        Rome(RomeParams(layer=9)).edit(tiny_lm, REQ)


def test_rome_on_gemma_demo_and_counterfact(gemma):
    """The demo edit moves Seattle to Goa, generalises, and keeps Paris. On 12 CounterFact cases, with the tests' empty
    stats cache, the first edit computes C from the shipped corpus and every edit uses it: ES 1 on each case, NS within
    0.1 of the unedited model's (it fell 1.00 → 0.67 with C = I on 12 unseen cases)."""
    from kedit_ray.datasets import load_requests

    rome = Rome()
    pre = counterfact_scores(gemma, REQ)
    delta = rome.edit(gemma, REQ)
    assert delta.meta["cov"].endswith(".safetensors")                     # C, not the identity
    with delta.applied(gemma.model):
        post = counterfact_scores(gemma, REQ)
    assert pre["efficacy_score"] == 0 and post["efficacy_score"] == 1 and post["paraphrase_score"] == 1
    assert post["neighborhood_score"] == 1
    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=12)
    ns, pre_ns = [], []
    for case in cases:
        pre_ns.append(counterfact_scores(gemma, case)["neighborhood_score"])
        with rome.edit(gemma, case).applied(gemma.model):
            post = counterfact_scores(gemma, case)
        assert post["efficacy_score"] == 1.0, case.case_id
        ns.append(post["neighborhood_score"])
    assert sum(ns) / len(ns) >= sum(pre_ns) / len(pre_ns) - 0.1


def test_rome_computes_c_on_first_use_from_the_shipped_corpus(tiny_lm, tmp_path, monkeypatch, capsys):
    """With an empty cache the first edit computes C from the shipped corpus (and says so), into exactly the file
    that `kedit stats` makes with its defaults; the next edit reads it; only --no-cov gives C = I."""
    from kedit_ray.stats import compute_stats

    monkeypatch.setenv("KEDIT_STATS_CACHE", str(tmp_path / "stats"))
    params = RomeParams(layer=1, n_prefixes=1, prefix_len=3, values=ValueParams(steps=2))
    first = Rome(params).edit(tiny_lm, TAIL).meta["cov"]
    assert "computing it once" in capsys.readouterr().err
    (info,) = compute_stats(tiny_lm, [1], progress=False)                    # `kedit stats`' defaults
    assert info["cached"] and first == info["path"] and info["documents"] == 1322
    assert Rome(params).edit(tiny_lm, TAIL).meta["cov"] == info["path"]
    assert "computing" not in capsys.readouterr().err
    params.use_cov = False
    assert Rome(params).edit(tiny_lm, TAIL).meta["cov"] == "identity"       # --no-cov

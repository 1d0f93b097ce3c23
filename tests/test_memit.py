"""MEMIT and AlphaEdit on a tiny random Llama (the solves, Algorithm 1's spread, the null-space projection);
MEMIT and AlphaEdit on the real Gemma 3 270M (slow)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit_ray.editors import AlphaEdit, AlphaEditParams, Memit, MemitParams
from kedit_ray.editors.alphaedit import null_projection
from kedit_ray.editors.memit import residual_at_subject, settle
from kedit_ray.editors.rome import rank_one
from kedit_ray.editors.toolkit import ValueParams, compute_keys, context_prefixes, optimize_values
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import weight_of
from kedit_ray.requests import EditRequest

from conftest import DATA, data_file

# subject last: in a random tiny model a subject's MLP output then feeds the prediction directly (see test_rome)
REQS = [EditRequest(1, "Space Needle", "the city of {}", "Goa", "Seattle"),
        EditRequest(2, "Eiffel Tower", "the city of {}", "Rome", "Paris"),
        EditRequest(3, "Danielle Darrieux", "the city of {}", "London", "Paris")]


def spd(d: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / a.shape[1]


def memit(layers, lam, **kw) -> Memit:
    return Memit(MemitParams.from_dict({"layers": layers, "mom2_update_weight": lam, "n_prefixes": 2,
                                        "prefix_len": 4, "values": {"steps": 8}, **kw}))


def test_batched_z_stops_each_request_where_it_would_stop_alone(tiny_lm64):
    """Each request of a batch leaves the optimisation once its own NLL is low enough, with the δ it gets alone.
    A float64 model: the batch's and the lone runs' gradients then agree to ~1e-15 before δ's float32 Adam steps,
    so the tolerances (1e-5 relative) stand far above what two correct arithmetics can make differ."""
    tiny_lm = tiny_lm64
    reqs = [REQS[0], EditRequest(4, "Eiffel Tower", "a view of the {}", "Rome", "Paris"),
            EditRequest(5, "Louvre", "the {}", "Berlin", "Paris")]
    layer, prefixes, hp = 1, context_prefixes(tiny_lm, 2, 4), ValueParams(steps=25, stop_nll=2.0)
    k = compute_keys(tiny_lm, layer, reqs, prefixes)
    _, delta, info = optimize_values(tiny_lm, layer, reqs, prefixes, k, hp)
    alone = [optimize_values(tiny_lm, layer, [r], prefixes, k[i:i + 1], hp) for i, r in enumerate(reqs)]
    assert len({a[2]["v_steps"] for a in alone}) == len(reqs)          # they do stop at different steps
    assert info["v_steps"] == max(a[2]["v_steps"] for a in alone) < hp.steps
    for i, (_, d, a) in enumerate(alone):
        torch.testing.assert_close(delta[i], d[0], rtol=1e-5, atol=1e-4)
        assert info["v_nll"][i] == pytest.approx(a["v_nll"][0], rel=1e-5) and a["v_nll"][0] < hp.stop_nll


def handed_to_solver(m: Memit, lm, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Records the (K, R) each solve of `m` is handed, in float64: the closed forms below start from the editor's
    own k* and r, so no float32 forward pass is run twice and compared."""
    solver, seen = m.solver(lm), []
    solve = solver.solve
    monkeypatch.setattr(solver, "solve", lambda layer, k, r: seen.append((k.double(), r.double())) or
                        solve(layer, k, r))
    return seen


def solve_error(*mats: torch.Tensor) -> float:
    """Relative error that float64 solves with these matrices may have: n κ(M) ε each (LU is backward stable)."""
    return sum(m.shape[0] * torch.linalg.cond(m).item() * torch.finfo(torch.float64).eps for m in mats)


STORED = 2.0 ** -23   # ΔW is solved in float64 and stored in float32: relative rounding ≤ 2⁻²⁴, with room


def close_in_norm(a: torch.Tensor, b: torch.Tensor, *mats: torch.Tensor) -> None:
    """‖a − b‖ ≤ (float32 storage + the solves' n κ ε)‖b‖, for a float32 `a` solved in float64 with `mats`."""
    bound = (STORED + solve_error(*mats)) * b.norm()
    assert (a.double() - b).norm() <= bound, ((a.double() - b).norm().item(), bound.item())


def test_memit_one_request_one_layer_is_romes_closed_form(tiny_lm, monkeypatch):
    """Same k*, same target residual r = z − h, same C: Δ_MEMIT = a/(λ+a) · Δ_ROME with a = k*ᵀC⁻¹k*.

    Float64 end to end from the k*, r the solver was handed, so the check holds on any correct arithmetic: the two
    sides differ by the float32 storage of ΔW and the solves' n κ ε. λ → 0 is λ = 1e-4 (λ/a ≈ 5e-7), not 1e-9: there
    κ(λC + k*k*ᵀ) was 1e12, so the solve's error (1e-6 here, another on another BLAS) was bounded only by 1e-2."""
    layer, req, c = 1, REQS[0], spd(64)
    name = tiny_lm.arch.name("mlp_out", layer)
    for lam in (2.0, 1e-4):
        m = memit([layer], lam)
        m.use_covariances(tiny_lm, {layer: c})
        seen = handed_to_solver(m, tiny_lm, monkeypatch)
        dw = m.edit(tiny_lm, req).deltas[name].double()
        (k, r), = seen
        k, r = k[0], r[0]                                                               # k*, r = z − h
        rome = rank_one(k, r, c)
        a = k @ torch.linalg.solve(c, k)
        close_in_norm(dw, a / (lam + a) * rome, c, lam * c + torch.outer(k, k))
        tol = STORED + solve_error(c, lam * c + torch.outer(k, k))
    assert lam / a < 1e-6 and (dw - rome).norm() <= (lam / a + tol) * rome.norm()      # λ → 0: ROME itself


def test_memit_z_at_mlp_out_writes_v_star(tiny_lm, monkeypatch):
    """z_module "mlp_out": z is ROME's v* = W k* + δ, so with λ → 0 the update is ROME's rank one and W' k* = z,
    i.e. (W' − W) k* = r = z − W k*. Float64 from the solver's own k*, r, as above; W' = W + ΔW is rounded to
    float32 when applied (2⁻²⁴ |W'| |k*|)."""
    layer, req, c, lam = 1, REQS[0], spd(64), 1e-4
    m = memit([layer], lam, z_module="mlp_out")
    m.use_covariances(tiny_lm, {layer: c})
    seen = handed_to_solver(m, tiny_lm, monkeypatch)
    delta = m.edit(tiny_lm, req)
    name = tiny_lm.arch.name("mlp_out", layer)
    (k, r), = seen
    k, r = k[0], r[0]                                                                   # k*, z − W k*
    rome = rank_one(k, r, c)
    a = k @ torch.linalg.solve(c, k)
    tol = lam / a + STORED + solve_error(c, lam * c + torch.outer(k, k))
    assert (delta.deltas[name].double() - rome).norm() <= tol * rome.norm()
    w = weight_of(tiny_lm.model.get_submodule(name)).double()
    with delta.applied(tiny_lm.model):
        w_edited = weight_of(tiny_lm.model.get_submodule(name)).double()
    bound = 2.0 ** -24 * (w_edited.abs() @ k.abs()) + tol * rome.norm() * k.norm() + lam / a * r.abs()
    assert ((w_edited - w) @ k - r).abs().le(bound).all()
    assert delta.meta["params"]["z_module"] == "mlp_out"


def test_memit_settles_per_model_defaults(tiny_lm):
    """What the parameters leave open comes from the model's measured defaults, else the paper's."""
    assert settle(MemitParams(), tiny_lm).z_module == "layer"
    assert settle(MemitParams(), tiny_lm).z_batch == 1                   # the CPU: one request at a time
    assert settle(MemitParams(z_batch=8), tiny_lm).z_batch == 8
    hp = settle(MemitParams(), dataclasses.replace(tiny_lm, name="gemma-3-270m"))
    assert (hp.layers, hp.z_module, hp.values.clamp_norm, hp.mom2_update_weight) == ([2], "mlp_out", 1.0, 200.0)
    hp = settle(MemitParams.from_dict({"layers": [1, 2], "z_module": "layer", "values": {"clamp_norm": 0.5}}),
                dataclasses.replace(tiny_lm, name="gemma-3-270m"))
    assert (hp.layers, hp.z_module, hp.values.clamp_norm) == ([1, 2], "layer", 0.5)
    assert hp.mom2_update_weight == 200.0
    hp = settle(MemitParams(layers=[1, 2]), dataclasses.replace(tiny_lm, name="gemma-3-270m"))   # spread: the paper's z
    assert (hp.z_module, hp.values.clamp_norm) == ("layer", 0.75)
    with pytest.raises(ValueError, match="one layer"):
        settle(MemitParams(layers=[1, 2], z_module="mlp_out"), tiny_lm)
    with pytest.raises(ValueError, match="at least one layer"):
        settle(MemitParams(layers=[]), tiny_lm)
    with pytest.raises(ValueError, match="z_module must be"):
        settle(MemitParams(z_module="attn"), tiny_lm)


def test_memit_spread_reaches_z_on_every_request(tiny_lm64):
    """Algorithm 1 with λ → 0 and keys recomputed on the model edited so far: after the last layer, the residual
    at each subject is z_i exactly (no prefixes, so k* is the bare prompt's key), and every target gains.
    A float64 model: what is left is the editor's float32 storage of z, K and ΔW (2⁻²⁴ relative), far below 1e-3."""
    tiny_lm = tiny_lm64
    m = memit([1, 2], 1e-7, n_prefixes=0)
    z, _ = m.targets(tiny_lm, REQS)
    nll0 = target_nll(tiny_lm, [r.text for r in REQS], [r.target_new for r in REQS])
    delta = m.edit_batch(tiny_lm, REQS)
    assert set(delta.deltas) == {tiny_lm.arch.name("mlp_out", 1), tiny_lm.arch.name("mlp_out", 2)}
    assert all(n > 0 for n in delta.norms().values())                                  # both layers share R
    with delta.applied(tiny_lm.model):
        h = residual_at_subject(tiny_lm, 2, REQS)
        nll = target_nll(tiny_lm, [r.text for r in REQS], [r.target_new for r in REQS])
    torch.testing.assert_close(h, z.double(), rtol=1e-3, atol=1e-3)
    assert (nll < nll0 - 0.5).all(), (nll0, nll)
    assert delta.meta["layers"] == [1, 2] and delta.meta["case_ids"] == [1, 2, 3]


def test_alphaedit_leaves_protected_keys_unchanged(tiny_lm):
    """Δ = (…) P: every key outside the null space of C (eigenvalue ≥ threshold) maps to the same output."""
    d, layers = 64, [1, 2]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    evals = torch.cat([torch.full((40,), 1.0), torch.full((24,), 1e-3)]).double()                 # 24-dim null space
    c = q @ torch.diag(evals) @ q.T
    p = null_projection(c, d, 2e-2)
    torch.testing.assert_close(p, q[:, 40:] @ q[:, 40:].T)
    editor = AlphaEdit(AlphaEditParams(layers=layers, n_prefixes=2, prefix_len=4))
    editor.hp.values.steps = 8
    editor.use_covariances(tiny_lm, {layer: c for layer in layers})
    delta = editor.edit_batch(tiny_lm, REQS)
    assert delta.meta["null_dims"] == {1: 24, 2: 24}
    protected = q[:, :40]                                                              # C's large directions
    for name, dw in delta.deltas.items():
        dw = dw.double()
        assert dw.norm() > 1e-3
        assert (dw @ protected).norm() <= STORED * dw.norm()        # ΔW Q = 0 in float64; ΔW stored in float32
    name = tiny_lm.arch.name("mlp_out", 1)
    w = weight_of(tiny_lm.model.get_submodule(name)).double()
    with delta.applied(tiny_lm.model):
        w_edited = weight_of(tiny_lm.model.get_submodule(name)).double()
    # W' = W + ΔW rounded to float32: each of ΔW and W' off by ≤ 2⁻²⁴ of itself, elementwise
    bound = STORED * (w_edited.abs() + delta.deltas[name].double().abs()) @ protected.abs()
    assert ((w_edited - w) @ protected).abs().le(bound).all()
    # sequential use: the kept keys enter the next solve as K_p K_pᵀ
    delta.apply(tiny_lm.model)
    editor.commit(tiny_lm, REQS)
    solver = editor.solver(tiny_lm)
    assert all(torch.linalg.matrix_rank(solver.kp[layer]) == len(REQS) for layer in layers)
    editor.reset()
    assert all(solver.kp[layer].abs().sum() == 0 for layer in layers)


def test_alphaedit_without_stats_is_unprojected(tiny_lm):
    assert torch.equal(null_projection(None, 5, 2e-2), torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        AlphaEdit(AlphaEditParams(layers=[1, 9])).edit_batch(tiny_lm, REQS)
    with pytest.raises(ValueError, match="at least one request"):
        Memit(MemitParams(layers=[1])).edit_batch(tiny_lm, [])


# ------------------------------------------------------------------------------------ the real model

# C from 2000 WikiText paragraphs of ≤ 256 tokens: what this CPU could afford (and the cached stats of the figures)
STATS = {"stats_corpus": str(data_file("wiki.test.raw")) if (DATA / "wiki.test.raw").exists() else None,
         "stats_samples": 2000, "stats_max_len": 256}


@pytest.mark.slow
def test_memit_100_edits_in_one_batch_on_gemma(gemma):
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_batch

    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=100)
    editor = Memit(MemitParams(**STATS))
    rows = run_batch(gemma, editor, cases, batch_size=100, method="memit")
    es = sum(r["efficacy_score"] for r in rows) / len(rows)
    ns = sum(r["neighborhood_score"] for r in rows) / len(rows)
    pre_ns = sum(r["pre_neighborhood_score"] for r in rows) / len(rows)
    print(f"MEMIT 100 in one batch: ES {es:.3f}, NS {ns:.3f} (pre {pre_ns:.3f})")
    assert es >= 0.9


@pytest.mark.slow
def test_alphaedit_sequential_10_batches_of_10_on_gemma(gemma):
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_sequential

    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=110)
    editor = AlphaEdit(AlphaEditParams(**STATS))
    rows, summary = run_sequential(gemma, editor, cases[:100], batch_size=10, checkpoints=[100], held_out=cases[100:],
                                   method="alphaedit")
    final = summary["checkpoints"]["100"]
    print(f"AlphaEdit 10×10 sequential: {final}")
    assert final["efficacy_score"] >= 0.8

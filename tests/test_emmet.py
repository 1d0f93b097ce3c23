"""EMMET: the equality-constrained solve in float64 on random matrices, and ten CounterFact edits in one batch on
the real Gemma 3 270M (slow). One request equal to ROME's closed form: tests/test_families.py, on every family."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import Emmet, EmmetParams
from kedit_ray.editors.emmet import EmmetSolver

from conftest import data_file
from test_memit import STATS, solve_error, spd


PRODUCTS = 4 * 48 * torch.finfo(torch.float64).eps   # the float64 products of length ≤ d around the solves


def batch(n: int, d: int = 48, d_out: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d_out, generator=g, dtype=torch.float64)


def test_without_the_ridge_every_edited_key_lands_on_its_value_at_the_least_c_norm():
    """λ_E = 0: Δ k_i = r_i for every request (the equality constraints), and Δ is the C-least such update: its rows
    lie in the span of C⁻¹K, so Δ C v = 0 for every v ⊥ K. Bounded by the solves' n κ ε."""
    c, (k, r) = spd(48), batch(5)
    for lam in (1.0, 250.0):
        dw = EmmetSolver({0: c}, lam, {}, 0.0).solve(0, k, r)
        tol = solve_error(lam * c, k @ torch.linalg.solve(lam * c, k.T)) + PRODUCTS
        assert (dw @ k.T - r.T).norm() <= tol * r.norm()
        v = torch.linalg.svd(k, full_matrices=True).Vh[5:].T          # an orthonormal basis of K's complement
        assert (dw @ c @ v).norm() <= tol * dw.norm() * c.norm()


def test_the_ridge_is_the_papers_shrinkage_and_one_request_ignores_it():
    """Δ K = R (I − λ_E D⁻¹) with D = Kᵀ(λC)⁻¹K for a batch; with one request λ_E is not added (the paper's code)."""
    c, (k, r) = spd(48), batch(4)
    dw = EmmetSolver({0: c}, 3.0, {}, 0.1).solve(0, k, r)
    d = k @ torch.linalg.solve(3.0 * c, k.T)
    want = r.T @ (torch.eye(4, dtype=torch.float64) - 0.1 * torch.linalg.inv(d + 0.1 * torch.eye(4, dtype=d.dtype)))
    assert (dw @ k.T - want).norm() <= (solve_error(3.0 * c, d, d + 0.1 * torch.eye(4, dtype=d.dtype)) + PRODUCTS) \
        * r.norm()
    one = EmmetSolver({0: c}, 3.0, {}, 0.1).solve(0, k[:1], r[:1])
    assert (one @ k[0] - r[0]).norm() <= (solve_error(3.0 * c) + PRODUCTS) * r[0].norm()


def test_emmet_takes_its_options_and_keeps_no_state():
    e = Emmet(EmmetParams.from_dict({"layers": [1], "emmet_lambda": 0.5, "values": {"steps": 3}}))
    assert (e.hp.emmet_lambda, e.hp.values.steps, e.kind, e.batched) == (0.5, 3, "delta", True)
    with pytest.raises(ValueError, match="no state"):
        EmmetSolver({}, 1.0, {}, 0.1).load_state({"kp/1": torch.zeros(1)})


@pytest.mark.slow
def test_emmet_10_edits_in_one_batch_on_gemma(gemma):
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_batch

    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=10)
    rows = run_batch(gemma, Emmet(EmmetParams(**STATS)), cases, batch_size=10, method="emmet")
    es = sum(r["efficacy_score"] for r in rows) / len(rows)
    ns = sum(r["neighborhood_score"] for r in rows) / len(rows)
    print(f"EMMET 10 in one batch: ES {es:.3f}, NS {ns:.3f}")
    assert es >= 0.8

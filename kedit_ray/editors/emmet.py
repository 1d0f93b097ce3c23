"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): MEMIT's batch under equality constraints.

MEMIT asks the edited keys to land near their values (a least-squares term beside the preservation term);
EMMET demands it: per layer, with K = [k_i] the new keys (columns), R their residuals and C = E[k kᵀ],

    min_Δ ‖Δ K₀‖²  s.t.  (W + Δ) k_i = W k_i + r_i   ⇒   Δ = R D⁻¹ Kᵀ (λC)⁻¹,   D = Kᵀ (λC)⁻¹ K + λ_E I

in float64, with λ_E I (the paper's 0.1, `emmet_lambda`) added only for a batch of 2 or more, against an
ill-conditioned D. With one request this is ROME's closed form, Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k), for any λ (tested).
Keys, z, the residual spread over layers and the workers' shares are MEMIT's (toolkit, memit.spread); only the
solve differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit_ray.editors.contract import option
from kedit_ray.editors.memit import RULES, Memit, MemitDefaults, MemitParams
from kedit_ray.options import fraction

MEASURED = MemitDefaults("emmet", RULES)   # kedit_ray/defaults/<model>.toml, [emmet]: MEMIT's settings


@dataclass
class EmmetParams(MemitParams):
    emmet_lambda: float = option(0.1, "λ_E, added to D = Kᵀ(λC)⁻¹K for a batch of 2 or more against an "
                                 "ill-conditioned D", parse=fraction)


class EmmetSolver:
    """Δ = R D⁻¹ Kᵀ (λC)⁻¹ per layer, float64. `covs[layer]` is C (None: I)."""

    preserves = False

    def __init__(self, covs: dict[int, torch.Tensor | None], lam: float, labels: dict[int, str], ridge: float):
        self.covs, self.lam, self.labels, self.ridge = covs, lam, labels, ridge

    def solve(self, layer: int, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """k: [n, d_in] keys, r: [n, d_out] residuals → ΔW [d_out, d_in]."""
        k, r = k.double(), r.double()
        c = self.covs[layer]
        c = torch.eye(k.shape[1], dtype=torch.float64) if c is None else c.double().to(k.device)
        ck = torch.linalg.solve(self.lam * c, k.T)                     # (λC)⁻¹ K   [d_in, n]
        d = k @ ck                                                     # D = Kᵀ (λC)⁻¹ K   [n, n]
        if len(k) > 1:
            d = d + self.ridge * torch.eye(len(k), dtype=d.dtype, device=d.device)
        return r.T @ torch.linalg.solve(d, ck.T)                       # R D⁻¹ Kᵀ (λC)⁻¹, C symmetric

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"EMMET's solver keeps no state, got {sorted(state)}")


class Emmet(Memit):
    name = "emmet"

    def __init__(self, params: EmmetParams | None = None):
        super().__init__(params or EmmetParams())

    def make_solver(self, dims: dict[int, int], covs: dict, labels: dict, lam: float) -> EmmetSolver:
        return EmmetSolver(covs, lam, labels, self.hp.emmet_lambda)

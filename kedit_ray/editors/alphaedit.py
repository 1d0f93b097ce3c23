"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected on the null space of the preserved keys.

P projects on the null space of K₀ (the keys of the text the model should keep answering as before): with
C = E[k kᵀ] ∝ K₀K₀ᵀ (the layer stats), P = U Uᵀ over the eigenvectors U of C whose eigenvalues fall below
`nullspace_threshold` (the paper's 2e-2). Then, per layer, with K₁ the new keys, R the residual (spread over the
layers as in MEMIT) and K_p the keys of the earlier edits (sequential use), the paper's eq. 15:

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹ P        (α = 1 in the paper; `l2` here)

computed in float64 as Δᵀ = (P (K₁K₁ᵀ + K_pK_pᵀ) + α I)⁻¹ P K₁ Rᵀ (push-through: the same matrix). Since Δ ends
in P, Δ k₀ = 0 for every preserved key (P k₀ = 0): the outputs at those keys are untouched.

Without layer stats there is no K₀ to preserve: P = I. The editor remembers K_p K_pᵀ per layer across batches:
the sequential protocol calls `commit(lm, requests)` after a batch is applied for good, which adds the keys of
those requests, recomputed on the edited model (as the paper's code does); `reset()` forgets them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit_ray.editors.contract import option
from kedit_ray.editors.memit import RULES, Memit, MemitDefaults, MemitParams
from kedit_ray.editors.toolkit import compute_keys
from kedit_ray.models import LM
from kedit_ray.options import fraction
from kedit_ray.requests import EditRequest

# MEMIT's settings, measured per model in kedit_ray/defaults/<model>.toml under [alphaedit] (Memit.params reads the
# table its editor's name names)
MEASURED = MemitDefaults("alphaedit", RULES)


@dataclass
class AlphaEditParams(MemitParams):
    nullspace_threshold: float = option(2e-2, "eigenvalues of C below this span the preserved null space",
                                        parse=fraction)
    l2: float = option(1.0, "α, the weight of ||ΔW||² in AlphaEdit's solve", parse=fraction)


def null_projection(c: torch.Tensor | None, dim: int, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors of C with eigenvalue < threshold (float64); I without C."""
    if c is None:
        return torch.eye(dim, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(c.double())
    u = evecs[:, evals < threshold]
    return u @ u.T


class AlphaEditSolver:
    preserves = True

    def __init__(self, projections: dict[int, torch.Tensor], l2: float, labels: dict[int, str]):
        self.p, self.l2, self.labels = projections, l2, labels
        self.kp = {layer: torch.zeros_like(p) for layer, p in projections.items()}   # K_p K_pᵀ

    def solve(self, layer: int, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """k: [n, d_in] keys, r: [n, d_out] residuals → ΔW [d_out, d_in]."""
        p = self.p[layer].to(k.device)
        k, r = k.double(), r.double()
        a = p @ (k.T @ k + self.kp[layer].to(k.device)) + self.l2 * torch.eye(k.shape[1], dtype=k.dtype,
                                                                                device=k.device)
        return torch.linalg.solve(a, p @ k.T @ r).T

    def preserve(self, layer: int, kkt: torch.Tensor) -> None:
        """K_p K_pᵀ += K Kᵀ for the keys of edits applied for good."""
        self.kp[layer] += kkt.double().to(self.kp[layer].device)

    def state(self) -> dict[str, torch.Tensor]:
        """K_p K_pᵀ per layer, the keys of the edits applied for good (to resume a sequential run)."""
        return {f"kp/{layer}": kkt for layer, kkt in self.kp.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, kkt in state.items():
            layer = int(name.removeprefix("kp/"))
            if layer not in self.kp or kkt.shape != self.kp[layer].shape:
                raise ValueError(f"solver state {name} {tuple(kkt.shape)} does not fit the edited layers "
                                 f"{sorted(self.kp)}")
            self.kp[layer] = kkt.double()

    def null_dims(self) -> dict[int, int]:
        return {layer: round(torch.trace(p).item()) for layer, p in self.p.items()}


class AlphaEdit(Memit):
    name = "alphaedit"

    def __init__(self, params: AlphaEditParams | None = None):
        super().__init__(params or AlphaEditParams())

    def make_solver(self, dims: dict[int, int], covs: dict, labels: dict, lam: float) -> AlphaEditSolver:
        """λ is MEMIT's; AlphaEdit's solve has P and α in its place."""
        projections = {layer: null_projection(c, dims[layer], self.hp.nullspace_threshold) for layer, c in covs.items()}
        return AlphaEditSolver(projections, self.hp.l2, labels)

    def extra_meta(self, lm: LM) -> dict:
        return {"null_dims": self.solver(lm).null_dims()}

    def kept_keys(self, lm: LM, requests: list[EditRequest]) -> dict[int, torch.Tensor]:
        """K Kᵀ per edited layer for these requests, on the model as it is now (float64, CPU)."""
        out = {}
        for layer in self.layers(lm):
            k = compute_keys(lm, layer, requests, self.prefixes(lm)).double().cpu()
            out[layer] = k.T @ k
        return out

    def commit(self, lm: LM, requests: list[EditRequest]) -> None:
        """These requests' edits are applied for good: keep their keys (on the edited model) as K_p."""
        solver = self.solver(lm)
        for layer, kkt in self.kept_keys(lm, requests).items():
            solver.preserve(layer, kkt)

    def reset(self) -> None:
        """Forget the keys of earlier edits (K_p = 0)."""
        for solver in self._solvers.values():
            solver.kp = {layer: torch.zeros_like(p) for layer, p in solver.p.items()}

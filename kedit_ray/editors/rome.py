"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

    W' = W + Λ (C⁻¹ k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

so that W' k* = v*. C = E[k kᵀ] over a text corpus (the layer statistics), or I without them.

k* is the key averaged over the prompt and its context prefixes, the same in Λ's numerator (δ = v* − W k*), its
denominator and u: r-ROME's fix (Gupta et al. 2024, arXiv 2403.07175). ROME's original code divides by the bare
prompt's key k_p instead, (C⁻¹ k*)ᵀ k_p, which r-ROME finds behind the "disabling edits" that collapse sequential
editing; `same_key=False` reproduces it for comparison (README, "Sequential ROME").

keep_edits (sequential editing): the update must also leave the keys K = [k_1 … k_n] of the edits committed before
unchanged, ΔW K = 0, so W' k_i = v_i* still holds for them: each edit's k* and its bare prompt's key k_p (the one
the question is asked with). The C-smallest such rank-one update is ΔW = Λ uᵀ with

    u = C⁻¹ A (Aᵀ C⁻¹ A)⁻¹ e₁,   A = [k*, k_1 … k_n]   (uᵀ k* = 1, uᵀ k_i = 0),

which is u = C⁻¹ k* / (k*ᵀ C⁻¹ k*) when there are none: ROME's own update.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import option
from kedit_ray.editors.covariance import CovParams, UsesCovariance
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.toolkit import PAPER_CLAMP, ValueParams, compute_keys, context_prefixes, optimize_values
from kedit_ray.models import LM, check_layer
from kedit_ray.options import count, positive
from kedit_ray.requests import EditRequest

# Measured per model in kedit_ray/defaults/<model>.toml, [rome]; without a value, the rules here.
MEASURED = Measured("rome", {"layer": Rule(int, lambda n: n // 3, "a third of the depth"),
                             "values.clamp_norm": Rule(float, PAPER_CLAMP, "the paper's")})


@dataclass
class RomeParams(CovParams):           # C: the layer statistics (covariance.py), computed on first use
    layer: int | None = option(None, "the layer whose MLP output projection is edited (default: measured per "
                               "model, else a third of the way up)", parse=int)
    n_prefixes: int = option(5, "generated context prefixes for k* and v* (plus the bare prompt)",
                             flag="--context-prefixes", parse=count)
    prefix_len: int = option(10, "tokens per context prefix", parse=positive)
    same_key: bool = option(True, "divide by the bare prompt's key as ROME's original code does, not by the "
                            "averaged k* (r-ROME's fix, the default)", flag="--rome-original-key", sets=False)
    keep_edits: bool = option(False, "sequential protocol: each update leaves the keys of the edits made before "
                              "unchanged (ΔW k_i = 0), so they stay edited", flag="--rome-keep-edits", sets=True)
    values: ValueParams = field(default_factory=ValueParams)

    @classmethod
    def from_dict(cls, d: dict) -> RomeParams:
        d = dict(d)
        values = ValueParams(**d.pop("values", {}))
        return cls(**d, values=values)


def default_layer(lm: LM) -> int:
    return MEASURED.value(lm, "layer")


def value_params(lm: LM, hp: ValueParams) -> ValueParams:
    """hp with the norm bound resolved: the one given, else the per-model default, else the paper's."""
    if hp.clamp_norm is not None:
        return hp
    return replace(hp, clamp_norm=MEASURED.value(lm, "values.clamp_norm"))


class Rome(UsesCovariance):
    name = "rome"

    def __init__(self, params: RomeParams | None = None):
        self.hp = params or RomeParams()
        self.kept: list[torch.Tensor] = []   # keep_edits: k* and k_p of the committed edits, float64 on the CPU

    def prefixes(self, lm: LM) -> list[str]:
        """The context prefixes, generated once per model (a worker asks on the unedited model, so a resumed
        sequential run gets the same ones)."""
        return context_prefixes(lm, self.hp.n_prefixes, self.hp.prefix_len)

    def prepare(self, lm: LM) -> None:
        self.prefixes(lm)

    def layer(self, lm: LM) -> int:
        return check_layer(lm.model, self.hp.layer if self.hp.layer is not None else default_layer(lm))

    def cov_layers(self, lm: LM) -> list[int]:
        return [self.layer(lm)]

    def edit(self, lm: LM, request: EditRequest) -> Delta:
        layer = self.layer(lm)
        timings = {}
        t0 = time.perf_counter()
        covs, labels = self.covariances(lm)
        c, c_label = covs[layer], labels[layer]                                  # C
        prefixes = self.prefixes(lm)
        t1 = time.perf_counter()
        k = compute_keys(lm, layer, [request], prefixes)[0]                       # k*
        k_den = k if self.hp.same_key else compute_keys(lm, layer, [request], [""])[0]   # k* or k_p
        t2 = time.perf_counter()
        values = value_params(lm, self.hp.values)
        v0, delta, info = optimize_values(lm, layer, [request], prefixes, k[None], values)
        t3 = time.perf_counter()
        kept = torch.stack(self.kept).to(k.device) if self.kept else None
        dw = rank_one(k.double(), delta[0].double(), None if c is None else c.to(k.device), k_den.double(), kept)
        t4 = time.perf_counter()
        timings = {"setup_s": t1 - t0, "key_s": t2 - t1, "value_s": t3 - t2, "solve_s": t4 - t3}
        name = lm.arch.name("mlp_out", layer)
        return Delta({name: dw.float()}, {   # float32; Delta.apply casts W + ΔW once to W's dtype
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer, "cov": c_label,
            "case_id": request.case_id, "kept_keys": len(self.kept),
            "params": {**asdict(self.hp), "values": asdict(values)}, **info, **timings})

    def commit(self, lm: LM, requests: list[EditRequest]) -> None:
        """Sequential protocol: these requests' edits are applied for good; with keep_edits, later updates leave
        their keys alone. (Keys at the edited layer do not depend on its down_proj, so the edited model gives them.)"""
        if self.hp.keep_edits:
            layer = self.layer(lm)
            for prefixes in (self.prefixes(lm), [""]):                          # k*, and k_p: the bare prompt's
                self.kept += list(compute_keys(lm, layer, requests, prefixes).double().cpu())

    def reset(self) -> None:
        """Forget the committed edits' keys."""
        self.kept.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """What a resumed sequential run needs besides the weights: the committed keys ({} when none)."""
        return {"kept": torch.stack(self.kept)} if self.kept else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.kept = list(state["kept"].double()) if "kept" in state else []


def rank_one(k: torch.Tensor, lam_dir: torch.Tensor, c: torch.Tensor | None, k_den: torch.Tensor | None = None,
             kept: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = Λ uᵀ, Λ = δ / (uᵀ k*) with δ = v* − W k*, and u = C⁻¹ k* or, with `kept` keys [n, d] to leave unchanged,
    C⁻¹ A (Aᵀ C⁻¹ A)⁻¹ e₁ for A = [k*, kept] (the module docstring). `k_den` replaces k* in Λ's denominator (ROME's
    original code: the bare prompt's key). In float64."""
    a = k[:, None] if kept is None else torch.cat([k[:, None], kept.T], 1)
    ci_a = a if c is None else torch.linalg.solve(c.double(), a)                  # C⁻¹ A
    e1 = torch.zeros(a.shape[1], 1, dtype=a.dtype, device=a.device)
    e1[0] = 1
    u = (ci_a @ torch.linalg.lstsq(a.T @ ci_a, e1).solution)[:, 0]
    lam = lam_dir / (u @ (k if k_den is None else k_den))
    return torch.outer(lam, u)

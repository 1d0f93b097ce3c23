"""UltraEdit (Gu et al. 2025, arXiv 2505.14679): lifelong editing with no optimisation loop, no covariance
statistics and no subject position.

One turn edits a batch of requests. For each edited linear map W [out, in]:
    1. one forward and one backward pass of Σ_requests NLL(o* | prompt) (each request's mean over its tokens)
       captures, at every position that predicts an answer token, the input k and the output gradient g;
    2. a lifelong normaliser (count, mean, M₂ of [k ‖ g] per module shape, kept across turns) takes this turn's
       rows, merged by the parallel-variance formula:  M₂ = M₂ₐ + M₂_b + δ² nₐ n_b / n,  δ = mean_b − meanₐ;
    3. [k̂ ‖ ĝ] = ([k ‖ g] − mean) / (std + ε),  std = √(M₂ / (n − 1)),  and the pseudo-values
       v = −η ‖k̂‖² ĝ  (a step down the normalised gradient, scaled by the normalised key's energy);
    4. Δ solves the ridge system (KᵀK + I) Δ = KᵀV in float64 over this turn's rows (K the raw keys), and
       ΔW = Δᵀ, an ordinary Delta.

The normaliser is the editor's only state: `edit_batch` computes a turn with it and keeps the merged
statistics aside; `commit` (the sequential protocol's call once the turn is applied for good) makes them the
normaliser's. So a batch-protocol batch, never committed, sees a fresh normaliser, as the paper's single turn.
`state()` / `load_state()` carry it (float64) with a run's state, so a cut-short run resumes bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.learned import base_pass, build_rows, shapes_of
from kedit_ray.editors.toolkit import band_modules
from kedit_ray.models import LM
from kedit_ray.options import layers as layers_arg
from kedit_ray.options import names, positive_float
from kedit_ray.requests import EditRequest

EPS = torch.finfo(torch.float32).eps   # the reference code's ε in (x − mean) / (std + ε)


@dataclass
class UltraEditParams:
    layers: list[int] | None = option(None, "layers to edit, e.g. 12-16 (default: measured per model, else the "
                                      "band from 2/3 to 9/10 of the way up)", parse=layers_arg)
    modules: list[str] | None = option(None, "the projections edited in each layer, Arch fields (mlp_in, "
                                       "mlp_out) or templates such as 'model.layers.{}.mlp.gate_proj', "
                                       "comma-separated (default: measured per model, else mlp_in)", parse=names)
    eta: float | None = option(None, "η, the step of the pseudo-values v = −η‖k̂‖²ĝ (default: measured per "
                               "model, else 3e-5)", parse=positive_float)

    @classmethod
    def from_dict(cls, d: dict) -> UltraEditParams:
        return cls(**d)


@dataclass
class Moments:
    """count, mean and M₂ (Σ (x − mean)²) of the rows seen, per column, float64."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        x = x.double()
        mean = x.mean(0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows (Chan et al.'s parallel formula)."""
        n = self.n + other.n
        d = other.mean - self.mean
        return Moments(n, self.mean + d * other.n / n, self.m2 + other.m2 + d ** 2 * self.n * other.n / n)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / max(self.n - 1, 1)).sqrt()
        return (x.double() - self.mean) / (std + EPS)


def ridge(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ΔW [out, in] with Δ = ΔWᵀ solving (KᵀK + I) Δ = KᵀV, in float64. k: [N, in], v: [N, out]."""
    k, v = k.double(), v.double()
    a = k.T @ k + torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    return torch.linalg.solve(a, k.T @ v).T


def default_layers(n_layers: int) -> list[int]:
    """The band from 2/3 to 9/10 of the way up (one layer at least)."""
    low = round(n_layers * 2 / 3)
    return list(range(low, max(round(n_layers * 0.9), low + 1)))


# Measured per model in kedit_ray/defaults/<model>.toml, [ultraedit]; without a value, the rules here.
MEASURED = Measured("ultraedit", {"layers": Rule(list[int], default_layers, "the band from 2/3 to 9/10 of the depth"),
                                  "modules": Rule(list[str], ["mlp_in"]), "eta": Rule(float, 3e-5)})


class UltraEdit(Editor):
    name = "ultraedit"
    batched = True

    def __init__(self, params: UltraEditParams | None = None):
        self.hp = params or UltraEditParams()
        self.norm: dict[str, Moments] = {}              # per module shape "inxout": the lifelong normaliser
        self._pending: tuple[list[int], dict[str, Moments]] | None = None   # a turn's statistics, until commit

    def plan(self, lm: LM) -> tuple[list[int], list[str]]:
        """The edited layers and modules, lowest layer first."""
        layers = sorted(self.hp.layers if self.hp.layers is not None else MEASURED.value(lm, "layers"))
        modules = self.hp.modules if self.hp.modules is not None else MEASURED.value(lm, "modules")
        return layers, band_modules(lm, "UltraEdit", layers, modules, "--modules")

    def eta(self, lm: LM) -> float:
        return self.hp.eta if self.hp.eta is not None else MEASURED.value(lm, "eta")

    def edit_batch(self, lm: LM, requests: list[EditRequest]) -> Delta:
        """One turn: ΔW for every edited module from one forward/backward pass over `requests`."""
        if not requests:
            raise ValueError("edit_batch needs at least one request")
        t0 = time.perf_counter()
        (layers, names), eta = self.plan(lm), self.eta(lm)
        rows = build_rows(lm, requests, paraphrases=False)
        grads = base_pass(lm, names, layers[0], rows)
        r, c = rows.edit[0].to(rows.ids.device), rows.edit[1].to(rows.ids.device)   # answer-predicting positions
        t1 = time.perf_counter()
        shapes = shapes_of(lm, names)
        kg = {n: torch.cat([grads.u[n][r, c], grads.delta[n][r, c]], -1).double().cpu() for n in names}
        merged = dict(self.norm)
        for n in names:                                  # 2. the lifelong normaliser takes this turn's rows
            key = shape_key(shapes[n])
            turn = Moments.of(kg[n])
            merged[key] = merged[key].merge(turn) if key in merged else turn
        deltas = {}
        for n in names:
            d_in = shapes[n][1]
            hat = merged[shape_key(shapes[n])].normalise(kg[n])
            k_hat, g_hat = hat[:, :d_in], hat[:, d_in:]
            v = -eta * (k_hat ** 2).sum(-1, keepdim=True) * g_hat      # 3. v = −η ‖k̂‖² ĝ
            deltas[n] = ridge(kg[n][:, :d_in], v).float()            # 4. (KᵀK + I) Δ = KᵀV
        self._pending = ([q.case_id for q in requests], merged)
        return Delta(deltas, {"method": self.name, "model": lm.name, "fingerprint": lm.fingerprint,
                              "layers": layers, "modules": names, "eta": eta,
                              "rows": len(r), "case_ids": [q.case_id for q in requests],
                              "params": asdict(self.hp), "nll": grads.nll.tolist(),
                              "key_s": t1 - t0, "solve_s": time.perf_counter() - t1})

    def edit(self, lm: LM, request: EditRequest) -> Delta:
        delta = self.edit_batch(lm, [request])
        delta.meta["case_id"] = request.case_id
        return delta

    def commit(self, lm: LM, requests: list[EditRequest]) -> None:
        """These requests' turn is applied for good: its statistics join the lifelong normaliser."""
        if self._pending is None or self._pending[0] != [q.case_id for q in requests]:
            raise RuntimeError("UltraEdit.commit: these requests are not the last turn edited")
        self.norm, self._pending = self._pending[1], None

    def reset(self) -> None:
        self.norm, self._pending = {}, None

    def state(self) -> dict[str, torch.Tensor]:
        """The lifelong normaliser, float64 (to resume a sequential run bit for bit)."""
        out = {}
        for key, m in self.norm.items():
            out |= {f"norm/{key}/n": torch.tensor([m.n], dtype=torch.float64), f"norm/{key}/mean": m.mean,
                    f"norm/{key}/m2": m.m2}
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        keys = {name.split("/")[1] for name in state}
        try:
            self.norm = {k: Moments(int(state[f"norm/{k}/n"].item()), state[f"norm/{k}/mean"].double(),
                                    state[f"norm/{k}/m2"].double()) for k in keys}
        except KeyError as e:
            raise ValueError(f"UltraEdit state lacks {e.args[0]} (has {sorted(state)[:6]})") from None
        self._pending = None


def shape_key(shape: tuple[int, int]) -> str:
    """A module shape [out, in] as the normaliser's key "inxout" (the reference code's (in, out))."""
    return f"{shape[1]}x{shape[0]}"

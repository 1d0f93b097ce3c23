"""MEMIT (Meng et al. 2023): many facts at once, spread over several MLP output projections.

For requests i = 1..n and edited layers l_1 < … < l_L (Algorithm 1 of the paper):
    z_i = h_i^{L} + δ_i        the residual leaving the last edited layer at the subject's last token, with δ_i
                               optimised (toolkit.optimize_values, module "layer") so the model emits o*_i
    for each layer l_j, in order, on the model edited so far:
        K = [k_i]              keys at l_j (toolkit.compute_keys: MLP output projection inputs, prefix-averaged)
        R = (z − h^{L}) / (L − j + 1)   the residual still missing at the last layer, shared by the layers left
        Δ_l = R Kᵀ (λ C + K Kᵀ)⁻¹       in float64; C = E[k kᵀ] (layer stats), λ = mom2_update_weight

Correspondence with ROME (tested): with one request and one layer, Sherman–Morrison gives
    Δ = R (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k)  =  a/(λ + a) · Δ_ROME,   a = kᵀC⁻¹k,
i.e. ROME's W' = W + Λ (C⁻¹k*)ᵀ with the same k*, the same target residual and the same C, shrunk by a/(λ+a);
as λ → 0 (or a ≫ λ) the two agree and W' k* = v* exactly.

The paper assumes each MLP output is added to the residual as is (GPT-J, Llama). Gemma 2/3 normalise it first
(post_feedforward_layernorm), so a layer can only turn its contribution, not scale it, and R no longer maps
linearly to the change it asks for: on gemma-3-270m (100 cases, layers 2/4/6/8) the residual at the last layer
ends further from z than it started, whatever λ (ES 0.59-0.66, NS 0.53-0.64; the note of the batch issue).
`z_module="mlp_out"` is the measured way out there: z is ROME's v*, the output of one MLP output projection
before the norm (v0 = W k), optimised through the norm, and R = z − W k is exactly what ΔW must write (one layer).

The solve is written once (`spread`) over a function giving (K, h^{L}) on the model edited so far, so the same
loop runs in one process here and across Ray workers in kedit_ray.distributed.batch.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import reduce
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from kedit_ray.defaults import GIVEN, RULE, Measured, Rule
from kedit_ray.editors.contract import SplitEditor, option
from kedit_ray.editors.covariance import CovParams, UsesCovariance
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.toolkit import ValueParams, compute_keys, context_prefixes, mlp_out_of, optimize_values, \
    pad, subject_last_index
from kedit_ray.models import LM, Trace, check_layer, weight_of
from kedit_ray.options import count, fraction, positive
from kedit_ray.options import layers as layers_arg
from kedit_ray.requests import EditRequest

PAPER = {"mom2_update_weight": 15000.0, "z_module": "layer", "clamp_norm": 0.75}   # GPT-J's settings


def paper_layers(n_layers: int) -> list[int]:
    """The paper's layers for a model of `n_layers`: 4 from a sixth of the way up."""
    first = max(1, n_layers // 6)
    return list(range(first, min(first + 4, n_layers)))


class MemitDefaults(Measured):
    """MEMIT's measured settings, and the spread rule: z at the MLP output ("mlp_out") edits one layer, so where
    several layers are edited and no z_module is given, the paper's z and bound apply."""

    def settings(self, model: str, given: dict[str, object] | None = None,
                 n_layers: int | None = None) -> dict[str, tuple[object, str]]:
        out = super().settings(model, given, n_layers)
        layers = out["layers"][0]
        several = isinstance(layers, str) or len(layers) > 1            # words: the paper's four layers
        if several and out["z_module"][0] == "mlp_out" and out["z_module"][1] != GIVEN:
            spread = f"{RULE} (the paper's, over several layers)"
            out["z_module"] = (PAPER["z_module"], spread)
            if out["values.clamp_norm"][1] != GIVEN:
                out["values.clamp_norm"] = (PAPER["clamp_norm"], spread)
        return out


# Measured per model in kedit_ray/defaults/<model>.toml, [memit] (AlphaEdit's: [alphaedit]); without a value, the
# paper's settings. Why gemma-3-270m's z is "mlp_out": the module docstring.
RULES = {"layers": Rule(list[int], paper_layers, "4 from a sixth of the depth, the paper's"),
         "mom2_update_weight": Rule(float, PAPER["mom2_update_weight"], "the paper's"),
         "z_module": Rule(str, PAPER["z_module"], "the paper's"),
         "values.clamp_norm": Rule(float, PAPER["clamp_norm"], "the paper's")}
MEASURED = MemitDefaults("memit", RULES)


@dataclass
class MemitParams(CovParams):           # C as for ROME: the layer statistics, computed on first use
    # None: the per-model default (MEASURED), else the paper's (PAPER; layers: 4 from a sixth of the way up)
    layers: list[int] | None = option(None, "layers to edit, e.g. 3,4,5,6 or 3-6 (default: measured per model, "
                                      "else 4 from a sixth of the way up)", parse=layers_arg)
    mom2_update_weight: float | None = option(None, "λ, the weight of C (default: measured per model, else the "
                                              "paper's 15000)", flag="--mom2-weight", parse=fraction)
    # "layer": z is the residual leaving the last edited layer (the paper); "mlp_out": z is that layer's MLP output
    # projection output (one layer)
    z_module: str | None = option(None, "z is the residual leaving the last layer (the paper) or, one layer only, "
                                  "its MLP output before any norm (ROME's v*) (default: measured per model, else "
                                  "layer)", choices=("layer", "mlp_out"))
    n_prefixes: int = option(5, "generated context prefixes for the keys and z (plus the bare prompt)",
                             flag="--context-prefixes", parse=count)
    prefix_len: int = option(10, "tokens per context prefix", parse=positive)
    # on gemma-3-270m's CPU runs a batch of 25 runs no faster per request (1.02×, benchmarks/bench_batch.py) and
    # holds 6.6 GB at its peak against 1.9 GB for one (each request adds ~0.2 GB of activations for the backward)
    z_batch: int | None = option(None, "requests whose z are optimised together (default: 25 on an accelerator, "
                                 "1 on the CPU)", parse=positive)
    values: ValueParams = field(default_factory=ValueParams)   # clamp_norm None: per model, else 0.75

    @classmethod
    def from_dict(cls, d: dict) -> MemitParams:
        d = dict(d)
        layer = d.pop("layer", None)                 # ROME's `--layer L` alone means layers [L]
        if layer is not None and not d.get("layers"):
            d["layers"] = [layer]
        values = d.pop("values", {})
        hp = cls(**d)
        hp.values = ValueParams(**{**asdict(hp.values), **values})   # defaults of this editor, then overrides
        return hp


def settle(hp: MemitParams, lm: LM, table: str = "memit") -> MemitParams:
    """`hp` with what it leaves open (None) filled in: the model's measured defaults (`table` in its defaults
    files), else the paper's."""
    given = {path: reduce(getattr, path.split("."), hp) for path in RULES}
    found = MemitDefaults(table, RULES).settings(lm.name, given, lm.n_layers)
    out = replace(hp, **{k: found[k][0] for k in ("layers", "mom2_update_weight", "z_module")})
    out.values = replace(out.values, clamp_norm=found["values.clamp_norm"][0])
    if out.z_batch is None:
        out.z_batch = 1 if lm.input_device.type == "cpu" else 25
    if not out.layers:
        raise ValueError("MEMIT needs at least one layer")
    if out.z_module not in ("layer", "mlp_out"):
        raise ValueError(f"z_module must be 'layer' or 'mlp_out', got {out.z_module!r}")
    if out.z_module == "mlp_out" and len(out.layers) != 1:
        raise ValueError(f"z_module 'mlp_out' edits one layer; got layers {out.layers}")
    return out


class MemitSolver:
    """Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ per layer, float64. `covs[layer]` is C (None: I)."""

    preserves = False   # a solver that keeps the keys of committed edits (`preserve`) says True

    def __init__(self, covs: dict[int, torch.Tensor | None], lam: float, labels: dict[int, str]):
        self.covs, self.lam, self.labels = covs, lam, labels

    def solve(self, layer: int, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """k: [n, d_in] keys, r: [n, d_out] residuals → ΔW [d_out, d_in]."""
        k, r = k.double(), r.double()
        c = self.covs[layer]
        c = torch.eye(k.shape[1], dtype=torch.float64) if c is None else c.double()
        a = self.lam * c.to(k.device) + k.T @ k                       # λ C + K Kᵀ
        return (torch.linalg.solve(a, k.T) @ r).T                      # (R Kᵀ (λC + KKᵀ)⁻¹), C symmetric

    def state(self) -> dict[str, torch.Tensor]:
        """What the solver learnt from earlier batches (none: MEMIT's solve depends on C and λ alone)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"MEMIT's solver keeps no state, got {sorted(state)}")


def spread(solver, layers: list[int], names: list[str], z: torch.Tensor,
           inputs: Callable[[int, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
           progress: bool = False) -> dict[str, torch.Tensor]:
    """Algorithm 1's layer loop. `inputs(layer, deltas)` returns (K at `layer`, h at the last edited layer) for
    every request, measured with `deltas` (the updates of the layers done so far) applied."""
    deltas: dict[str, torch.Tensor] = {}
    for j, (layer, name) in enumerate(tqdm(list(zip(layers, names)), desc="solve", disable=not progress)):
        k, h = inputs(layer, deltas)
        r = (z.to(h.device, torch.float64) - h.double()) / (len(layers) - j)   # R: the residual, spread
        deltas[name] = solver.solve(layer, k, r).float()
    return deltas


@torch.no_grad()
def residual_at_subject(lm: LM, layer: int, requests: list[EditRequest]) -> torch.Tensor:
    """h^{L}: the residual leaving `layer` at each subject's last token of the bare prompt. [n, d]"""
    rows = [lm.tok(r.text).input_ids for r in requests]
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    with Trace(lm.model, lm.arch.name("layer", layer), retain_output=True, stop=True) as t:
        lm.model(input_ids=ids, attention_mask=mask)
    at = torch.tensor([subject_last_index(lm, r.text, r.subject) for r in requests], device=t.output.device)
    return t.output[torch.arange(len(requests), device=at.device), at]


class Memit(UsesCovariance, SplitEditor):
    name = "memit"

    def __init__(self, params: MemitParams | None = None):
        self.hp = params or MemitParams()
        self._solvers: dict[int, MemitSolver] = {}
        self._settled: dict[int, MemitParams] = {}

    def params(self, lm: LM) -> MemitParams:
        """The parameters for this model: the per-model defaults filled in where `hp` leaves them open."""
        key = id(lm.model)
        if key not in self._settled:
            self._settled[key] = settle(self.hp, lm, self.name)
        return self._settled[key]

    # -------------------------------------------------------------- pieces (also run on Ray workers)

    def layers(self, lm: LM) -> list[int]:
        return [check_layer(lm.model, layer) for layer in sorted(self.params(lm).layers)]

    def cov_layers(self, lm: LM) -> list[int]:
        return self.layers(lm)

    def dims(self, lm: LM) -> dict[int, int]:
        """d_in of each edited layer's MLP output projection."""
        return {layer: weight_of(lm.model.get_submodule(lm.arch.name("mlp_out", layer))).shape[1]
                for layer in self.layers(lm)}

    def make_solver(self, dims: dict[int, int], covs: dict, labels: dict, lam: float) -> MemitSolver:
        return MemitSolver(covs, lam, labels)

    def _forget(self, lm: LM) -> None:
        self._solvers.pop(id(lm.model), None)

    def solver(self, lm: LM) -> MemitSolver:
        key = id(lm.model)
        if key not in self._solvers:
            covs, labels = self.covariances(lm)
            self._solvers[key] = self.make_solver(self.dims(lm), covs, labels, self.params(lm).mom2_update_weight)
        return self._solvers[key]

    def prefixes(self, lm: LM) -> list[str]:
        return context_prefixes(lm, self.hp.n_prefixes, self.hp.prefix_len)

    def prepare(self, lm: LM) -> None:
        self.prefixes(lm)

    def targets(self, lm: LM, requests: list[EditRequest], progress: bool = False) -> tuple[torch.Tensor, dict]:
        """z_i = h_i + δ_i at the last edited layer, optimised `z_batch` requests at a time. [n, d]"""
        hp, layer, prefixes = self.params(lm), self.layers(lm)[-1], self.prefixes(lm)
        zs, steps = [], []
        chunks = range(0, len(requests), hp.z_batch)
        for s in tqdm(chunks, desc="z", disable=not progress or len(chunks) < 2):
            part = requests[s:s + hp.z_batch]
            keys = compute_keys(lm, layer, part, prefixes) if hp.z_module == "mlp_out" else None
            z0, delta, info = optimize_values(lm, layer, part, prefixes, keys, hp.values, module=hp.z_module)
            zs.append((z0 + delta).float().cpu())
            steps.append(info["v_steps"])
        return torch.cat(zs), {"v_steps": max(steps)}

    def inputs(self, lm: LM, requests: list[EditRequest], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K at `layer`, h at the last edited layer: its residual, or W k for z_module "mlp_out") on the model
        as it is now."""
        k = compute_keys(lm, layer, requests, self.prefixes(lm))
        if self.params(lm).z_module == "mlp_out":    # one layer: `layer` is the last
            return k.cpu(), mlp_out_of(lm, layer, k).float().cpu()
        return k.cpu(), residual_at_subject(lm, self.layers(lm)[-1], requests).float().cpu()

    # -------------------------------------------------------------- the editor interface

    def edit_batch(self, lm: LM, requests: list[EditRequest], progress: bool = False) -> Delta:
        if not requests:
            raise ValueError("edit_batch needs at least one request")
        t0 = time.perf_counter()
        layers = self.layers(lm)
        solver = self.solver(lm)
        names = [lm.arch.name("mlp_out", layer) for layer in layers]
        t1 = time.perf_counter()
        z, info = self.targets(lm, requests, progress)
        t2 = time.perf_counter()

        def inputs(layer: int, deltas: dict) -> tuple[torch.Tensor, torch.Tensor]:
            with Delta(dict(deltas)).applied(lm.model):
                return self.inputs(lm, requests, layer)

        deltas = spread(solver, layers, names, z, inputs, progress)
        t3 = time.perf_counter()
        return Delta(deltas, {
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layers[-1],
            "layers": layers, "cov": ";".join(sorted(set(solver.labels.values()))),
            "case_ids": [r.case_id for r in requests], "params": asdict(self.params(lm)), **info,
            "setup_s": t1 - t0, "value_s": t2 - t1, "solve_s": t3 - t2, **self.extra_meta(lm)})

    def edit(self, lm: LM, request: EditRequest) -> Delta:
        delta = self.edit_batch(lm, [request])
        delta.meta["case_id"] = request.case_id
        return delta

    def extra_meta(self, lm: LM) -> dict:
        return {}

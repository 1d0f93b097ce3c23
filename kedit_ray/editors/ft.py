"""Fine-tuning baselines (ROME paper, Meng et al. 2022, §3 and appendix; Zhu et al. 2020 for the constraint).

FT:   W' = W + ΔW, ΔW from Adam steps on the NLL of o* after the prompt (teacher-forced), one layer's
      MLP output projection, stopped early once the NLL is small.
FT-L: the same with ΔW clamped to ||ΔW||∞ ≤ ε after every step ("FT+L", constrained fine-tuning).

The model's weights are never touched while training: ΔW enters through a forward hook (out + x ΔWᵀ), so
only the upper layers run (from the cached residual stream) and the result is a Delta like every editor's.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.toolkit import fit_adam, target_ids, target_loss
from kedit_ray.models import LM, Trace, check_layer, get_module, weight_of
from kedit_ray.options import fraction, positive, positive_float
from kedit_ray.requests import EditRequest

# Measured per model in kedit_ray/defaults/<model>.toml, [ft] (FT-L's too); without a value, the rule here.
MEASURED = Measured("ft", {"layer": Rule(int, lambda n: n // 3, "a third of the depth")})

NORM_HELP = "FT-L: ε, the bound on ||ΔW||∞"


@dataclass
class FTParams:
    layer: int | None = option(None, "the layer whose MLP output projection is tuned (default: measured per "
                               "model, else a third of the way up)", parse=int)
    module: str = option("mlp_out", "the Arch module whose weight is tuned: mlp_out, mlp_in, ...")
    steps: int = option(25, "max gradient steps on ΔW", flag="--v-steps", parse=positive)
    lr: float = option(5e-4, "Adam's learning rate on ΔW", flag="--v-lr", parse=positive_float)
    stop_nll: float = option(0.01, "training stops once the target's mean NLL is below this",
                             flag="--v-stop-nll", parse=fraction)
    norm_constraint: float | None = option(None, NORM_HELP, parse=positive_float)   # None: plain FT

    def __post_init__(self):
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be positive, got {self.norm_constraint}")

    @classmethod
    def from_dict(cls, d: dict) -> FTParams:
        return cls(**d)


@dataclass
class FTLParams(FTParams):
    norm_constraint: float | None = option(5e-4, NORM_HELP, parse=positive_float)   # ROME's FT+L setting for
    # GPT-2 XL; see the note for gemma-3-270m


def default_layer(lm: LM) -> int:
    return MEASURED.value(lm, "layer")


class FT(Editor):
    name = "ft"

    def __init__(self, params: FTParams | None = None):
        self.hp = params or FTParams()
        if self.hp.norm_constraint is not None:
            self.name = "ft-l"

    def layer(self, lm: LM) -> int:
        return check_layer(lm.model, self.hp.layer if self.hp.layer is not None else default_layer(lm))

    def edit(self, lm: LM, request: EditRequest) -> Delta:
        hp, t0 = self.hp, time.perf_counter()
        layer = self.layer(lm)
        name = lm.arch.name(hp.module, layer)
        shape = weight_of(get_module(lm.model, name)).shape
        ctx, y = lm.tok(request.text).input_ids, target_ids(lm, request.target_new)
        ids = torch.tensor([ctx + y[:-1]], device=lm.input_device)
        mask = torch.ones_like(ids)
        with torch.no_grad(), Trace(lm.model, lm.arch.name("layer", layer), retain_input=True, stop=True) as t:
            lm.model(input_ids=ids, attention_mask=mask)
        cached = t.input                                                # residual entering the layer
        dev = lm.device_of(lm.arch.lm_head)
        rows = torch.zeros(len(y), dtype=torch.long, device=dev)
        cols = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(y), device=dev)
        tgt = torch.tensor(y, device=dev)

        dw = torch.zeros(shape, device=lm.device_of(name), requires_grad=True)   # ΔW [out, in], float32

        def hook(_m, args, kwargs, out):                                # W' x = W x + ΔW x
            x = args[0] if args else next(iter(kwargs.values()))
            return out + (x.float() @ dw.T).to(out.dtype)

        c = hp.norm_constraint                                          # FT-L: project onto the L∞ ball
        handle = get_module(lm.model, name).register_forward_hook(hook, with_kwargs=True)
        try:
            nll, steps = fit_adam([dw], lambda: target_loss(lm, layer, cached, ids, mask, rows, cols, tgt), hp.lr,
                                  hp.steps, hp.stop_nll, None if c is None else lambda: dw.clamp_(-c, c))
        finally:
            handle.remove()
        return Delta({name: dw.detach()}, {   # float32; Delta.apply casts W + ΔW once to W's dtype
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer, "module": name,
            "case_id": request.case_id, "v_steps": steps, "v_nll": nll, "params": asdict(hp),
            "value_s": time.perf_counter() - t0})

"""LoRA fine-tuning baseline (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), through peft.

For each chosen module W [out, in] (default: the MLP output projection of a band of layers) peft adds an adapter,
    h = W x + (α/r) · B A x,    A [r, in] drawn Kaiming-uniform (a fixed seed), B [out, r] = 0, dropout 0,
so the model starts unchanged. A and B are trained with Adam on the NLL of o* after each prompt (teacher-forced,
as FT; a batch's requests all in one adapter), stopped early once the NLL is small. Then merged:
    ΔW = (α/r) · B A            in float64 from the trained adapter (kept in the adapter's dtype, float32 at least)
and the adapter removed (peft's unload; every parameter's requires_grad as before): the model is exactly as it
was, and the edit an ordinary Delta, so revert, sequential runs and export work unchanged. Only the blocks from
the lowest adapted layer up run while training, from the cached residual stream.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.learned import build_rows
from kedit_ray.editors.toolkit import band_modules, fit_adam, target_loss
from kedit_ray.models import LM, Trace, get_module
from kedit_ray.models.hooks import stores_transposed
from kedit_ray.options import fraction, names, positive, positive_float
from kedit_ray.options import layers as layers_arg
from kedit_ray.requests import EditRequest

ADAPTER = "kedit"   # the peft adapter's name
SEED = 0            # A's initialisation: the same requests give the same edit


@dataclass
class LoRAParams:
    layers: list[int] | None = option(None, "layers whose modules get an adapter, e.g. 0-2 (default: measured per "
                                      "model, else the first three)", parse=layers_arg)
    modules: list[str] | None = option(None, "the adapted projections in each layer, Arch fields (mlp_out, mlp_in) "
                                       "or templates such as 'model.layers.{}.mlp.gate_proj', comma-separated "
                                       "(default: measured per model, else mlp_out)", flag="--lora-modules",
                                       parse=names)
    rank: int | None = option(None, "r, the adapter's rank (default: measured per model, else 8)",
                              flag="--lora-rank", parse=positive)
    alpha: float | None = option(None, "α: the adapter's output is scaled by α/r (default: measured per model, "
                                 "else 16)", flag="--lora-alpha", parse=positive_float)
    steps: int = option(40, "max Adam steps on the adapter", flag="--v-steps", parse=positive)
    lr: float | None = option(None, "Adam's learning rate on A and B (default: measured per model, else 1e-3)",
                              flag="--v-lr", parse=positive_float)
    stop_nll: float | None = option(None, "training stops once the target's mean NLL is below this (default: "
                                    "measured per model, else 0.5)", flag="--v-stop-nll", parse=fraction)

    @classmethod
    def from_dict(cls, d: dict) -> LoRAParams:
        return cls(**d)


# Measured per model in kedit_ray/defaults/<model>.toml, [lora]; without a value, the rules here: on both measured
# models the lowest bands kept the neighbours best (later ones lost most of them), and so did a loose stop (an NLL
# of 0.5: the target at p ≈ 0.6) rather than FT's 0.01.
MEASURED = Measured("lora", {"layers": Rule(list[int], lambda n: list(range(min(3, n))), "the first three"),
                             "modules": Rule(list[str], ["mlp_out"]), "rank": Rule(int, 8), "alpha": Rule(float, 16.0),
                             "lr": Rule(float, 1e-3), "stop_nll": Rule(float, 0.5)})


@contextlib.contextmanager
def adapters(lm: LM, names: list[str], rank: int, alpha: float) -> Iterator[dict[str, nn.Module]]:
    """peft's LoRA layers on the modules `names` for the `with` block (name -> its LoRA layer; A from a fixed seed,
    B = 0, float32 at least, where the module computes); then unloaded: the model holds its own modules again, each
    parameter's requires_grad as before."""
    from peft import LoraConfig, LoraModel                      # peft takes seconds to import: only when editing

    model = lm.model
    if hasattr(model, "peft_config"):
        raise ValueError(f"{lm.name} already carries peft adapters; LoRA edits a plain model")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # where each adapter computes and its dtype: the module's execution device (an offloaded W is on "meta"), and
    # W's dtype, float32 at least
    place = {n: (lm.device_of(n), torch.promote_types(get_module(model, n).weight.dtype, torch.float32)) for n in names}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(names), bias="none",
                        fan_in_fan_out=all(stores_transposed(get_module(model, n)) for n in names))   # GPT-2's Conv1D
    tuner = LoraModel(model, config, ADAPTER, low_cpu_mem_usage=True)    # the adapters on "meta" for now
    try:
        layers = {n: get_module(model, n) for n in names}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            for n, m in layers.items():                          # peft's initialisation on the CPU, then moved
                m.lora_A.to_empty(device="cpu")
                m.lora_B.to_empty(device="cpu")
                m.reset_lora_parameters(ADAPTER, True)
                m.lora_A.to(*place[n])
                m.lora_B.to(*place[n])
        yield layers
    finally:
        tuner.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def merged(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """ΔW = (α/r) · B A per module, in float64: [out, in] however W is stored (A is [r, in], B [out, r] for GPT-2's
    Conv1D too)."""
    out = {}
    for name, m in layers.items():
        a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight            # [r, in], [out, r]
        out[name] = (m.scaling[ADAPTER] * (b.detach().double() @ a.detach().double())).to(a.dtype)
    return out


class LoRA(Editor):
    name = "lora"
    batched = True

    def __init__(self, params: LoRAParams | None = None):
        self.hp = params or LoRAParams()

    def setting(self, lm: LM, key: str):
        given = getattr(self.hp, key)
        return given if given is not None else MEASURED.value(lm, key)

    def plan(self, lm: LM) -> tuple[list[int], list[str]]:
        """The adapted layers and modules, lowest layer first."""
        layers = sorted(self.setting(lm, "layers"))
        names = band_modules(lm, "LoRA", layers, self.setting(lm, "modules"), "--lora-modules")
        have = dict(lm.model.named_modules())
        if odd := [n for n in names if not (isinstance(have[n], nn.Linear) or stores_transposed(have[n]))]:
            raise ValueError(f"LoRA adapts linear maps; {odd[0]} is a {type(have[odd[0]]).__name__}")
        return layers, names

    def edit_batch(self, lm: LM, requests: list[EditRequest]) -> Delta:
        """One adapter trained on all of `requests`, merged into ΔW."""
        if not requests:
            raise ValueError("edit_batch needs at least one request")
        hp, t0 = self.hp, time.perf_counter()
        layers, names = self.plan(lm)
        rank, alpha, lr, stop = (self.setting(lm, k) for k in ("rank", "alpha", "lr", "stop_nll"))
        rows = build_rows(lm, requests, paraphrases=False)
        r, c, tgt = rows.edit                                            # (row, column) predicting each o* token
        with torch.no_grad(), Trace(lm.model, lm.arch.name("layer", layers[0]), retain_input=True, stop=True) as t:
            lm.model(input_ids=rows.ids, attention_mask=rows.mask)
        cached = t.input                                                 # the residual entering the lowest layer

        with adapters(lm, names, rank, alpha) as lora:
            params = [p for m in lora.values() for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight)]
            nll, steps = fit_adam(params, lambda: target_loss(lm, layers[0], cached, rows.ids, rows.mask, r, c, tgt),
                                  lr, hp.steps, stop)                   # mean NLL over o* tokens
            deltas = merged(lora)
        return Delta(deltas, {
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layers": layers,
            "modules": names, "rank": rank, "alpha": alpha, "lr": lr, "stop_nll": stop,
            "case_ids": [q.case_id for q in requests], "v_steps": steps, "v_nll": nll, "params": asdict(hp),
            "value_s": time.perf_counter() - t0})

    def edit(self, lm: LM, request: EditRequest) -> Delta:
        delta = self.edit_batch(lm, [request])
        delta.meta["case_id"] = request.case_id
        return delta

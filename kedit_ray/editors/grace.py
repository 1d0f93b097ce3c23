"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value adaptor wrapped around one layer.

The adaptor holds a codebook C = {(K_i, V_i, ε_i, y_i)}: keys K (the wrapped layer's inputs h^{l-1}), values V
(its outputs), deferral radii ε and labels y (the target's token ids). Lookup, for a query h:

    i* = argmin_i ||h − K_i||₂;   output = V_{i*} if ||h − K_{i*}|| ≤ ε_{i*}, else the layer's own output

Adding an edit (x_t, y_t) with query h at the last token of x_t (Algorithm 1):
    C empty, or d(h, K_{i*}) > ε_init + ε_{i*}     → add (h, v, ε_init, y_t), v trained to emit y_t
    in range and y_{i*} = y_t                      → expand: ε_{i*} = max(ε_{i*}, d) (the official code's
                                                     "coverage"); V_{i*} is trained further on x_t
    in range and y_{i*} ≠ y_t                      → split: ε_{i*} = d/2 and add (h, v, d/2, y_t)
                                                     (d = 0, the same query: y_{i*} and V_{i*} are replaced)

Positions. Every position of a forward pass is a query: in a causal LM position t is the last token of the
prompt x[:t+1], and that is how GRACE's code behaves during cached generation (each new token is looked up).
For a prompt the query at its last token is exactly the paper's; when a target is appended for teacher forcing
(or generated) its tokens are looked up too and are replaced only if they themselves fall inside a radius —
in practice the replacement sits at the last prompt token and the target positions read it through attention,
as with GRACE's `replace_last`. Values are trained under this same forward rule, so training and evaluation
agree. `replacement="all"`: a hit at position t also replaces every earlier position of the row (the whole
prompt up to it; GRACE's `replace_prompt`/`replace_all`).

The edit object is the adaptor: `apply` installs it as a forward hook, `revert` removes it (the model is
untouched, so outputs are bit-identical). Adaptors on one module stack: only the last applied one is active,
and the next `edit` continues the active codebook — sequential editing applies edit objects one after another.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kedit_ray.defaults import Measured, Rule, defaults_files
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Hooked
from kedit_ray.editors.toolkit import fit_adam, target_ids, target_loss
from kedit_ray.errors import SettingError
from kedit_ray.io import load_tagged, save_tensors
from kedit_ray.models import LM, TraceDict, check_layer, get_module, token_grid
from kedit_ray.options import fraction, positive, positive_float
from kedit_ray.requests import EditRequest

# Measured per model in kedit_ray/defaults/<model>.toml, [grace] (why a whole block is wrapped, not mlp_out:
# there too); without a value, the rules here: ε_init has none, it is a distance in the wrapped module's inputs.
MEASURED = Measured("grace", {"layer": Rule(int, lambda n: n // 2, "half the depth"),
                              "eps_init": Rule(float, None, "none: give --eps-init")})
REPLACEMENTS = ("last", "all")


@dataclass
class GraceParams:
    layer: int | None = option(None, "the block whose output the codebook replaces (default: measured per "
                               "model, else half way up)", parse=int)
    module: str = option("layer", "the Arch module wrapped: layer (a whole block), mlp_out, ...")
    eps_init: float | None = option(None, "ε_init, the radius of a new key, in the units of the wrapped module's "
                                    "input (default: measured per model; required for others)",
                                    parse=positive_float)
    lr: float = option(10.0, "Adam's learning rate on a codebook value", flag="--v-lr", parse=positive_float)
    steps: int = option(100, "max gradient steps on a codebook value", flag="--v-steps", parse=positive)
    stop_nll: float = option(0.05, "a value stops training once the target's mean NLL is below this",
                             flag="--v-stop-nll", parse=fraction)
    replacement: str = option("last", "replace the wrapped layer's output at the last prompt token or at all of "
                              "them (see the module docstring)", choices=REPLACEMENTS)

    def __post_init__(self):
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if self.eps_init is not None and self.eps_init <= 0:
            raise ValueError(f"eps_init must be positive, got {self.eps_init}")

    @classmethod
    def from_dict(cls, d: dict) -> GraceParams:
        return cls(**d)


def distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n_queries, n_keys], each pair summed on its own: the distance an edit sets a radius by
    is then the one the codebook routes by, however many queries come along (torch.cdist's default switches to
    |q|² + |k|² - 2 q·k past 25 rows, whose rounding depends on the batch: a query at its own key's radius missed
    it, and the edit's value got no gradient)."""
    return torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist")


class GraceAdaptor(Hooked):
    """The codebook for one module: keys [N, d_in], values [N, d_out], radii [N], labels (token id lists)."""

    what = "GRACE adaptor"

    def __init__(self, module: str, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor,
                 labels: list[list[int]], replacement: str = "last", meta: dict | None = None):
        if not (len(keys) == len(values) == len(radii) == len(labels)):
            raise ValueError(f"codebook parts disagree: {len(keys)} keys, {len(values)} values, "
                             f"{len(radii)} radii, {len(labels)} labels")
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        self.module, self.keys, self.values, self.radii = module, keys, values, radii
        self.labels, self.replacement = [list(y) for y in labels], replacement
        self.meta = {**(meta or {}), "codebook_keys": len(keys)}
        self.meta["checkpoint"] = {"codebook_keys": len(keys)}          # a figure for the sequential summary

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------ lookup
    def replace(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The wrapped module's output given its input h [..., T, d_in] and own output out [..., T, d_out]."""
        if not len(self):
            return out
        wide = torch.promote_types(h.dtype, torch.float32)
        keys = self.keys.to(h.device, wide)
        q = h.reshape(-1, h.shape[-1]).to(wide)
        d, i = distances(q, keys).min(1)                                  # nearest key per position
        hit = d <= self.radii.to(d.device)[i]
        if not hit.any():
            return out                                                    # the same tensor: bit-identical
        shape = out.shape[:-1]
        hit, i = hit.view(shape), i.view(shape)
        if self.replacement == "all":                                     # a hit at t covers positions ≤ t
            t = torch.arange(shape[-1], device=hit.device).expand(shape)
            nxt = torch.where(hit, t, shape[-1]).flip(-1).cummin(-1).values.flip(-1)
            hit = nxt < shape[-1]
            i = i.gather(-1, nxt.clamp(max=shape[-1] - 1))
        v = self.values.to(out.device, out.dtype)[i]
        return torch.where(hit[..., None], v, out)

    # ------------------------------------------------------------ the edit-object interface
    def place(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.module)

    def hooks(self, model: nn.Module, stack: list) -> list:
        def hook(_m, args, kwargs, out):
            if stack[-1] is not self:                                     # a later adaptor supersedes this one
                return out
            h = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            if isinstance(out, tuple):                                    # decoder blocks may return tuples
                return (self.replace(h, out[0]), *out[1:])
            return self.replace(h, out)

        return [self.place(model).register_forward_hook(hook, with_kwargs=True)]

    def norms(self) -> dict[str, float]:
        return {self.module: self.values.float().norm().item() if len(self) else 0.0}

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        n = max((len(y) for y in self.labels), default=0)
        labels = torch.full((len(self), n), -1, dtype=torch.long)            # token ids, right-padded with -1
        for j, y in enumerate(self.labels):
            labels[j, :len(y)] = torch.tensor(y, dtype=torch.long)
        info = {"module": self.module, "replacement": self.replacement, "meta": self.meta}
        return save_tensors(path, {"keys": self.keys, "values": self.values, "radii": self.radii, "labels": labels},
                            {"kedit_grace": json.dumps(info, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> GraceAdaptor:
        t, info = load_tagged(path, "kedit_grace", "a GRACE adaptor file")
        info = json.loads(info)
        labels = [[int(x) for x in row if x >= 0] for row in t["labels"]]
        return cls(info["module"], t["keys"], t["values"], t["radii"], labels, info["replacement"], info["meta"])


def active_adaptor(model: nn.Module, module: str) -> GraceAdaptor | None:
    """The adaptor currently active on `module`, if any."""
    return GraceAdaptor.active(get_module(model, module))


def default_layer(lm: LM) -> int:
    return MEASURED.value(lm, "layer")


def eps_init(model: str, hp: GraceParams) -> float:
    """ε_init: the one given, else the one measured for `model`; a model without one is a SettingError."""
    if hp.eps_init is not None:
        return hp.eps_init
    eps, _ = MEASURED.settings(model)["eps_init"]
    if eps is None:
        files = " or ".join(map(str, defaults_files(model)))
        raise SettingError("eps_init", f"GRACE has no measured ε_init for {model!r} (none in {files}); give one: "
                                       "it is a distance between inputs of the wrapped module, so it depends on the "
                                       "model and the layer")
    return eps


class Grace(Editor):
    name = "grace"
    kind = "adaptor"   # its edits are codebooks hooked onto the model, not weight Deltas
    refusal = ("GRACE edits are an adaptor (a codebook looked up by a forward hook), not a change of weights, so "
               "they cannot be merged into a model directory; save the codebook with --save and apply it with "
               "kedit_ray.editors.GraceAdaptor.load(path).apply(model)")

    def __init__(self, params: GraceParams | None = None):
        self.hp = params or GraceParams()

    def layer(self, lm: LM) -> int:
        return check_layer(lm.model, self.hp.layer if self.hp.layer is not None else default_layer(lm))

    def check_settings(self, model: str) -> None:
        """Refuse, before any model is loaded, settings that cannot work for `model`."""
        eps_init(model, self.hp)

    def edit(self, lm: LM, request: EditRequest) -> GraceAdaptor:
        """A new adaptor: the active codebook on the wrapped module (or an empty one) plus this edit."""
        hp, t0 = self.hp, time.perf_counter()
        layer, eps = self.layer(lm), eps_init(lm.name, self.hp)
        name, block = lm.arch.name(hp.module, layer), lm.arch.name("layer", layer)
        ctx, y = lm.tok(request.text).input_ids, target_ids(lm, request.target_new)
        ids = torch.tensor([ctx + y[:-1]], device=lm.input_device)
        mask = torch.ones_like(ids)
        with torch.no_grad(), TraceDict(lm.model, dict.fromkeys([block, name]), retain_input=True,
                                        retain_output=True, stop=True) as tr:
            lm.model(input_ids=ids, attention_mask=mask)
        cached = tr[block].input                                          # residual entering the layer
        wide = torch.promote_types(tr[name].input.dtype, torch.float32)   # a half-precision model's codebook in fp32
        h = token_grid(tr[name].input, ids)[0, len(ctx) - 1].to(wide)     # the query h^{l-1}
        v0 = token_grid(tr[name].output, ids)[0, len(ctx) - 1].to(wide)   # warm start: the output there now

        cur = active_adaptor(lm.model, name)
        keys = cur.keys.to(h.device) if cur is not None else h.new_zeros(0, h.shape[0])
        values = cur.values.to(v0.device) if cur is not None else v0.new_zeros(0, v0.shape[0])
        radii = cur.radii.to(h.device) if cur is not None else h.new_zeros(0)
        labels = list(cur.labels) if cur is not None else []

        # Algorithm 1: add, expand or split
        dist = float("inf")
        if len(keys):
            dists = distances(h[None], keys.to(h.dtype))[0]
            dist, j = dists.min(0)
            dist, j = dist.item(), j.item()
        if not len(keys) or dist > eps + radii[j].item():
            rule, j = "add", len(keys)
            keys, values = torch.cat([keys, h[None]]), torch.cat([values, v0[None]])
            radii, labels = torch.cat([radii, radii.new_tensor([eps])]), labels + [y]
        elif labels[j] == y:
            rule = "expand"
            radii = radii.clone()
            radii[j] = max(radii[j].item(), dist)
        elif dist == 0:                                                   # the same query, a new label: it wins
            rule = "replace"
            labels = labels[:j] + [y] + labels[j + 1:]
            values = values.clone()
            values[j] = v0
        else:
            rule = "split"
            radii = radii.clone()
            radii[j] = dist / 2
            keys, values = torch.cat([keys, h[None]]), torch.cat([values, v0[None]])
            radii, labels = torch.cat([radii, radii.new_tensor([dist / 2])]), labels + [y]
            j = len(keys) - 1
        t1 = time.perf_counter()

        # train V_j so the model emits y after the prompt, under the adaptor's own forward rule
        adaptor = GraceAdaptor(name, keys, values.detach(), radii, labels, hp.replacement)
        v = values[j].detach().clone().requires_grad_(True)
        rows = torch.zeros(len(y), dtype=torch.long)
        cols = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(y))
        dev = lm.device_of(lm.arch.lm_head)
        tgt = torch.tensor(y, device=dev)
        fixed = values.detach()

        def loss():
            adaptor.values = torch.cat([fixed[:j], v[None].to(fixed.device), fixed[j + 1:]])
            return target_loss(lm, layer, cached, ids, mask, rows, cols, tgt)

        with adaptor.applied(lm.model):
            nll, steps = fit_adam([v], loss, hp.lr, hp.steps, hp.stop_nll)
        values = torch.cat([fixed[:j], v.detach()[None].to(fixed.device), fixed[j + 1:]])
        t2 = time.perf_counter()
        return GraceAdaptor(name, keys.detach().cpu(), values.cpu(), radii.cpu(), labels, hp.replacement, {
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer, "module": name,
            "case_id": request.case_id, "rule": rule, "distance": dist, "key": j, "v_steps": steps, "v_nll": nll,
            "eps_init": eps, "params": asdict(hp), "key_s": t1 - t0, "value_s": t2 - t1})

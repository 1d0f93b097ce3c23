"""WISE (Wang et al., NeurIPS 2024): lifelong editing in a side memory that a router consults by activation.

Memories. The main memory is one MLP output projection W_v [out, in] (down_proj) of layer l, left as it is; the
side memory W_v' = W_v + Δ is a copy that takes the edits. Per input x (a row of the batch) the activation score

    Δ_act(x) = mean_t ‖(W_v' − W_v) a_t‖₂ = mean_t ‖Δ a_t‖₂           (a_t: the projection's input at position t)

is the reference's mean over the row's positions: every position the model has seen of the row, so a teacher-forced
target counts, and in cached generation the positions of the earlier calls do (their sums are carried). If
Δ_act(x) > ε the side memory answers the row, W_v' a_t = W_v a_t + Δ a_t at each position; else the main memory
does, and the row's output is the unedited model's bit for bit.

Editing one request: SGD steps on Δ (the reference's edit_lr, n_iter and |Δ| ≤ c elementwise) over rows "prefix +
prompt + target" for the generated context prefixes (toolkit.context_prefixes, random-prefix augmentation), with

    loss = NLL(target) + mean⁺(s_o − s_e + γ) + mean⁺(s_o − α) + mean⁺(β − s_e)

s_e the edit rows' scores, s_o those of irrelevant inputs (pairs in the first term), mean⁺ the mean of the positive
terms (the reference's margins: edits above β, irrelevant inputs below α, γ apart). The irrelevant inputs are the
request's own unrelated prompts (zsRE's NQ question, CounterFact's neighbours: the reference's loc input) and texts
the model generates itself after the reference's starts of its context texts ("I", ..., "Q: "). On gemma-3-270m,
10 zsRE edits and 20 held-out cases, the generated texts alone let 15% of the held-out answers through the side
memory (TRR 0.85, ERR 0.78); with the request's own too, none (TRR 1.00, ERR 0.90). Each step's gradient is masked
to the current shard's entries: a random fraction ρ of Δ's, drawn per shard. Training stops when the loss is below
the reference's 0.02. The NLL costs a pass from layer l up and the LM head, the margins a product with the cached a_t: once the NLL is below that bound (its gradient then ~0), steps take the margins alone, the NLL checked
every few steps and when they are met (the reference computes both at every step). After training the edit's score,
the mean of s_e, is kept; ε = act_ratio · the least score of any edit so far (the reference's min_act).

Shards and merging. The current shard takes N edits (merge_every), one after another; then it is merged into the
side memory by TIES (Yadav et al. 2023): trim each task vector τ_i to its k = density · numel largest magnitudes,
elect per entry the sign s of Σ_i w_i τ_i, and keep the weighted mean of the τ_i that agree with it,

    merged = Σ_i w_i τ_i [sign τ_i = s] / Σ_i w_i [sign τ_i = s]          (0 where none agrees)

the first shard alone (w = 1), each later one with the merged memory (w = 0.4 and 0.6, as the reference), and a new
shard starts from Δ = 0 under a new mask. The side memory that answers inputs is the merged memory with the current
shard merged in the same way (the reference merges the pending shard before it evaluates); before the first merge,
the shard itself.

The edit object is an adaptor: `apply` hooks the projection (and the model, to see each call's attention mask),
`revert` removes the hooks, so the weights are never touched. As with GRACE, adaptors on one module stack and only
the last applied is active; `edit` continues the active one's memory (the sequential protocol), else the one kept by
`commit` or `load_state` (a resumed run), else starts afresh (the batch protocol). The training state lives in the
adaptor: the merged Δ (shared by the adaptors until the next merge) and the current shard's values at its mask.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Hooked
from kedit_ray.editors.toolkit import context_prefixes, pad, target_ids, target_loss
from kedit_ray.io import load_tagged, save_tensors
from kedit_ray.models import LM, TraceDict, check_layer, get_module, token_grid, weight_of
from kedit_ray.options import count, fraction, positive, positive_float
from kedit_ray.requests import EditRequest

# Measured per model in kedit_ray/defaults/<model>.toml, [wise]; without a value, the reference's settings (its
# LLaMA-2-7B layer 27 of 32 taken as a share of the depth).
MEASURED = Measured("wise", {"layer": Rule(int, lambda n: 27 * n // 32, "the reference's 27 of 32"),
                             "lr": Rule(float, 1.0, "the reference's"),
                             "mask_ratio": Rule(float, 0.2, "the reference's"),
                             "alpha": Rule(float, 5.0, "the reference's"), "beta": Rule(float, 20.0, "the reference's"),
                             "gamma": Rule(float, 10.0, "the reference's")})
MERGE_WEIGHTS = (0.4, 0.6)   # TIES weights of a new shard and of the merged memory (the reference's)
STARTS = ("I", "You", "Because", "Yes", "Q: ")   # the reference's starts of its generated context texts
IRRELEVANT_LEN = 20          # tokens per generated irrelevant text
NLL_EVERY = 5                # steps on the margins alone between two checks of the NLL


@dataclass
class WiseParams:
    layer: int | None = option(None, "the layer whose MLP output projection gets a side memory (default: measured "
                               "per model, else 27/32 of the way up)", parse=int)
    module: str = option("mlp_out", "the Arch module whose weight the side memory copies: mlp_out (down_proj), ...")
    lr: float | None = option(None, "SGD's learning rate on the side memory (default: measured per model, else the "
                              "reference's 1.0)", flag="--v-lr", parse=positive_float)
    steps: int = option(70, "max gradient steps per edit", flag="--v-steps", parse=positive)
    stop_loss: float = option(0.02, "an edit stops training once its loss (target NLL plus the margin terms) is "
                              "below this", flag="--v-stop-nll", parse=fraction)
    mask_ratio: float | None = option(None, "ρ, the share of the side memory's entries a shard trains (its random "
                                      "mask; default: measured per model, else the reference's 0.2)",
                                      flag="--wise-mask-ratio", parse=fraction)
    merge_every: int = option(100, "N: edits per shard; then the shard is TIES-merged into the side memory and a new "
                              "one starts", flag="--wise-merge-every", parse=positive)
    density: float = option(0.53, "TIES: the share of each task vector's entries kept (largest magnitudes)",
                            flag="--wise-density", parse=fraction)
    alpha: float | None = option(None, "α: irrelevant inputs' scores are pushed below this (default: measured per "
                                 "model, else the reference's 5)", flag="--wise-alpha", parse=fraction)
    beta: float | None = option(None, "β: edits' scores are pushed above this (default: measured per model, else "
                                "the reference's 20)", flag="--wise-beta", parse=fraction)
    gamma: float | None = option(None, "γ: the least gap between an edit's score and an irrelevant one's (default: "
                                 "measured per model, else the reference's 10)", flag="--wise-gamma", parse=fraction)
    act_ratio: float = option(0.88, "ε = this × the least score of an edit", flag="--wise-act-ratio",
                              parse=positive_float)
    norm_constraint: float = option(1.0, "c, the bound on |W_v' − W_v| per entry", flag="--wise-norm-constraint",
                                    parse=positive_float)
    n_prefixes: int = option(5, "generated context prefixes the prompt is trained after (plus the bare prompt)",
                             flag="--context-prefixes", parse=count)
    prefix_len: int = option(10, "tokens per context prefix", parse=positive)
    n_irrelevant: int = option(20, f"irrelevant inputs: texts the model generates ({IRRELEVANT_LEN} tokens after "
                               f"{', '.join(map(repr, STARTS))} in turn)", flag="--wise-irrelevant", parse=positive)
    seed: int = option(0, "seed of the shards' masks", flag="--wise-seed", parse=count)

    def __post_init__(self):
        for name in ("mask_ratio", "density"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> WiseParams:
        return cls(**d)


# ---------------------------------------------------------------- TIES and the memory

def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its k = int(density · numel) largest magnitudes set to 0 (TIES' trim)."""
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view(tau.shape)


def ties(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merging of task vectors with weights: trim, elect the sign of Σ w_i τ_i (+ on a tie), and the weighted
    mean of the entries that agree with it (see the module docstring), in float64."""
    tau = torch.stack([trim(t.double(), density) for t in taus])
    w = torch.tensor(weights, dtype=torch.float64, device=tau.device).view(-1, *[1] * (tau.dim() - 1))
    sign = torch.where((w * tau).sum(0) >= 0, 1.0, -1.0).to(tau)
    agree = tau.sign() == sign                                       # a zero entry agrees with no sign
    den = (w * agree).sum(0)
    return torch.where(den > 0, (w * tau * agree).sum(0) / den.clamp_min(1e-300), torch.zeros_like(den))


def shard_mask(numel: int, ratio: float, seed: int, shard: int) -> torch.Tensor:
    """A shard's random mask: the flat indices of its ~ratio · numel entries, drawn on the CPU from (seed, shard)."""
    g = torch.Generator().manual_seed((seed << 20) + shard)
    return (torch.rand(numel, generator=g) < ratio).nonzero()[:, 0]


@dataclass(frozen=True)
class Memory:
    """The side memory's training state (CPU tensors): the merged Δ of the finished shards and the current shard."""

    shape: tuple[int, int]       # W_v's [out, in]
    merged: torch.Tensor | None  # Δ of the shards merged so far, float32; None before the first merge
    index: torch.Tensor          # the current shard's mask: flat indices of its entries, int64
    values: torch.Tensor         # the current shard's Δ at those entries, float32
    shard: int                   # the current shard's number (its mask's draw)
    in_shard: int                # edits in the current shard
    edits: int                   # edits in all
    min_act: float               # the least score of an edit when it was made (inf: none yet)

    @classmethod
    def fresh(cls, shape: tuple[int, int], ratio: float, seed: int) -> Memory:
        index = shard_mask(math.prod(shape), ratio, seed, 0)
        return cls(tuple(shape), None, index, torch.zeros(len(index)), 0, 0, 0, math.inf)

    def shard_delta(self) -> torch.Tensor:
        """The current shard's Δ, dense [out, in]."""
        out = torch.zeros(math.prod(self.shape))
        out[self.index] = self.values
        return out.view(self.shape)

    def merge_shard(self, density: float) -> torch.Tensor:
        """The merged memory with the current shard merged in (TIES)."""
        if self.merged is None:
            return ties([self.shard_delta()], [1.0], density).float()
        return ties([self.shard_delta(), self.merged], list(MERGE_WEIGHTS), density).float()

    def side(self, density: float) -> torch.Tensor:
        """Δ of the side memory that answers inputs: the current shard merged in (the shard alone before the first
        merge, the merged memory alone when the shard is empty)."""
        if self.merged is None:
            return self.shard_delta()
        return self.merged if self.in_shard == 0 else self.merge_shard(density)

    def after_edit(self, values: torch.Tensor, act: float, hp: WiseParams) -> Memory:
        """The memory with one more edit in the current shard (its trained values, its score); a full shard is
        merged and a new one drawn."""
        new = replace(self, values=values, in_shard=self.in_shard + 1, edits=self.edits + 1,
                      min_act=min(self.min_act, act))
        if new.in_shard < hp.merge_every:
            return new
        index = shard_mask(math.prod(self.shape), hp.mask_ratio, hp.seed, self.shard + 1)
        return replace(new, merged=new.merge_shard(hp.density), index=index, values=torch.zeros(len(index)),
                       shard=self.shard + 1, in_shard=0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """As tensors (a run's state, an adaptor file); `of` reads them back."""
        counts = torch.tensor([*self.shape, self.shard, self.in_shard, self.edits], dtype=torch.int64)
        out = {"index": self.index, "values": self.values, "counts": counts,
               "min_act": torch.tensor([self.min_act], dtype=torch.float64)}
        return out | ({"merged": self.merged} if self.merged is not None else {})

    @classmethod
    def of(cls, t: dict[str, torch.Tensor]) -> Memory:
        try:
            rows, cols, shard, in_shard, edits = t["counts"].tolist()
            return cls((rows, cols), t.get("merged"), t["index"].long(), t["values"].float(), shard, in_shard, edits,
                       float(t["min_act"].item()))
        except (KeyError, ValueError) as e:
            raise ValueError(f"not a WISE memory: {e} (has {sorted(t)})") from None


# ---------------------------------------------------------------- the adaptor

def _call_of(args: tuple, kwargs: dict) -> tuple[int, int, torch.Tensor | None, int]:
    """A model call's rows and new positions, which of those are real (not padding; None: all), and how many
    positions of each row earlier calls saw (a KV cache)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs["inputs_embeds"][..., 0]
    b, t = x.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return b, t, mask[:, -t:].bool(), mask.shape[1] - t
    cache = kwargs.get("past_key_values", kwargs.get("cache"))      # transformers 4's name, 5's
    return b, t, None, cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0


class WiseAdaptor(Hooked):
    """The side memory of one module, routed by the activation score against the threshold `eps`."""

    what = "WISE adaptor"

    def __init__(self, module: str, memory: Memory, eps: float, density: float, meta: dict | None = None):
        self.module, self.memory, self.eps, self.density = module, memory, eps, density
        self.meta = {**(meta or {}), "threshold": eps, "side_edits": memory.edits}
        self.meta["checkpoint"] = {"side_edits": memory.edits, "merges": memory.shard, "threshold": eps}
        self._side: torch.Tensor | None = None            # Δ of the side memory, built when first needed
        self._call = None                                 # the model call under way (_call_of)
        self._run: tuple[torch.Tensor, torch.Tensor] | None = None   # per row: Σ ‖Δ a_t‖ and positions so far

    def side(self, device: torch.device | None = None) -> torch.Tensor:
        """Δ = W_v' − W_v of the side memory, float32 [out, in]."""
        if self._side is None:
            self._side = self.memory.side(self.density)
        if device is not None and self._side.device != device:
            self._side = self._side.to(device)
        return self._side

    # ------------------------------------------------------------ routing
    def route(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The module's output given its input a [..., d_in] and the main memory's output `out` [..., d_out]."""
        wide = torch.promote_types(a.dtype, torch.float32)
        y = a.to(wide) @ self.side(a.device).to(wide).T                    # Δ a_t
        norms = y.norm(dim=-1)
        b, t, real, past = self._call if self._call is not None and self._call[0] * self._call[1] == norms.numel() \
            else (*norms.reshape(-1, norms.shape[-1]).shape, None, 0)     # called outside a model call: rows of a
        norms = norms.reshape(b, t)
        real = torch.ones_like(norms) if real is None else real.to(norms)
        total, n = (norms * real).sum(1), real.sum(1)
        if past and self._run is not None and len(self._run[0]) == b:      # a cached call goes on from the last
            total, n = total + self._run[0], n + self._run[1]
        self._run = (total, n)
        hit = total / n.clamp_min(1) > self.eps                           # Δ_act(x) > ε
        if not hit.any():
            return out                                                    # the same tensor: bit-identical
        rows = hit[:, None].expand(b, t).reshape(out.shape[:-1])
        return torch.where(rows[..., None], (out.to(wide) + y.reshape(out.shape)).to(out.dtype), out)

    # ------------------------------------------------------------ the edit-object interface
    def place(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.module)

    def hooks(self, model: nn.Module, stack: list) -> list:
        def begin(_m, args, kwargs):
            self._call = _call_of(args, kwargs) if stack[-1] is self else None

        def end(_m, _args, _kwargs, _out):
            self._call = None

        def hook(_m, args, kwargs, out):
            if stack[-1] is not self:                                     # superseded, or an edit is training
                return out
            return self.route(args[0] if args else next(iter(kwargs.values())), out)

        for other in stack[:-1]:                                          # superseded: free their dense Δ
            if other is not None:
                other._side = None
        return [model.register_forward_pre_hook(begin, with_kwargs=True),
                model.register_forward_hook(end, with_kwargs=True, always_call=True),
                self.place(model).register_forward_hook(hook, with_kwargs=True)]

    def reset(self) -> None:
        self._side, self._call, self._run = None, None, None

    def norms(self) -> dict[str, float]:
        return {self.module: self.side().norm().item()}

    def check_model(self, model_name: str, fingerprint: str) -> None:
        """Refuse an adaptor made for another model."""
        if self.meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"this WISE adaptor was made for {self.meta.get('model')!r} (fingerprint "
                             f"{self.meta.get('fingerprint')}), not for {model_name!r} ({fingerprint})")

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """safetensors: the memory (merged Δ, the current shard's mask and values, counts); JSON metadata: the
        module, ε, the TIES density and `meta` (layer, model, fingerprint, params)."""
        info = {"module": self.module, "eps": self.eps, "density": self.density, "meta": self.meta}
        return save_tensors(path, self.memory.tensors(), {"kedit_wise": json.dumps(info, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> WiseAdaptor:
        t, info = load_tagged(path, "kedit_wise", "a WISE adaptor file")
        info = json.loads(info)
        return cls(info["module"], Memory.of(t), float(info["eps"]), float(info["density"]), info["meta"])


def active_adaptor(model: nn.Module, module: str) -> WiseAdaptor | None:
    """The WISE adaptor currently active on `module`, if any."""
    return WiseAdaptor.active(get_module(model, module))


# ---------------------------------------------------------------- the editor

def generated(lm: LM, n: int, length: int, seed: int) -> list[str]:
    """n texts the model writes (top-5 sampling, seeded) after the reference's starts of its generated texts, in
    turn: the irrelevant inputs."""
    lm.tok.padding_side = "left"
    try:
        enc = lm.tok([STARTS[i % len(STARTS)] for i in range(n)], return_tensors="pt", padding=True)
    finally:
        lm.tok.padding_side = "right"
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = lm.model.generate(**enc.to(lm.input_device), do_sample=True, top_k=5, max_new_tokens=length,
                                min_new_tokens=length, pad_token_id=lm.tok.pad_token_id)
    return lm.tok.batch_decode(out, skip_special_tokens=True)


def inputs_at(lm: LM, name: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs a_t of module `name` for `texts` [K, T, d_in] (float32, no adaptor routing) and which positions
    are real [K, T]."""
    ids, mask = pad([lm.tok(t).input_ids for t in texts], lm.tok.pad_token_id, lm.input_device)
    with torch.no_grad(), WiseAdaptor.suspended(get_module(lm.model, name)), \
            TraceDict(lm.model, [name], retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids, attention_mask=mask)
    return token_grid(tr[name].input, ids).float(), mask.float()


def scores(a: torch.Tensor, real: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Δ_act per row: the mean over its real positions of ‖Δ a_t‖. a [rows, T, d_in], real [rows, T]."""
    return ((a @ delta.T).norm(dim=-1) * real).sum(1) / real.sum(1)


def margin_loss(s_e: torch.Tensor, s_o: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """mean⁺(s_o − s_e + γ) over pairs + mean⁺(s_o − α) + mean⁺(β − s_e), mean⁺ the mean of the positive terms."""
    def mean_pos(x):
        x = x[x > 0]
        return x.mean() if len(x) else s_e.new_zeros(())
    return mean_pos(s_o[:, None] - s_e[None] + gamma) + mean_pos(s_o - alpha) + mean_pos(beta - s_e)


class Wise(Editor):
    name = "wise"
    kind = "adaptor"   # its edits are a side memory routed by a forward hook, not weight Deltas
    refusal = ("WISE edits are an adaptor (a side memory of one MLP projection that a router answers from when an "
               "input activates it), not a change of weights, so they cannot be merged into a model directory; save "
               "the adaptor with --save and apply it with kedit_ray.editors.WiseAdaptor.load(path).apply(model)")

    def __init__(self, params: WiseParams | None = None):
        self.hp = params or WiseParams()
        self.kept: Memory | None = None      # the memory of the edits committed (or loaded by load_state)
        self._irrelevant: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, lm: LM) -> int:
        return check_layer(lm.model, self.hp.layer if self.hp.layer is not None else MEASURED.value(lm, "layer"))

    def setting(self, lm: LM, name: str) -> float:
        given = getattr(self.hp, name)
        return given if given is not None else MEASURED.value(lm, name)

    def prefixes(self, lm: LM) -> list[str]:
        return context_prefixes(lm, self.hp.n_prefixes, self.hp.prefix_len)

    def irrelevant(self, lm: LM, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The irrelevant inputs' activations at `name` [K, T, d_in] (float32) and which positions are real
        [K, T], once per model and module."""
        key = (id(lm.model), name)
        if key not in self._irrelevant:
            with WiseAdaptor.suspended(get_module(lm.model, name)):
                texts = generated(lm, self.hp.n_irrelevant, IRRELEVANT_LEN, self.hp.seed)
            self._irrelevant[key] = inputs_at(lm, name, texts)
        return self._irrelevant[key]

    def prepare(self, lm: LM) -> None:
        """On the unedited model: the context prefixes and the irrelevant inputs."""
        self.prefixes(lm)
        self.irrelevant(lm, lm.arch.name(self.hp.module, self.layer(lm)))

    def edit(self, lm: LM, request: EditRequest) -> WiseAdaptor:
        """A new adaptor: the memory continued (the active adaptor's, else the kept one, else a fresh one) with
        this edit trained into its current shard."""
        hp, t0 = replace(self.hp, mask_ratio=self.setting(lm, "mask_ratio")), time.perf_counter()
        layer = self.layer(lm)
        name, block = lm.arch.name(hp.module, layer), lm.arch.name("layer", layer)
        module = get_module(lm.model, name)
        shape = tuple(weight_of(module).shape)
        cur = active_adaptor(lm.model, name)
        memory = cur.memory if cur is not None else self.kept if self.kept is not None else \
            Memory.fresh(shape, hp.mask_ratio, hp.seed)
        if memory.shape != shape:
            raise ValueError(f"the WISE memory is {memory.shape}, {name}'s weight {shape}")
        lr, alpha, beta, gamma = (self.setting(lm, k) for k in ("lr", "alpha", "beta", "gamma"))

        # rows: prefix + prompt + target (teacher-forced), the residual entering the layer and the inputs a_t
        y = target_ids(lm, request.target_new)
        ctxs = [lm.tok(p + request.text).input_ids for p in self.prefixes(lm)]
        ids, mask = pad([c + y[:-1] for c in ctxs], lm.tok.pad_token_id, lm.input_device)
        others = [self.irrelevant(lm, name)]                              # irrelevant inputs: (a_t, real)
        if request.neighborhood_prompts:               # and the request's unrelated prompts (the reference's loc)
            others.append(inputs_at(lm, name, request.neighborhood_prompts))
        with torch.no_grad(), WiseAdaptor.suspended(module), \
                TraceDict(lm.model, [block, name], retain_input=True, stop=True) as tr:
            lm.model(input_ids=ids, attention_mask=mask)
        cached, a_e, real_e = tr[block].input, token_grid(tr[name].input, ids).float(), mask.float()
        dev = lm.device_of(lm.arch.lm_head)
        rows = torch.tensor([r for r, _ in enumerate(ctxs) for _ in y], device=dev)
        cols = torch.tensor([len(c) - 1 + j for c in ctxs for j in range(len(y))], device=dev)
        tgt = torch.tensor(y * len(ctxs), device=dev)
        t1 = time.perf_counter()

        # masked SGD on the shard's Δ, the side memory answering every row (the reference's editing mode)
        wdev = lm.device_of(name)
        delta = memory.shard_delta().to(wdev).requires_grad_(True)
        keep = torch.zeros(math.prod(shape), device=wdev)
        keep[memory.index.to(wdev)] = 1.0
        keep = keep.view(shape)
        opt = torch.optim.SGD([delta], lr=lr)
        a_e, real_e = a_e.to(wdev), real_e.to(wdev)
        others = [(a.to(wdev), real.to(wdev)) for a, real in others]

        def side(_m, args, kwargs, out):                                  # W_v' a = W_v a + Δ a
            a = args[0] if args else next(iter(kwargs.values()))
            wide = torch.promote_types(a.dtype, torch.float32)
            return (out.to(wide) + a.to(wide) @ delta.to(wide).T).to(out.dtype)

        nll, passes, joint, since = math.inf, 0, True, 0
        with WiseAdaptor.suspended(module):
            handle = module.register_forward_hook(side, with_kwargs=True)
            try:
                for steps in range(hp.steps + 1):                         # steps: the updates made so far
                    with torch.enable_grad():
                        s_e = scores(a_e, real_e, delta)
                        s_o = torch.cat([scores(a, real, delta) for a, real in others])
                        loss = margin_loss(s_e, s_o, alpha, beta, gamma)
                    last, check = steps == hp.steps, loss.item() == 0 or (steps - since) % NLL_EVERY == 0
                    if joint or check or last:                            # the target's NLL: the costly pass
                        ft = target_loss(lm, layer, cached, ids, mask, rows, cols, tgt)
                        nll, passes = ft.item(), passes + 1
                        loss = loss.to(ft.device) + ft
                        if loss.item() < hp.stop_loss or last:
                            break
                        joint, since = nll >= hp.stop_loss, steps         # below: its gradient is ~0, skip it
                    opt.zero_grad()
                    loss.backward()
                    delta.grad.mul_(keep)                                 # the shard's mask
                    opt.step()
                    with torch.no_grad():
                        delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
            finally:
                handle.remove()
        act, out_act = s_e.mean().item(), s_o.max().item()
        values = delta.detach().flatten()[memory.index.to(wdev)].cpu()
        memory = memory.after_edit(values, act, hp)
        eps = hp.act_ratio * memory.min_act
        return WiseAdaptor(name, memory, eps, hp.density, {
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer, "module": name,
            "case_id": request.case_id, "v_steps": steps, "v_nll": nll, "nll_passes": passes, "edit_act": act,
            "irrelevant_act": out_act, "lr": lr, "margins": [alpha, beta, gamma], "params": asdict(hp),
            "key_s": t1 - t0, "value_s": time.perf_counter() - t1})

    # ------------------------------------------------------------ the sequential protocol
    def commit(self, lm: LM, requests: list[EditRequest]) -> None:
        """The edits applied for good: keep the active memory (a run's state)."""
        cur = active_adaptor(lm.model, lm.arch.name(self.hp.module, self.layer(lm)))
        if cur is not None:
            self.kept = cur.memory

    def reset(self) -> None:
        self.kept = None

    def state(self) -> dict[str, torch.Tensor]:
        """The kept memory as tensors (float32 Δ, int64 indices and counts)."""
        return self.kept.tensors() if self.kept is not None else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.kept = Memory.of(state) if state else None

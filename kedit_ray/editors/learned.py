"""What the learned editors (KE, MEND) share: the batch of rows, the gradient of the edited matrices, ΔW added
through forward hooks, the losses, the checkpoint, and the editor that applies a trained network.

Notation (De Cao et al. 2021; Mitchell et al. 2022): x the edit prompt, a = o* its new answer, P^x the
equivalent inputs (x and its paraphrases), O^x unrelated inputs whose predictions must stay. For an edited
linear layer W [out, in] with input u_t and output gradient δ_t at token t: ∇_W L = Σ_t δ_t u_tᵀ.

Training never writes the model's weights: W' x = W x + ΔW x is added by a forward hook, each row of a batch
with its own request's ΔW, and the second pass starts from the residual stream cached by the first.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Delta
from kedit_ray.editors.toolkit import pad, target_ids
from kedit_ray.io import save_tensors, write_json
from kedit_ray.models import LM, Trace, TraceDict, get_module, head_at, start_at_layer, token_grid, weight_of
from kedit_ray.requests import EditRequest

META_FILE = "editor.json"


# ---------------------------------------------------------------- what is edited

@dataclass
class NetConfig:
    """Which matrices a network edits: `modules` (Arch fields) of `layers` (None: the per-model default)."""

    layers: list[int] | None = None
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])

    def default_layers(self, lm: LM) -> list[int]:
        raise NotImplementedError

    def resolve(self, lm: LM) -> None:
        """Fix the layers (the default when none are given) and check they exist."""
        self.layers = sorted(self.layers if self.layers is not None else self.default_layers(lm))
        bad = [x for x in self.layers if not 0 <= x < lm.n_layers]
        if not self.layers or bad:
            raise ValueError(f"layers {self.layers}: the model has layers 0..{lm.n_layers - 1}")

    @classmethod
    def from_dict(cls, d: dict):
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(d) - known):
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def edited_names(lm: LM, layers: list[int], modules: list[str]) -> list[str]:
    """Module names of the edited matrices, lowest layer first."""
    return [lm.arch.name(m, layer) for layer in sorted(layers) for m in modules]


def module_key(name: str) -> str:
    """A module name as an nn.ModuleDict key (no dots)."""
    return name.replace(".", "/")


def shapes_of(lm: LM, names: list[str]) -> dict[str, tuple[int, int]]:
    """W's [out, in] per edited module."""
    return {n: tuple(weight_of(get_module(lm.model, n)).shape) for n in names}


def condition_text(req: EditRequest) -> str:
    """KE's conditioning input: "old >> new || input"."""
    return f"{req.target_true} >> {req.target_new} || {req.text}"


# ---------------------------------------------------------------- one batch of rows

@dataclass
class Rows:
    """R requests as one padded batch. Per request: its x row (teacher-forced with a), its paraphrase rows, its
    O^x rows. Positions are (row, column) pairs whose next-token distribution a loss reads."""

    ids: torch.Tensor                   # [N, T]
    mask: torch.Tensor
    req: torch.Tensor                   # [N] the request of each row: whose ΔW it sees
    x_rows: torch.Tensor                # [R] each request's x row
    edit: tuple[torch.Tensor, ...]      # (rows, cols, target token) of a after x: ∇_W L(W; x, a)
    equiv: tuple[torch.Tensor, ...]     # the same over P^x (x included): L(θ'; x̂, a)
    loc: tuple[torch.Tensor, ...]       # (rows, cols) on O^x: C_KL(θ, θ'; O^x)
    cond: list[str] = field(default_factory=list)


def build_rows(lm: LM, requests: list[EditRequest], unrelated: list[list[tuple[str, str]]] | None = None,
               paraphrases: bool = True, loc_tokens: int = 8) -> Rows:
    """`unrelated[i]`: (prompt, answer) pairs of O^x for request i; positions are the prompt's last token and
    the answer's first `loc_tokens - 1` tokens (teacher-forced); an empty answer leaves the last token alone."""
    rows, req, x_rows, edit, equiv, loc = [], [], [], [], [], []
    for q, r in enumerate(requests):
        y = target_ids(lm, r.target_new)
        for k, prompt in enumerate([r.text] + (list(r.paraphrase_prompts) if paraphrases else [])):
            ctx = lm.tok(prompt).input_ids
            i = len(rows)
            rows.append(ctx + y[:-1])
            req.append(q)
            at = [(i, len(ctx) - 1 + j, t) for j, t in enumerate(y)]
            equiv += at
            if k == 0:
                x_rows.append(i)
                edit += at
        for prompt, answer in (unrelated[q] if unrelated else []):
            ctx = lm.tok(prompt).input_ids
            ans = target_ids(lm, answer)[:loc_tokens - 1] if answer.strip() else []
            loc += [(len(rows), len(ctx) - 1 + j) for j in range(len(ans) + 1)]
            rows.append(ctx + ans)
            req.append(q)
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    cols = lambda xs: tuple(torch.tensor([x[j] for x in xs], dtype=torch.long) for j in range(len(xs[0])))  # noqa
    return Rows(ids, mask, torch.tensor(req), torch.tensor(x_rows), cols(edit), cols(equiv),
                cols(loc) if loc else (torch.zeros(0, dtype=torch.long),) * 2, [condition_text(r) for r in requests])


def _log_probs(lm: LM, rows: Rows, positions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run the model on `rows` (inside whatever hooks are active); log-probabilities [P, vocab] at `positions`."""
    dev = lm.device_of(lm.arch.lm_head)
    with head_at(lm.model, lm.arch.lm_head, positions[0].to(dev), positions[1].to(dev)):
        logits = lm.model(input_ids=rows.ids, attention_mask=rows.mask).logits[0]
    return torch.log_softmax(logits.float(), -1)


def _nll(lp: torch.Tensor, tok: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Per-row mean token NLL [rows present], in ascending row order."""
    tok_nll = -lp.gather(1, tok.to(lp.device)[:, None])[:, 0]
    _, inv = torch.unique(row, return_inverse=True)
    inv = inv.to(lp.device)
    n = int(inv.max()) + 1
    return (torch.zeros(n, device=lp.device).index_add(0, inv, tok_nll)
            / torch.bincount(inv, minlength=n).to(lp.device))


# ---------------------------------------------------------------- the two passes

@dataclass
class Grads:
    """Pass 1 on the unedited model: per edited matrix the x rows' inputs u [R, T, in] and output gradients
    δ [R, T, out], the tokens that count [R, T], the residual entering the lowest edited layer, and the
    log-probabilities on O^x (the reference of C_KL)."""

    u: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    tokens: torch.Tensor
    cached: torch.Tensor
    loc_lp: torch.Tensor
    nll: torch.Tensor                   # [R] L(W; x, a) before the edit

    def grad(self, name: str) -> torch.Tensor:
        """∇_W L = Σ_t δ_t u_tᵀ per request: [R, out, in]."""
        return torch.einsum("rto,rti->roi", self.delta[name], self.u[name])


def base_pass(lm: LM, names: list[str], first_layer: int, rows: Rows) -> Grads:
    """One forward and one backward of Σ_requests L(W; x, a) on the unedited model. Each edited module's output
    gets a zero tensor z added: ∂L/∂z = δ."""
    zs: dict[str, torch.Tensor] = {}

    def add_zero(out, name):
        zs[name] = torch.zeros_like(out, requires_grad=True)
        return out + zs[name]

    n_edit = len(rows.edit[0])
    positions = tuple(torch.cat([a, b]) for a, b in zip(rows.edit[:2], rows.loc))
    with torch.enable_grad(), TraceDict(lm.model, names, retain_input=True, edit_output=add_zero) as t, \
            Trace(lm.model, lm.arch.name("layer", first_layer), retain_input=True) as resid:
        lp = _log_probs(lm, rows, positions)
        nll = _nll(lp[:n_edit], rows.edit[2], rows.edit[0])
        dz = torch.autograd.grad(nll.sum(), [zs[n] for n in names])
    x = rows.x_rows.to(rows.ids.device)
    return Grads({n: token_grid(t[n].input, rows.ids)[x].float() for n in names},
                 {n: token_grid(d, rows.ids)[x].float() for n, d in zip(names, dz)},
                 rows.mask[x].float(), resid.input, lp[n_edit:].detach(), nll.detach())


def edited_pass(lm: LM, first_layer: int, rows: Rows, grads: Grads, deltas: dict[str, torch.Tensor]) -> dict:
    """Pass 2 with W' = W + ΔW (ΔW [R, out, in], row i sees its request's): L(θ'; P^x, a) per equivalent row and
    C_KL(θ, θ'; O^x) = KL(p_θ ‖ p_θ') per O^x position. Gradients flow into ΔW."""
    req = rows.req.to(rows.ids.device)

    def add_delta(out, name):                                       # W' x = W x + ΔW x, ΔW of the row's request
        x = token_grid(t[name].input, rows.ids).float()
        return out + torch.einsum("nti,noi->nto", x, deltas[name][req]).to(out.dtype).view(out.shape)

    n_eq = len(rows.equiv[0])
    positions = tuple(torch.cat([a, b]) for a, b in zip(rows.equiv[:2], rows.loc))
    with torch.enable_grad(), start_at_layer(lm.model, lm.arch.layer, first_layer, grads.cached), \
            TraceDict(lm.model, list(deltas), retain_input=True, edit_output=add_delta, detach=False) as t:
        lp = _log_probs(lm, rows, positions)
    nll = _nll(lp[:n_eq], rows.equiv[2], rows.equiv[0])
    kl = (grads.loc_lp.exp() * (grads.loc_lp - lp[n_eq:])).sum(-1)
    return {"nll": nll.mean(), "kl": kl.mean() if len(kl) else lp.new_zeros(())}


# ---------------------------------------------------------------- the hypernetwork

class HyperNet(nn.Module):
    """Maps what pass 1 saw to ΔW per edited matrix. Subclasses: KE, MEND; `cfg` is their JSON-able config."""

    method = ""
    conditioned = False        # reads the edit's text ("old >> new || input") as well as the gradient

    def __init__(self, cfg, shapes: dict[str, tuple[int, int]], embed_dim: int):
        super().__init__()
        self.cfg, self.shapes, self.embed_dim = cfg, shapes, embed_dim

    def forward(self, grads: Grads, cond: torch.Tensor | None, cond_mask: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def objective(self, terms: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss to minimise, the figures to show); `progress` = step / steps."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """Adam's parameter groups (a subclass gives a few parameters their own rate)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def ascent_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by gradient ascent (a Lagrange multiplier)."""
        return []

    def update_stats(self, grads: Grads) -> None:
        """Running statistics kept outside gradient descent (MEND's normalisation)."""


def conditioning(lm: LM, rows: Rows, needed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The conditioning texts through the model's own (frozen) token embeddings: [R, T, d] and mask."""
    if not needed:
        return None, None
    ids, mask = pad([lm.tok(c).input_ids for c in rows.cond], lm.tok.pad_token_id, lm.input_device)
    with torch.no_grad():
        return get_module(lm.model, lm.arch.embed)(ids).float(), mask


def step_terms(lm: LM, net: HyperNet, names: list[str], first_layer: int, rows: Rows,
               train: bool = True) -> tuple[dict, Grads]:
    """Pass 1, the network, pass 2: the loss terms of one batch (nll, kl) with gradients into the network."""
    grads = base_pass(lm, names, first_layer, rows)
    if train:
        net.update_stats(grads)
    deltas = net(grads, *conditioning(lm, rows, net.conditioned))
    terms = edited_pass(lm, first_layer, rows, grads, deltas)
    terms["nll0"] = grads.nll.mean()
    return terms, grads


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(out: str | Path, net: HyperNet, meta: dict, optim: dict[str, torch.Tensor] | None = None
                    ) -> Path:
    """OUT/editor-STEP.safetensors (the network) and OUT/optim-STEP.safetensors (Adam's state), then OUT/editor.json
    (method, model, fingerprint, configs, step, and those two file names), each atomic: editor.json always names a
    complete pair. Files of other steps are removed once it does."""
    out = Path(out)
    step = meta["step"]
    files = {"weights": f"editor-{step:06d}.safetensors"}
    save_tensors(out / files["weights"], net.state_dict(), {"step": str(step)})
    if optim is not None:
        files["optimizer"] = f"optim-{step:06d}.safetensors"
        save_tensors(out / files["optimizer"], optim, {"step": str(step)})
    path = write_json(out / META_FILE, {**meta, **files})
    for old in [*out.glob("editor-*.safetensors"), *out.glob("optim-*.safetensors")]:
        if old.name not in files.values():
            old.unlink(missing_ok=True)
    return path


def read_meta(out: str | Path) -> dict | None:
    """OUT/editor.json, or None when OUT holds no checkpoint."""
    path = Path(out) / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("method", "model", "fingerprint", "net", "step", "weights"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} is missing; not a kedit editor checkpoint")
    return meta


def check_fingerprint(meta: dict, lm: LM, where: str | Path) -> None:
    if meta["fingerprint"] != lm.fingerprint:
        raise ValueError(f"{where}: this editor was trained for {meta['model']!r} (fingerprint {meta['fingerprint']}), "
                         f"not for the loaded {lm.name!r} ({lm.fingerprint}); train one for this model")


def load_tensors(out: str | Path, meta: dict, key: str) -> dict[str, torch.Tensor]:
    """The tensors of the file editor.json names under `key` ("weights", "optimizer"), checked to be its step's."""
    from safetensors import safe_open

    path = Path(out) / meta.get(key, f"<no {key!r} in editor.json>")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (named by {Path(out) / META_FILE}, field {key!r})")
    with safe_open(str(path), framework="pt") as f:
        found = (f.metadata() or {}).get("step")
        if found != str(meta["step"]):
            raise ValueError(f"{path}: written at step {found}, but {META_FILE} is at step {meta['step']}")
        return {k: f.get_tensor(k) for k in f.keys()}


def load_weights(net: HyperNet, out: str | Path, meta: dict) -> None:
    """The network's weights from OUT, refused with the file named when they are not its layout."""
    try:
        net.load_state_dict(load_tensors(out, meta, "weights"))
    except RuntimeError as e:
        raise ValueError(f"{Path(out) / meta['weights']}: not the network {META_FILE} describes (written by another "
                         f"kedit version?); train it again ({str(e).splitlines()[0]})") from None


def make_net(lm: LM, net_cls: type, cfg_cls: type, cfg: dict) -> tuple[HyperNet, list[str]]:
    """A network of class `net_cls` for `lm` from its config dict (`cfg_cls` fields); by method name:
    kedit_ray.editors.nets.build_net."""
    c = cfg_cls.from_dict(cfg)
    c.resolve(lm)
    names = edited_names(lm, c.layers, c.modules)
    embed = get_module(lm.model, lm.arch.embed).weight.shape[1]
    return net_cls(c, shapes_of(lm, names), embed), names


def read_net(lm: LM, out: str | Path, method: str, net_cls: type, cfg_cls: type) -> tuple[HyperNet, list[str], dict]:
    """The trained `method` network in OUT for `lm`: refuses another method's or another model's checkpoint."""
    meta = read_meta(out)
    if meta is None:
        raise FileNotFoundError(f"{Path(out) / META_FILE}: no editor checkpoint there; train one with "
                                f"`kedit train --method {method} --out {out}`")
    if meta["method"] != method:
        raise ValueError(f"{Path(out) / META_FILE}: a {meta['method']!r} checkpoint, not {method!r}")
    check_fingerprint(meta, lm, Path(out) / META_FILE)
    net, names = make_net(lm, net_cls, cfg_cls, meta["net"])
    load_weights(net, out, meta)
    return net.eval(), names, meta


# ---------------------------------------------------------------- the editor

@dataclass
class LearnedParams:
    editor_checkpoint: str | None = option(None, "the trained network, a `kedit train --out` directory "
                                           "(required)")

    @classmethod
    def from_dict(cls, d: dict) -> LearnedParams:
        return cls(**d)


class LearnedEditor(Editor):
    """Edits with a trained network: one forward and backward on x, one pass of the network, ΔW as a Delta.
    Subclasses name their network's classes in `net` (HyperNet class, its config class)."""

    net: tuple[type, type]

    def __init__(self, params: LearnedParams | None = None):
        self.hp = params or LearnedParams()
        self._loaded: tuple[str, HyperNet, list[str], dict] | None = None

    def _net(self, lm: LM) -> tuple[HyperNet, list[str], dict]:
        if not self.hp.editor_checkpoint:
            raise ValueError(f"--method {self.name} needs a trained network: pass --editor-checkpoint DIR "
                             f"(make one with `kedit train --method {self.name}`)")
        if self._loaded is None or self._loaded[0] != lm.fingerprint:
            self._loaded = (lm.fingerprint, *read_net(lm, self.hp.editor_checkpoint, self.name, *self.net))
        return self._loaded[1:]

    @torch.no_grad()
    def edit(self, lm: LM, request: EditRequest) -> Delta:
        t0 = time.perf_counter()
        net, names, meta = self._net(lm)
        rows = build_rows(lm, [request], paraphrases=False)
        first = min(net.cfg.layers)
        grads = base_pass(lm, names, first, rows)
        deltas = net(grads, *conditioning(lm, rows, net.conditioned))
        return Delta({n: d[0].float() for n, d in deltas.items()}, {   # Delta.apply casts once to W's dtype
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "layers": net.cfg.layers,
            "modules": names, "case_id": request.case_id, "editor_checkpoint": str(self.hp.editor_checkpoint),
            "trained_steps": meta["step"], "value_s": time.perf_counter() - t0})

"""Keys and values shared by the locate-then-edit editors (ROME, MEMIT, AlphaEdit).

k*: the input of a layer's MLP output projection at the subject's last token, averaged over the
    prompt and a few generated context prefixes.
v*: the output that makes the model emit o*: v* = v0 + δ, with δ optimised on the rewriting prompts
    plus a KL "essence" term on "{subject} is a", under ||δ|| ≤ clamp · ||v0||.
    `module` says whose output δ is added to: "mlp_out" (ROME's v*, v0 = W k*) or "layer" (MEMIT's z,
    the residual stream leaving the block, v0 = its value at the subject's last token of the bare prompt).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kedit_ray.editors.contract import option
from kedit_ray.models import LM, Trace, head_at, start_at_layer, token_grid
from kedit_ray.models.weights import bias, weight
from kedit_ray.options import fraction, positive, positive_float
from kedit_ray.requests import EditRequest

ESSENCE = "{} is a"
PAPER_CLAMP = 4.0  # ROME's norm bound on δ, in units of ||v0||


@dataclass
class ValueParams:
    steps: int = option(25, "max gradient steps on δ (v*, MEMIT's z)", flag="--v-steps", parse=positive)
    lr: float = option(0.5, "Adam's learning rate on δ", flag="--v-lr", parse=positive_float)
    weight_decay: float = option(0.5, "weight of ||δ|| / ||v0||² in v*'s loss", flag="--v-weight-decay",
                                 parse=fraction)
    clamp_norm: float | None = option(None, "bound on ||δ|| in units of ||v0|| (default: measured per model, else "
                                      "the paper's 4)", flag="--v-clamp", parse=positive_float)
    kl_factor: float = option(0.0625, "weight of the essence drift (KL on '{subject} is a') in v*'s loss",
                              flag="--v-kl", parse=fraction)
    stop_nll: float = option(0.05, "a request stops (its δ is final) once its target NLL is below this",
                             flag="--v-stop-nll", parse=fraction)
    # the three savings, switchable for the benchmark
    cache_residual: bool = option(True, "run every layer at each step, not only those from the edited one up on "
                                  "the cached residual stream (for benchmarks)", flag="--no-v-cache", sets=False)
    gather_logits: bool = option(True, "compute the vocabulary logits at every position, not only where the loss "
                                 "reads them (for benchmarks)", flag="--no-v-gather", sets=False)
    early_stop: bool = option(True, "keep every request of a batch training to the last step (for benchmarks)",
                              flag="--no-v-early-stop", sets=False)


# ---------------------------------------------------------------- tokenisation helpers

def target_ids(lm: LM, target: str) -> list[int]:
    ids = lm.tok(" " + target.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def subject_last_index(lm: LM, text: str, subject: str) -> int:
    """Index of the last token of the last occurrence of `subject` in `text` (as the model tokenises it)."""
    end = text.rindex(subject) + len(subject)
    offsets = lm.tok(text, return_offsets_mapping=True).offset_mapping
    idx = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
    return idx[-1]


def band_modules(lm: LM, who: str, layers: list[int], modules: list[str], flag: str) -> list[str]:
    """The names of `modules` (Arch fields, or templates such as 'model.layers.{}.mlp.up_proj') at each of `layers`,
    checked to exist; errors name the editor `who` and its `flag`."""
    if not layers or not all(0 <= x < lm.n_layers for x in layers):
        raise ValueError(f"{who} layers {layers}: the model has layers 0..{lm.n_layers - 1}")
    if not modules:
        raise ValueError(f"{who} needs at least one module")
    names = [m.format(x) if "{" in m else lm.arch.name(m, x) for x in layers for m in modules]
    have = dict(lm.model.named_modules())
    if missing := [n for n in names if n not in have]:
        raise ValueError(f"{who} modules {missing[:3]} are not in {lm.name} ({flag} takes Arch fields "
                         f"such as mlp_in, mlp_out, or templates such as 'model.layers.{{}}.mlp.up_proj')")
    return names


def pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask)."""
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


_PREFIXES: dict[tuple[int, int, int, int], list[str]] = {}


def context_prefixes(lm: LM, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """ROME's context templates: "" plus n short texts the model generates itself (top-5 sampling), each
    followed by ". ". Cached per model."""
    key = (id(lm.model), n, length, seed)
    if key not in _PREFIXES:
        texts = [""]
        if n:
            bos = lm.tok.bos_token_id if lm.tok.bos_token_id is not None else lm.tok.eos_token_id
            ids = torch.full((n, 1), bos, dtype=torch.long, device=lm.input_device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                        max_new_tokens=length, min_new_tokens=length,
                                        pad_token_id=lm.tok.pad_token_id)
            texts += [lm.tok.decode(o[1:], skip_special_tokens=True).replace("{", "").replace("}", "").strip()
                      + ". " for o in out]
        _PREFIXES[key] = texts
    return _PREFIXES[key]


# ---------------------------------------------------------------- keys

@torch.no_grad()
def compute_keys(lm: LM, layer: int, requests: list[EditRequest], prefixes: list[str],
                 module: str = "mlp_out") -> torch.Tensor:
    """k* per request: [n_requests, d_in] in float32, the module's input at the subject's last token, averaged
    over the context prefixes. One forward pass, stopped right after the module."""
    texts = [p + r.text for r in requests for p in prefixes]
    subjects = [r.subject for r in requests for _ in prefixes]
    rows = [lm.tok(t).input_ids for t in texts]
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    name = lm.arch.name(module, layer)
    with Trace(lm.model, name, retain_input=True, stop=True) as t:
        lm.model(input_ids=ids, attention_mask=mask)
    at = torch.tensor([subject_last_index(lm, x, s) for x, s in zip(texts, subjects)], device=t.input.device)
    k = token_grid(t.input, ids)[torch.arange(len(texts), device=at.device), at].float()
    return k.view(len(requests), len(prefixes), -1).mean(1)


# ---------------------------------------------------------------- values

@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    edit_rows: torch.Tensor      # where δ goes: (row, position) at each subject's last token
    edit_cols: torch.Tensor
    edit_req: torch.Tensor       # which request's δ
    loss_rows: torch.Tensor      # (row, position) whose logits predict a target token
    loss_cols: torch.Tensor
    loss_tok: torch.Tensor
    loss_req: torch.Tensor
    kl_rows: torch.Tensor        # (row, position) of each essence prompt's next-token distribution
    kl_cols: torch.Tensor
    row_req: torch.Tensor        # each row's request

    def only(self, keep: torch.Tensor) -> tuple[_Batch, torch.Tensor]:
        """The rows of the requests where `keep` [n_req] is true, trimmed to their longest row, and which rows of
        this batch they are. Request indices stay those of the whole batch."""
        rows = keep[self.row_req].nonzero()[:, 0]
        new = torch.full_like(self.row_req, -1)
        new[rows] = torch.arange(len(rows))
        width = int(self.mask[rows].sum(1).max())
        e, loss, kl = keep[self.edit_req], keep[self.loss_req], keep[self.row_req[self.kl_rows]]
        return _Batch(self.ids[rows, :width], self.mask[rows, :width], new[self.edit_rows[e]], self.edit_cols[e],
                      self.edit_req[e], new[self.loss_rows[loss]], self.loss_cols[loss], self.loss_tok[loss],
                      self.loss_req[loss], new[self.kl_rows[kl]], self.kl_cols[kl], self.row_req[rows]), rows


def _value_batch(lm: LM, requests: list[EditRequest], prefixes: list[str]) -> _Batch:
    rows, edit, loss, kl, row_req = [], [], [], [], []
    for q, r in enumerate(requests):
        tgt = target_ids(lm, r.target_new)
        for p in prefixes:
            text = p + r.text
            ctx = lm.tok(text).input_ids
            i = len(rows)
            rows.append(ctx + tgt[:-1])
            row_req.append(q)
            edit.append((i, subject_last_index(lm, text, r.subject), q))
            loss += [(i, len(ctx) - 1 + j, t, q) for j, t in enumerate(tgt)]
    for q, r in enumerate(requests):
        text = ESSENCE.format(r.subject)
        i = len(rows)
        rows.append(lm.tok(text).input_ids)
        row_req.append(q)
        edit.append((i, subject_last_index(lm, text, r.subject), q))
        kl.append((i, len(rows[-1]) - 1))
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    t = lambda xs, j: torch.tensor([x[j] for x in xs])  # noqa: E731
    return _Batch(ids, mask, t(edit, 0), t(edit, 1), t(edit, 2), t(loss, 0), t(loss, 1), t(loss, 2), t(loss, 3),
                  t(kl, 0), t(kl, 1), torch.tensor(row_req))


def _log_probs(lm: LM, b: _Batch, gather: bool, cached: torch.Tensor | None, layer: int,
               edit=None, module: str = "mlp_out") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the loss positions and at the KL positions, under the output edit `edit`."""
    rows = torch.cat([b.loss_rows, b.kl_rows])
    cols = torch.cat([b.loss_cols, b.kl_cols])
    with contextlib.ExitStack() as stack:
        if edit is not None:
            stack.enter_context(Trace(lm.model, lm.arch.name(module, layer), edit_output=edit, detach=False))
        if cached is not None:
            stack.enter_context(start_at_layer(lm.model, lm.arch.layer, layer, cached))
        if gather:
            dev = lm.device_of(lm.arch.lm_head)
            stack.enter_context(head_at(lm.model, lm.arch.lm_head, rows.to(dev), cols.to(dev)))
        logits = lm.model(input_ids=b.ids, attention_mask=b.mask).logits
    logits = logits[0] if gather else logits[rows, cols]
    lp = torch.log_softmax(logits.float(), -1)
    return lp[:len(b.loss_rows)], lp[len(b.loss_rows):]


def target_loss(lm: LM, layer: int, cached: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target tokens `tgt` predicted at (rows, cols), with gradients, running only the
    blocks from `layer` up on the cached residual stream and the head only at those positions."""
    dev = lm.device_of(lm.arch.lm_head)
    with torch.enable_grad(), start_at_layer(lm.model, lm.arch.layer, layer, cached), \
            head_at(lm.model, lm.arch.lm_head, rows.to(dev), cols.to(dev)):
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[0].float()
        return torch.nn.functional.cross_entropy(logits, tgt.to(logits.device))


def fit_adam(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], lr: float, steps: int,
             stop_nll: float, project: Callable[[], object] | None = None) -> tuple[float, int]:
    """Adam on `params` until `loss_fn()` (a mean target NLL) is below `stop_nll` or `steps` updates are made;
    `project()` runs after each update (FT-L's norm ball). Returns (the last NLL, the updates made)."""
    opt, done = torch.optim.Adam(params, lr=lr), 0
    while True:
        loss = loss_fn()
        nll = loss.item()
        if nll < stop_nll or done == steps:
            return nll, done
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if project is not None:
            with torch.no_grad():
                project()


def mlp_out_of(lm: LM, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """W k (+ b) in float32: the MLP output projection's output for keys [n, d_in], on W's device (the keys move
    there; for an offloaded W, the CPU of its store)."""
    name = lm.arch.name("mlp_out", layer)
    w, b = weight(lm.model, name), bias(lm.model, name)
    out = keys.to(w.device, torch.float32) @ w.float().T
    return out + b.float() if b is not None else out


def optimize_values(lm: LM, layer: int, requests: list[EditRequest], prefixes: list[str], keys: torch.Tensor | None,
                    hp: ValueParams, module: str = "mlp_out") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Optimise δ (one per request, batched) added to `module`'s output at each subject's last token.

    Returns (v0, δ, info) so that v* = v0 + δ: for "mlp_out" v0 = W k* (+ b) from `keys`; otherwise v0 is the
    module's output at the subject's last token of the first prefix's prompt (MEMIT's z0; `keys` unused)."""
    b = _value_batch(lm, requests, prefixes)
    n_req = len(requests)

    # one clean pass: cache the residual stream entering `layer`, the essence distributions, and z0
    with torch.no_grad(), Trace(lm.model, lm.arch.name("layer", layer), retain_input=True) as t, \
            Trace(lm.model, lm.arch.name(module, layer), retain_output=True) as out0:
        _, kl0 = _log_probs(lm, b, hp.gather_logits, None, layer)
    cached = t.input if hp.cache_residual else None
    device = out0.output.device                       # where δ is added: the module's output
    if module == "mlp_out":
        v0 = mlp_out_of(lm, layer, keys).to(device)
    else:
        first = torch.arange(n_req) * len(prefixes)   # each request's first edit row: its first prefix
        v0 = out0.output[b.edit_rows[first].to(device), b.edit_cols[first].to(device)].float()

    delta = torch.zeros(n_req, v0.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = (PAPER_CLAMP if hp.clamp_norm is None else hp.clamp_norm) * v0.norm(dim=-1, keepdim=True)
    live = torch.ones(n_req, dtype=torch.bool)   # requests still training; the others' δ is final
    part, rows_of = b, None

    def add_delta(out, _name):
        h = out[0] if isinstance(out, tuple) else out
        at = (part.edit_rows.to(device), part.edit_cols.to(device))
        h = token_grid(h.float(), part.ids).index_put(at, delta[part.edit_req.to(device)], accumulate=True) \
            .view(h.shape).to(h.dtype)                                  # h + δ in float32, rounded once
        return (h, *out[1:]) if isinstance(out, tuple) else h

    nll = torch.full((n_req,), float("inf"))
    steps = 0
    for steps in range(1, hp.steps + 1):
        with torch.enable_grad():
            start = None if cached is None else cached if rows_of is None else \
                cached[rows_of.to(cached.device), :part.ids.shape[1]]
            lp, kl_lp = _log_probs(lm, part, hp.gather_logits, start, layer, add_delta, module)
            tok_nll = -lp.gather(1, part.loss_tok.to(lp.device)[:, None])[:, 0]
            # mean NLL per request: average over its tokens (all its prompts share the target length)
            loss_req = part.loss_req.to(lp.device)
            per_req = torch.zeros(n_req, device=lp.device, dtype=tok_nll.dtype).index_add(0, loss_req, tok_nll)
            per_req = per_req / torch.bincount(part.loss_req, minlength=n_req).clamp_min(1).to(lp.device)
            kl_req = part.row_req[part.kl_rows].to(lp.device)
            kl = torch.nn.functional.kl_div(kl_lp, kl0[kl_req], log_target=True, reduction="none").sum(-1)
            decay = delta.norm(dim=-1) / v0.norm(dim=-1) ** 2
            total = per_req + hp.weight_decay * decay
            total = total.index_add(0, kl_req, (hp.kl_factor * kl).to(total.dtype))
        nll[live] = per_req.detach().cpu()[live]
        if hp.early_stop:
            live &= nll >= hp.stop_nll
        if not live.any() or steps == hp.steps:
            break
        opt.zero_grad()
        total[live.to(total.device)].sum().backward()
        final = delta.detach()[~live.to(device)].clone()
        opt.step()
        with torch.no_grad():  # the paper's norm bound; finished requests keep their δ (Adam's momentum would not)
            delta.mul_(torch.clamp(max_norm / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12), max=1.0))
            delta[~live.to(device)] = final
        if hp.early_stop and not live.all():
            part, rows_of = b.only(live)
    return v0.detach(), delta.detach(), {"v_steps": steps, "v_nll": nll.tolist()}

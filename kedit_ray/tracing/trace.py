"""Causal tracing (ROME, Meng et al. 2022, section 2): which hidden states carry a fact.

    clean run      prompt x, the model's answer r = argmax p(· | x),   P   = p(r | x)
    corrupted run  subject token embeddings e_i += ε_i, ε ~ N(0, σ² I), P*  = mean over S noise samples
    restored run   the corrupted run with some states set back to their clean values: P*_restored
    TE = P − P*        IE = P*_restored − P*

Kinds of state, at token t and layer l: `hidden` = block l's output h_t^(l) (the residual stream);
`mlp` / `attn` = the MLP / attention output at t, restored at every layer of a window centred at l
(ROME's `window`: layers l − ⌊w/2⌋ .. l + ⌈w/2⌉ − 1, clipped to the model).

Batching: a restoration whose states lie at layers ≥ lo and tokens ≥ t leaves every state below layer
lo, and every state before token t, equal to the corrupted run's (attention is causal). So the
restorations sharing their lowest layer lo run in one forward pass (rows = restorations × noise samples,
each sample's rows with the same noise) that starts at block lo from the cached corrupted residual
stream and computes only tokens t.. (t = the pass's first restored token) against the corrupted run's
keys and values for tokens ..t−1. The head then makes logits at the last token only, for all rows at
once. Tokens before the subject are never corrupted, so restoring them is the identity: IE = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from kedit_ray.datasets import KnownFact
from kedit_ray.models import LM, Trace, TraceDict, head_at, start_at_layer

KINDS = ("hidden", "mlp", "attn")
ROLES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
PREFIX = "prefix"  # tokens before the subject: never corrupted, IE = 0
_FIELD = {"hidden": "layer", "mlp": "mlp", "attn": "attn"}  # Arch template of each kind's module


@dataclass(frozen=True)
class Restore:
    """Set the `kind` states at every (token, layer) in tokens × layers back to their clean values."""

    kind: str
    tokens: tuple[int, ...]
    layers: tuple[int, ...]


@dataclass
class TraceParams:
    kinds: tuple[str, ...] = KINDS
    window: int = 10        # layers restored together for mlp / attn
    samples: int = 10       # noise samples S
    seed: int = 1           # the noise of every fact is drawn from this seed
    max_rows: int = 256     # rows (restorations × samples) per forward pass


@dataclass
class Runs:
    """A fact's clean and corrupted runs: everything a restored run starts from."""

    ids: torch.Tensor                    # [1, T]
    subject: range                       # token positions of the subject
    answer: int                          # r
    p: float                             # P
    p_star: float                        # P*
    noise: torch.Tensor                  # ε, [S, |subject|, d]
    clean: dict[str, torch.Tensor]       # module name → clean output, [T, d]
    entry: list[torch.Tensor]            # block l's input in the corrupted run, [S, T, d]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # corrupted keys / values per layer, [S, heads, T, d_head]


@dataclass
class FactTrace:
    fact: int
    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]       # [start, stop)
    answer: str
    p: float
    p_star: float
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # kind → P*_restored, [T, L]
    skipped: str | None = None           # the model does not answer as expected: what it predicts
    error: str | None = None             # tracing failed: the exception

    @property
    def roles(self) -> list[str]:
        return token_roles(len(self.tokens), range(*self.subject_range))


def window(layer: int, n_layers: int, size: int) -> tuple[int, ...]:
    return tuple(range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2))))


def state_name(lm: LM, kind: str, layer: int) -> str:
    return lm.arch.name(_FIELD[kind], layer)


def token_roles(n_tokens: int, subject: range) -> list[str]:
    """One role per token. A one-token subject is `last_subject`; a token that is both the first
    after the subject and the prompt's last is `last`."""
    def role(t: int) -> str:
        if t < subject.start:
            return PREFIX
        if t == subject.stop - 1:
            return "last_subject"
        if t == subject.start:
            return "first_subject"
        if t < subject.stop:
            return "middle_subject"
        if t == n_tokens - 1:
            return "last"
        return "first_subsequent" if t == subject.stop else "further"
    return [role(t) for t in range(n_tokens)]


def subject_tokens(lm: LM, prompt: str, subject: str) -> tuple[torch.Tensor, range]:
    """The prompt's ids [1, T] (special tokens included) and the positions of the subject's first occurrence."""
    enc = lm.tok(prompt, return_offsets_mapping=True)
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}")
    end = start + len(subject)
    idx = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < end and b > start]
    if not idx:
        raise ValueError(f"subject {subject!r} has no token in {prompt!r}")
    return torch.tensor([enc.input_ids], device=lm.input_device), range(idx[0], idx[-1] + 1)


def first_token(lm: LM, text: str) -> int:
    return lm.tok(" " + text.strip(), add_special_tokens=False).input_ids[0]


@torch.no_grad()
def noise_std(lm: LM, texts: list[str]) -> float:
    """std of the token embeddings (the embedding module's output) over the tokens of `texts`."""
    ids = [i for text in texts for i in lm.tok(text, add_special_tokens=False).input_ids]
    emb = lm.model.get_submodule(lm.arch.embed)
    return emb(torch.tensor([ids], device=lm.input_device)).float().std().item()


def _probs(logits: torch.Tensor, r: int) -> torch.Tensor:
    """p(r) for each row of [rows, V] logits, in float32 (float64 for a float64 model)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (logits[:, r] - logits.logsumexp(-1)).exp()


def _last(lm: LM, rows: int, col: int):
    dev = lm.device_of(lm.arch.lm_head)
    return head_at(lm.model, lm.arch.lm_head, torch.arange(rows, device=dev), torch.full((rows,), col, device=dev))


def _add_noise(subject: range, noise: torch.Tensor):
    def edit(x, _name):
        x = x.clone()
        x[:, subject.start:subject.stop] += noise.to(x)
        return x
    return edit


@torch.no_grad()
def prepare(lm: LM, prompt: str, subject: str, sigma: float, params: TraceParams) -> Runs:
    """Clean run (all states of `params.kinds` kept) and corrupted run (block inputs, keys and values kept)."""
    ids, subj = subject_tokens(lm, prompt, subject)
    T, L, S = ids.shape[1], lm.n_layers, params.samples
    names = [state_name(lm, k, l) for k in params.kinds for l in range(L)]
    with TraceDict(lm.model, names, retain_output=True) as clean, _last(lm, 1, T - 1):
        logits = lm.model(input_ids=ids).logits[0]
    r = int(logits[0].argmax())
    gen = torch.Generator().manual_seed(params.seed)
    noise = sigma * torch.randn(S, len(subj), lm.model.config.get_text_config().hidden_size, generator=gen)
    blocks = [lm.arch.name("layer", l) for l in range(L)]
    with Trace(lm.model, lm.arch.embed, edit_output=_add_noise(subj, noise)), \
            TraceDict(lm.model, blocks, retain_input=True) as entry, _last(lm, S, T - 1):
        out = lm.model(input_ids=ids.expand(S, T), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in out.cache.layers]
    if any(k.shape[-2] != T for k, _ in kv):  # a sliding-window cache dropped early tokens
        raise ValueError(f"prompt of {T} tokens is longer than the model's attention window")
    return Runs(ids, subj, r, _probs(logits, r).item(), _probs(out.logits[0], r).mean().item(), noise,
                {n: clean[n].output[0] for n in names}, [entry[b].input for b in blocks], kv)


def _patcher(run: Runs, index: dict[str, tuple[torch.Tensor, torch.Tensor]], offset: int):
    """edit_output that sets out[rows, tokens − offset] to the clean values at `tokens`."""
    def patch(out, name):
        h = out[0] if isinstance(out, tuple) else out
        rows, tokens = index[name]
        h[rows.to(h.device), (tokens - offset).to(h.device)] = run.clean[name][tokens.to(h.device)]
        return out
    return patch


def _index(lm: LM, restores: list[Restore], samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (rows, tokens) to patch; restoration g owns rows g·S .. g·S + S − 1."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for g, rs in enumerate(restores):
        rows = torch.arange(g * samples, (g + 1) * samples).repeat_interleave(len(rs.tokens))
        tokens = torch.tensor(rs.tokens).repeat(samples)
        for l in rs.layers:
            parts.setdefault(state_name(lm, rs.kind, l), []).append((rows, tokens))
    return {n: (torch.cat([r for r, _ in p]), torch.cat([t for _, t in p])) for n, p in parts.items()}


@torch.no_grad()
def _restored_pass(lm: LM, run: Runs, restores: list[Restore], lo: int, t: int) -> torch.Tensor:
    """One forward pass for restorations that touch no layer below `lo` and no token before `t`: blocks
    lo.. on tokens t.. (keys and values of tokens ..t−1 from the corrupted run). Returns the final normed
    hidden state at the last token, [restorations × S, d]; the head runs later, on all rows at once."""
    S = run.noise.shape[0]
    G = len(restores)
    cache = None
    if t:
        cache = DynamicCache([(k[:, :, :t].repeat(G, 1, 1, 1), v[:, :, :t].repeat(G, 1, 1, 1)) for k, v in run.kv],
                             config=lm.model.config)
    hidden = run.entry[lo][:, t:].repeat(G, 1, 1)
    index = _index(lm, restores, S)
    with start_at_layer(lm.model, lm.arch.layer, lo, hidden), \
            TraceDict(lm.model, list(index), edit_output=_patcher(run, index, t)), \
            Trace(lm.model, lm.arch.final_norm, retain_output=True, stop=True) as final:
        lm.model(input_ids=run.ids[:, t:].expand(G * S, -1), cache=cache, use_cache=t > 0)
    return final.output[:, -1]


def _head_probs(lm: LM, h: torch.Tensor, r: int) -> torch.Tensor:
    """p(r) from final hidden states [rows, d]: the LM head (and the logit soft cap, where the model has one)."""
    return _probs(lm.head_logits(h), r)


def restored_probs(lm: LM, run: Runs, restores: list[Restore], max_rows: int = 256) -> torch.Tensor:
    """P*_restored for each restoration: one body pass per lowest restored layer (`max_rows` rows at most),
    then the head over every row at once."""
    S = run.noise.shape[0]
    groups: dict[int, list[int]] = {}
    for i, rs in enumerate(restores):
        groups.setdefault(min(rs.layers), []).append(i)
    order, finals = [], []
    n = max(1, max_rows // S)
    for lo, members in groups.items():
        for i in range(0, len(members), n):
            chunk = [restores[j] for j in members[i:i + n]]
            finals.append(_restored_pass(lm, run, chunk, lo, min(min(rs.tokens) for rs in chunk)))
            order += members[i:i + n]
    dev = lm.device_of(lm.arch.lm_head)
    h = torch.cat([f.to(dev) for f in finals])
    with torch.no_grad():
        p = torch.cat([_head_probs(lm, h[i:i + max_rows], run.answer) for i in range(0, len(h), max_rows)])
    out = torch.empty(len(restores), dtype=p.dtype)
    out[order] = p.view(-1, S).mean(1).cpu()
    return out


@torch.no_grad()
def restored_prob_one(lm: LM, run: Runs, restore: Restore) -> float:
    """P*_restored the plain way (ROME's trace_with_patch): one full forward pass over the S noisy rows."""
    S, T = run.noise.shape[0], run.ids.shape[1]
    index = _index(lm, [restore], S)
    with Trace(lm.model, lm.arch.embed, edit_output=_add_noise(run.subject, run.noise)), \
            TraceDict(lm.model, list(index), edit_output=_patcher(run, index, 0)), _last(lm, S, T - 1):
        logits = lm.model(input_ids=run.ids.expand(S, T)).logits[0]
    return _probs(logits, run.answer).mean().item()


def grid(lm: LM, run: Runs, params: TraceParams) -> list[Restore]:
    """Every (kind, token from the subject on, layer) restoration of a trace."""
    T, L = run.ids.shape[1], lm.n_layers
    return [Restore(k, (t,), (l,) if k == "hidden" else window(l, L, params.window))
            for k in params.kinds for t in range(run.subject.start, T) for l in range(L)]


def trace_fact(lm: LM, prompt: str, subject: str, sigma: float, params: TraceParams = TraceParams(),
               expect: str | None = None, fact: int = 0, one_pass_each: bool = False) -> FactTrace:
    """The full trace of one prompt. With `expect`, a model whose answer is not the first token of
    " " + expect is not traced (`skipped` says what it predicts). `one_pass_each` runs every
    restoration as its own forward pass (for the benchmark)."""
    run = prepare(lm, prompt, subject, sigma, params)
    subj, tokens = run.subject, [lm.tok.decode([i]) for i in run.ids[0].tolist()]
    result = FactTrace(fact, prompt, subject, tokens, (subj.start, subj.stop), lm.tok.decode([run.answer]),
                       run.p, run.p_star)
    if expect is not None and run.answer != first_token(lm, expect):
        result.skipped = f"predicts {result.answer!r}, not {expect!r}"
        return result
    restores = grid(lm, run, params)
    if one_pass_each:
        probs = torch.tensor([restored_prob_one(lm, run, rs) for rs in restores])
    else:
        probs = restored_probs(lm, run, restores, params.max_rows)
    T, L = len(tokens), lm.n_layers
    for k, block in zip(params.kinds, probs.view(len(params.kinds), -1, L)):
        scores = np.full((T, L), run.p_star)
        scores[subj.start:] = block.double().numpy()
        result.scores[k] = scores
    return result


def trace_known(lm: LM, fact: KnownFact, sigma: float, params: TraceParams = TraceParams()) -> FactTrace:
    """trace_fact on a known fact (checked against its attribute when it has one); a failure comes back
    as `error`, so one bad fact does not end a run."""
    try:
        return trace_fact(lm, fact.prompt, fact.subject, sigma, params, expect=fact.attribute or None, fact=fact.id)
    except Exception as e:  # noqa: BLE001 - reported per fact
        return FactTrace(fact.id, fact.prompt, fact.subject, [], (0, 0), "", float("nan"), float("nan"),
                         error=f"{type(e).__name__}: {e}")

"""IKE (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by In-Context Learning?"): the edit is a prompt.

No weight changes. The edited fact f = "{prompt} {o*}" and k demonstrations retrieved from a pool of training
records make a context C that the model reads every input after:

    C = d_1 … d_k "New Fact: f\\n"             d_i = "New Fact: f_i\\n{x_i} {y_i}\\n\\n"

Each pool record ⟨s, r, o → o*⟩ gives one of the paper's three kinds of demonstration:
    copy     x = the record's prompt,              y = o*     (state the new fact)
    update   x = its paraphrase,                   y = o*     (generalise it)
    retain   x = its neighbourhood prompt,         y = that prompt's own answer   (leave the rest alone)
The k records whose copy demonstration is most similar to the edit's own, "New Fact: f\\n{prompt} {o*}\\n\\n", give
the demonstrations, in the kinds' ratio of the paper's code, copy : update : retain = 1 : 3 : 4 (there drawn at
random, here the fixed cycle KINDS down the ranking), least similar first (the nearest next to the input, as there);
the edited case's own records (the same subject and prompt) are left out. Similarity is the cosine of (the paper's
sentence encoder would need a download)
    tfidf    TF-IDF vectors of the lower-cased words: tf = count, idf = ln((1 + N) / (1 + df)) + 1 (sklearn's)
    hidden   the model's own block-`layer` output mean-pooled over a text's tokens (BOS left out), centred on
             the pool's mean (raw hidden states all point one way)

C ends with a line break, so a prompt read after it tokenizes as on its own: tok(C + p) = tok(C) + tok(p) less p's
BOS (tests/test_ike.py checks gemma-3's tokenizer). `IkeContext.apply` hooks the model so that each row reads as
C + row (after its left padding; C's BOS stands for the row's own): a forward pre-hook on the whole model puts
attention-mask ones and position ids for C in each row, a forward hook on the token embedding puts C's embeddings in
(inputs_embeds from the caller get them in the pre-hook), and a forward hook on the final norm takes C's positions
out again. So the LM head, a `Trace` of the final norm and every scorer read the row's own positions (the row's BOS
position holds C's last token, which predicts the row's first word), and the model's own shapes stay the rows' (GPT-2
views the final norm's output by the input's length; so with inputs_embeds, which the embedding never sees, GPT-2
cannot run). With a KV cache (generation), later steps extend the mask and shift the positions. `revert` removes the
hooks: the model is as it was.

A scorer's pass (input ids, no cache, use_cache=False: every scorer's) does not read C again: C's keys and values
are computed once per context (`prefix`) and each row, less its BOS, reads them at positions len(C), len(C) + 1, ...
The same sums: 17x the cases per second after 50 sequential zsRE edits on gemma-3-270m (benchmarks/bench_ike.py).

Edits compose: a new edit continues the context active on the model (its facts, one line each in edit order, and
k demonstrations from the records nearest any of them), and only the last applied context is active. The sequential
protocol and the batch protocol (an editor that is not `batched` has a batch edited request by request, each applied
before the next is made) so read one context holding every fact edited so far; a context longer than the model takes
is an error naming the number of edits and tokens.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.contract import Editor, option
from kedit_ray.editors.delta import Hooked
from kedit_ray.editors.toolkit import pad
from kedit_ray.errors import SettingError
from kedit_ray.io import write_json
from kedit_ray.models import LM, StopForward, Trace, check_layer, get_module, token_grid
from kedit_ray.options import count, positive
from kedit_ray.requests import EditRequest
from kedit_ray.stats.cache import context_length

RETRIEVERS = ("tfidf", "hidden")
KINDS = ("retain", "update", "retain", "copy", "retain", "update", "retain", "update")   # by rank, nearest first
ROOM = 64          # tokens of the model's context kept for the prompt and target read after C
EMBED_ROWS = 64    # texts per forward pass when the hidden retriever embeds the pool
# Measured per model in kedit_ray/defaults/<model>.toml, [ike]; without a value, the rules here.
MEASURED = Measured("ike", {"retriever": Rule(str, "tfidf", "TF-IDF: better on gemma-3-270m, see its [ike]"),
                            "layer": Rule(int, lambda n: n // 2, "half the depth")})


@dataclass
class IkeParams:
    pool: str | None = option(None, "the training records demonstrations are drawn from: a CounterFact or zsRE file "
                              "(e.g. counterfact-train.json); required unless --ike-k 0", flag="--ike-pool")
    pool_size: int | None = option(None, "read only the pool file's first N valid records (default: all)",
                                   flag="--ike-pool-size", parse=positive)
    k: int = option(8, "demonstrations in the context (0: the new facts alone)", flag="--ike-k", parse=count)
    retriever: str | None = option(None, "how demonstrations are ranked: TF-IDF cosine, or the cosine of the model's "
                                   "mean-pooled hidden states (default: measured per model, else tfidf)",
                                   flag="--ike-retriever", choices=RETRIEVERS)
    layer: int | None = option(None, "the block whose output the hidden retriever mean-pools (default: measured per "
                               "model, else half way up)", flag="--ike-layer", parse=int)
    max_tokens: int | None = option(None, f"the longest context in tokens (default: the model's context less {ROOM} "
                                    "for the prompt)", flag="--ike-max-tokens", parse=positive)

    def __post_init__(self):
        if self.retriever is not None and self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}, got {self.retriever!r}")
        if self.k < 0:
            raise ValueError(f"k must be ≥ 0, got {self.k}")

    @classmethod
    def from_dict(cls, d: dict) -> IkeParams:
        return cls(**d)


# ---------------------------------------------------------------- demonstrations

def fact(req: EditRequest) -> str:
    return f"{req.text} {req.target_new}"


def demo(f: str, x: str, y: str) -> str:
    return f"New Fact: {f}\n{x} {y}\n\n"


def query(req: EditRequest) -> str:
    """What the pool is searched with: the edit's own copy demonstration (EasyEdit's query)."""
    return demo(fact(req), req.text, req.target_new)


def demonstration(r: EditRequest, kind: str) -> str:
    """A record's demonstration of `kind`; copy where it lacks the paraphrase or neighbour asked for."""
    if kind == "update" and r.paraphrase_prompts:
        return demo(fact(r), r.paraphrase_prompts[0], r.target_new)
    if kind == "retain" and r.neighborhood_prompts:
        return demo(fact(r), r.neighborhood_prompts[0], r.neighborhood_answers[0])
    return demo(fact(r), r.text, r.target_new)


# ---------------------------------------------------------------- retrievers: scores(queries) = cosine [pool, queries]

WORD = re.compile(r"\w+")


class TfIdf:
    """TF-IDF over the pool's words; rows are L2-normalised, so a dot product is the cosine."""

    def __init__(self, texts: list[str]):
        counts = [Counter(WORD.findall(t.lower())) for t in texts]
        self.vocab = {w: i for i, w in enumerate(sorted({w for c in counts for w in c}))}
        df = torch.zeros(len(self.vocab), dtype=torch.float64)
        for c in counts:
            df[[self.vocab[w] for w in c]] += 1
        self.idf = torch.log((1 + len(texts)) / (1 + df)) + 1
        self.pool = self.vectors(counts)

    def vectors(self, counts: list[Counter]) -> torch.Tensor:
        """Sparse [len(counts), vocabulary]: tf·idf per known word, each row over its norm."""
        rows, cols, tf = [], [], []
        for i, c in enumerate(counts):
            known = [(self.vocab[w], n) for w, n in c.items() if w in self.vocab]
            rows += [i] * len(known)
            cols += [j for j, _ in known]
            tf += [n for _, n in known]
        rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        w = torch.tensor(tf, dtype=torch.float64) * self.idf[cols_t]
        norm = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, rows_t, w * w).sqrt()
        return torch.sparse_coo_tensor(torch.stack([rows_t, cols_t]), w / norm[rows_t],
                                       (len(counts), len(self.vocab)), check_invariants=True).coalesce()

    def scores(self, queries: list[str]) -> torch.Tensor:
        q = self.vectors([Counter(WORD.findall(t.lower())) for t in queries]).to_dense()
        return torch.sparse.mm(self.pool, q.T)


@torch.no_grad()
def mean_hidden(lm: LM, layer: int, texts: list[str]) -> torch.Tensor:
    """[len(texts), d]: block `layer`'s output averaged over each text's tokens but a leading BOS, in float32 or
    wider; the model runs with no IKE context active."""
    ids = lm.tok(texts).input_ids
    skip = bos_skip(lm.tok)
    name = lm.arch.name("layer", layer)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out: dict[int, torch.Tensor] = {}
    with IkeContext.suspended(lm.model):   # texts embedded as the unedited model does
        for s in range(0, len(order), EMBED_ROWS):
            group = order[s:s + EMBED_ROWS]
            x, mask = pad([ids[i] for i in group], lm.tok.pad_token_id, lm.input_device)
            with Trace(lm.model, name, retain_output=True, stop=True) as t:
                lm.model(input_ids=x, attention_mask=mask, use_cache=False)
            m = mask.clone()
            m[:, :skip] = 0
            m[m.sum(1) == 0, :skip] = 1                    # a text that is its BOS alone keeps it
            h = token_grid(t.output, x)
            h = h.to(torch.promote_types(h.dtype, torch.float32))
            pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            out.update(zip(group, pooled.cpu()))
    return torch.stack([out[i] for i in range(len(texts))])


class Hidden:
    """The model's mean-pooled block output, centred on the pool's mean and L2-normalised."""

    def __init__(self, lm: LM, layer: int, texts: list[str]):
        self.lm, self.layer = lm, layer
        x = mean_hidden(lm, layer, texts)
        self.mean = x.mean(0)
        self.pool = self.unit(x)
        self.seen: dict[str, torch.Tensor] = {}            # query text -> its vector (a context's queries recur)

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.mean
        return x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)

    def scores(self, queries: list[str]) -> torch.Tensor:
        new = [q for q in dict.fromkeys(queries) if q not in self.seen]
        if new:
            self.seen.update(zip(new, self.unit(mean_hidden(self.lm, self.layer, new))))
        return self.pool @ torch.stack([self.seen[q] for q in queries]).T


# ---------------------------------------------------------------- the edit: a context the model reads inputs after

def bos_skip(tok) -> int:
    """1 if the tokenizer starts every text with its BOS token, else 0."""
    ids = tok("a").input_ids
    return int(tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id)


def insert(x: torch.Tensor, at: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Row b of x [B, T, ...] with block[b] [n, ...] put before its column at[b]: [B, T + n, ...]."""
    return torch.stack([torch.cat([x[b, :a], block[b], x[b, a:]]) for b, a in enumerate(at.tolist())])


class IkeContext(Hooked):
    """The context's token ids C (with the tokenizer's BOS, if it adds one: `skip` = 1), the names of the modules
    hooked (the token embedding and the final norm), and the requests whose facts it states. Contexts stack on
    the model, the last one active."""

    what = "IKE context"

    def __init__(self, ids: list[int], skip: int, embed: str, final_norm: str, requests: list[EditRequest],
                 text: str = "", meta: dict | None = None):
        if len(ids) <= skip:
            raise ValueError(f"an IKE context needs tokens beyond its BOS, got {ids}")
        self.ids, self.skip, self.embed, self.final_norm = list(ids), skip, embed, final_norm
        self.requests, self.text = list(requests), text
        self.meta = {**(meta or {}), "edits": len(requests), "context_tokens": len(ids)}
        self.meta["checkpoint"] = {"context_tokens": len(ids)}     # a figure for the sequential summary
        self._embed: torch.Tensor | None = None                   # per row, where C's embeddings go in
        self._drop: tuple[torch.Tensor, int] | None = None        # (first column, n) to drop at the final norm
        self._unpack: tuple | None = None   # cached path: (columns back, BOS columns or None, C's last output)
        self._prefix: tuple[tuple, object, torch.Tensor] | None = None  # (device, dtype), C's cache, its last output

    @property
    def shift(self) -> int:
        """Positions a row gains: C less the BOS that stands for the row's own."""
        return len(self.ids) - self.skip

    # ------------------------------------------------------------ the hooks
    def splice(self, model: nn.Module, args: tuple, kwargs: dict) -> dict:
        """The model's keyword arguments for C put in each row after its left padding and its BOS: mask ones and
        positions here; C's embeddings go in at the embedding's output (`embedded`, so that the model's own shapes,
        e.g. GPT-2's view of the final norm's output, stay the rows'), or here when the caller gives inputs_embeds."""
        if len(args) > 1:
            raise TypeError("with an IKE context applied, call the model with keyword arguments (input_ids=, "
                            "attention_mask=, ...)")
        kw = {**kwargs, **({"input_ids": args[0]} if args else {})}
        key = "input_ids" if kw.get("input_ids") is not None else "inputs_embeds"
        x, mask, pos, cache = kw[key], kw.get("attention_mask"), kw.get("position_ids"), kw.get("cache")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"an IKE context needs a 2-D attention mask [batch, time], got one of shape "
                             f"{tuple(mask.shape)}")
        n, rows = self.shift, len(x)
        start = mask.argmax(1) if mask is not None else torch.zeros(rows, dtype=torch.long, device=x.device)
        if key == "input_ids" and cache is None and pos is None and kw.get("use_cache") is False:
            return self.after_prefix(model, kw, x, mask, start)
        at = start + self.skip                                    # after each row's BOS
        if cache is None or cache.get_seq_length() == 0:          # the rows' first pass: C goes in
            ids = torch.tensor(self.ids, device=x.device)
            first = x[torch.arange(rows, device=x.device), start]
            if key == "input_ids":
                bos, self._embed = ids[0], at
            else:
                emb = model.get_input_embeddings()(ids).to(x.dtype)
                bos, kw[key] = emb[0], insert(x, at, emb[self.skip:].expand(rows, n, -1))
            self.check_bos(first, bos)
            if pos is None:                                       # the model's own: 0, 1, ... over the longer rows
                pos = torch.arange(x.shape[1], device=x.device).expand(rows, -1)
            cols = torch.arange(pos.shape[1], device=pos.device)
            base = pos.gather(1, start[:, None]) + self.skip       # the first inserted token's position
            kw["position_ids"] = insert(pos + n * (cols >= at[:, None]), at, base + torch.arange(n, device=pos.device))
            self._drop = (start, n)
        elif pos is not None:                                     # a later step: the cache holds C already
            kw["position_ids"] = pos + n
        if mask is not None:
            kw["attention_mask"] = insert(mask, at, mask.new_ones(rows, n))
        return kw

    def check_bos(self, first: torch.Tensor, bos: torch.Tensor) -> None:
        """Each row's first token (or its embedding) must be the BOS that C's own stands for."""
        if self.skip and not (first == bos).reshape(len(first), -1).all():
            raise ValueError("an IKE context stands for each row's BOS token, but some row does not start with "
                             "it: tokenize inputs with the tokenizer's special tokens")

    def prefix(self, model: nn.Module, device: torch.device) -> tuple[object, torch.Tensor]:
        """C's keys and values at every layer (a KV cache of C alone) and the final norm's output at C's last token,
        computed once per device and dtype: IKE changes no weight, so every row reads the same C. The pass stops
        before the final norm (a scorer's own Trace there must not see it), which then normalises C's last state."""
        from transformers import DynamicCache

        dtype = next(model.parameters()).dtype
        if self._prefix is None or self._prefix[0] != (device, dtype):
            cache, seen, norm = DynamicCache(config=model.config), [], get_module(model, self.final_norm)

            def stop(_m, args, kwargs):
                seen.append((args[0] if args else next(iter(kwargs.values())))[:, -1:].detach())
                raise StopForward

            handle = norm.register_forward_pre_hook(stop, with_kwargs=True)
            try:
                with torch.no_grad(), IkeContext.suspended(model), contextlib.suppress(StopForward):
                    model(input_ids=torch.tensor([self.ids], device=device), cache=cache, use_cache=True)
                with torch.no_grad():
                    last = norm.forward(seen[0])[0, 0]             # the module's own sum, not its hooks
            finally:
                handle.remove()
            self._prefix = ((device, dtype), cache, last)
        return self._prefix[1], self._prefix[2]

    def after_prefix(self, model: nn.Module, kw: dict, x: torch.Tensor, mask: torch.Tensor | None,
                     start: torch.Tensor) -> dict:
        """The model's keyword arguments for rows read after C's cached keys and values (a scorer's pass, no cache
        of its own): each row's tokens but its BOS (C's stands for it) and padding are moved to its front, masked
        after, at positions len(C), len(C) + 1, ...; the final norm's hook (`unpack`) puts its outputs back in the
        row's columns, C's last one in the BOS's. The same sums as C + row in one pass, C's done once."""
        rows, T = x.shape
        self.check_bos(x[torch.arange(rows, device=x.device), start], torch.tensor(self.ids[0], device=x.device))
        cache, last = self.prefix(model, x.device)
        cols = torch.arange(T, device=x.device).expand(rows, -1)
        out = (cols == start[:, None]) if self.skip else torch.zeros_like(cols, dtype=torch.bool)
        if mask is not None:
            out = out | (mask == 0)
        order = (out * T + cols).argsort(1)                        # kept tokens first, in order; stable by key
        mine = copy.copy(cache)                                    # C's tensors, one view per row, not copied
        mine.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in mine.layers:
            layer.keys, layer.values = (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
        kept = (~out).gather(1, order).long()
        L = len(self.ids)
        self._unpack = (order.argsort(1), start if self.skip else None, last)
        return {**kw, "input_ids": x.gather(1, order), "position_ids": L + cols, "cache": mine,
                "attention_mask": torch.cat([kept.new_ones(rows, L), kept], 1)}

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, T, d] of a cached pass in the rows' own columns, C's last output at BOS."""
        back, bos, last = self._unpack
        self._unpack = None
        h = h.gather(1, back.to(h.device)[..., None].expand(-1, -1, h.shape[-1]))
        if bos is not None:
            h[torch.arange(len(h), device=h.device), bos.to(h.device)] = last.to(h.dtype)
        return h

    def embedded(self, module: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """The embedding's output [B, T, d] with C's embeddings (the module's own, scaled where it scales) put in."""
        at, self._embed = self._embed, None
        block = module(torch.tensor(self.ids[self.skip:], device=out.device))
        return insert(out, at, block.expand(len(out), -1, -1))

    def cut(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, T + n, d] less each row's n columns from its first one: [B, T, d]."""
        start, n = self._drop
        self._drop = None
        cols = torch.arange(h.shape[1] - n, device=h.device)
        idx = cols + n * (cols >= start.to(h.device)[:, None])
        return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))

    # ------------------------------------------------------------ the edit-object interface
    def place(self, model: nn.Module) -> nn.Module:
        return model

    def hooks(self, model: nn.Module, stack: list) -> list:
        def pre(_m, args, kwargs):
            self._drop = self._embed = self._unpack = None
            if stack[-1] is not self:                              # a later context supersedes this one
                return None
            return (), self.splice(model, args, kwargs)

        def embedded(m, _args, out):
            return self.embedded(m, out) if self._embed is not None else None

        def post(_m, _args, out):
            if self._unpack is not None:
                return self.unpack(out)
            return self.cut(out) if self._drop is not None else None

        return [model.register_forward_pre_hook(pre, with_kwargs=True),
                get_module(model, self.embed).register_forward_hook(embedded),
                get_module(model, self.final_norm).register_forward_hook(post)]

    def reset(self) -> None:
        self._drop = self._embed = self._unpack = self._prefix = None

    def norms(self) -> dict[str, float]:
        return {}                                                  # no weight changes

    # ------------------------------------------------------------ persistence (JSON: token ids and text)
    def save(self, path: str | Path) -> Path:
        return write_json(path, {"kedit_ike": {"ids": self.ids, "skip": self.skip, "embed": self.embed,
                                               "final_norm": self.final_norm, "text": self.text, "meta": self.meta,
                                               "requests": [r.to_dict() for r in self.requests]}})

    @classmethod
    def load(cls, path: str | Path) -> IkeContext:
        d = json.loads(Path(path).read_text()).get("kedit_ike")
        if d is None:
            raise ValueError(f"{path} is not an IKE context file (no 'kedit_ike' key)")
        return cls(d["ids"], d["skip"], d["embed"], d["final_norm"], [EditRequest(**r) for r in d["requests"]],
                   d["text"], d["meta"])


class Ike(Editor):
    name = "ike"
    kind = "adaptor"   # its edits are a context hooked in front of every input, not weight Deltas
    refusal = ("IKE changes no weight: its edit is a context (the new facts and retrieved demonstrations) that forward "
               "hooks put in front of every input, so no weights checkpoint can hold it; save the context with --save "
               "and apply it with kedit_ray.editors.IkeContext.load(path).apply(model)")

    def __init__(self, params: IkeParams | None = None):
        self.hp = params or IkeParams()
        self._pool: tuple[tuple, list[EditRequest], TfIdf | Hidden] | None = None

    def check_settings(self, model: str) -> None:
        """A pool file is needed unless k = 0."""
        if self.hp.k and not self.hp.pool:
            raise SettingError("pool", f"IKE retrieves its {self.hp.k} demonstrations from a pool of training "
                                       "records: give a CounterFact or zsRE file (e.g. counterfact-train.json), or "
                                       "k = 0 (--ike-k 0) for the new facts alone")
        if self.hp.k and not Path(self.hp.pool).is_file():
            raise SettingError("pool", f"{self.hp.pool}: no such file")

    def settings(self, lm: LM) -> tuple[str, int]:
        """(retriever, layer): the params', else measured for the model, else the rules."""
        found = MEASURED.settings(lm.name, {"retriever": self.hp.retriever, "layer": self.hp.layer}, lm.n_layers)
        return found["retriever"][0], check_layer(lm.model, found["layer"][0])

    def prepare(self, lm: LM) -> None:
        """The pool and its retriever, once, on the unedited model."""
        if self.hp.k:
            self.pool(lm)

    def pool(self, lm: LM) -> tuple[list[EditRequest], TfIdf | Hidden]:
        """The pool's records and the retriever over their copy demonstrations."""
        from kedit_ray.datasets import load_requests

        retriever, layer = self.settings(lm)
        key = (lm.fingerprint, self.hp.pool, self.hp.pool_size, retriever, layer)
        if self._pool is None or self._pool[0] != key:
            self.check_settings(lm.name)
            records, _ = load_requests(self.hp.pool, limit=self.hp.pool_size, skip_invalid=True)
            if not records:
                raise SettingError("pool", f"{self.hp.pool}: no valid record to draw demonstrations from")
            texts = [query(r) for r in records]
            self._pool = (key, records, TfIdf(texts) if retriever == "tfidf" else Hidden(lm, layer, texts))
        return self._pool[1], self._pool[2]

    def retrieve(self, lm: LM, requests: list[EditRequest]) -> list[tuple[str, str]]:
        """(text, kind) of the k demonstrations, least similar first: the records nearest any request (the highest
        cosine of their copy demonstrations over the requests'), but the requests' own, kinds by KINDS."""
        if not self.hp.k:
            return []
        records, retriever = self.pool(lm)
        sim = retriever.scores([query(r) for r in requests]).max(1).values
        own = {(r.subject, r.text) for r in requests}
        sim[[i for i, r in enumerate(records) if (r.subject, r.text) in own]] = -math.inf
        top = sim.topk(min(self.hp.k, int(torch.isfinite(sim).sum()))).indices.tolist()
        kinds = [KINDS[j % len(KINDS)] for j in range(len(top))]
        return [(demonstration(records[i], kind), kind) for i, kind in zip(top, kinds)][::-1]

    def edit(self, lm: LM, request: EditRequest) -> IkeContext:
        """A new context: the active one's facts (if any) and this request's, with demonstrations for them all."""
        t0 = time.perf_counter()
        cur = IkeContext.active(lm.model)
        requests = [*(cur.requests if cur is not None else []), request]
        demos = self.retrieve(lm, requests)
        text = "".join(t for t, _ in demos) + "".join(f"New Fact: {fact(r)}\n" for r in requests)
        ids = lm.tok(text).input_ids
        limit = self.hp.max_tokens or context_length(lm.model.config) - ROOM
        if len(ids) > limit:
            given = "--ike-max-tokens" if self.hp.max_tokens else \
                f"the model's context of {context_length(lm.model.config):,} less {ROOM} for the prompt"
            raise ValueError(f"IKE: the context of {len(requests)} edit(s) and {len(demos)} demonstrations is "
                             f"{len(ids):,} tokens, more than {limit:,} ({given}); edit fewer facts at once")
        retriever = self.settings(lm)[0] if self.hp.k else None
        return IkeContext(ids, bos_skip(lm.tok), lm.arch.embed, lm.arch.final_norm, requests, text, {
            "method": self.name, "model": lm.name, "fingerprint": lm.fingerprint, "case_id": request.case_id,
            "retriever": retriever, "demos": dict(Counter(kind for _, kind in demos)), "params": asdict(self.hp),
            "edit_s": time.perf_counter() - t0})

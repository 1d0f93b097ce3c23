"""One forward pass, many layers: Σ k kᵀ for the inputs k of a module at each requested layer.

Documents are tokenized with the tokenizer's defaults, truncated to `max_len` tokens, sorted by length and
packed into batches of at most `batch_tokens` padded tokens. Every requested layer is hooked; the pass
stops at the input of the deepest one (no logits, no layers above). Only non-padding tokens count.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kedit_ray.models import LM, StopForward, TraceDict, token_grid


@dataclass
class Partial:
    """Σ k kᵀ per layer in float64, over `count` tokens of `docs` documents."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    docs: int = 0

    def add(self, other: Partial) -> Partial:
        for layer, s in other.sums.items():
            self.sums[layer] = s.clone() if layer not in self.sums else self.sums[layer].add_(s)
        self.count += other.count
        self.docs += other.docs
        return self


def gram(k: torch.Tensor) -> torch.Tensor:
    """kᵀk for the keys of one packed batch, k [n, d], in float32: products summed over the batch's n tokens (at
    most `batch_tokens`); the running sums they are added to are float64. Relative Frobenius error against
    all-float64 on gemma-3-270m's keys: 1e-7 (the stats issue's note). On the CPU numpy's `a.T @ a` calls BLAS
    ssyrk: half a GEMM's flops, and twice float64's speed."""
    k = k.to(torch.float32).contiguous()
    if k.device.type != "cpu":
        return k.T @ k
    a = k.numpy()
    return torch.from_numpy(a.T @ a)


def tokenize(tok, docs: list[str], max_len: int) -> list[list[int]]:
    return [ids for ids in tok(docs, truncation=True, max_length=max_len)["input_ids"] if ids]


def pack(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices, longest first, in batches whose padded size (size × longest) stays within `batch_tokens`
    (a longer sequence goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def batches(tok, seqs: list[list[int]], batch_tokens: int):
    """(input_ids, attention_mask) right-padded, packed by token budget."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for idx in pack([len(s) for s in seqs], batch_tokens):
        width = len(seqs[idx[0]])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, :len(seqs[i])] = 1
        yield ids, mask


def add_batch(lm: LM, layers: list[int], module: str, ids: torch.Tensor, mask: torch.Tensor, part: Partial) -> None:
    """One forward pass over a padded batch, stopped at the input of the deepest layer: part.sums[l] += Σ k kᵀ
    over the batch's real tokens at each layer l."""
    names = {lm.arch.name(module, layer): layer for layer in sorted(layers)}
    deepest = next(reversed(names))
    keep = mask.bool()

    def take(k: torch.Tensor, name: str) -> torch.Tensor:   # k: [batch, time, d_in] (or flat), the module's input
        on = keep.to(k.device)
        g = gram(token_grid(k, on)[on] if not on.all() else k.reshape(-1, k.shape[-1]))
        layer = names[name]
        if layer not in part.sums:
            part.sums[layer] = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
        part.sums[layer].add_(g)   # float32 into float64, in one pass
        if name == deepest:
            raise StopForward
        return k

    device = lm.input_device
    with torch.no_grad(), TraceDict(lm.model, names, edit_input=take):
        lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    part.count += int(keep.sum())


def accumulate(lm: LM, layers: list[int], module: str, docs: list[str], max_len: int, batch_tokens: int,
               on_batch: Callable[[int, int], None] | None = None) -> Partial:
    """Σ k kᵀ at every layer in `layers` over `docs`, one truncated forward pass per packed batch.
    `on_batch(documents, tokens)` is called after each batch. The sums come back on the CPU."""
    part = Partial(docs=len(docs))
    for ids, mask in batches(lm.tok, tokenize(lm.tok, docs, max_len), batch_tokens):
        before = part.count
        add_batch(lm, layers, module, ids, mask, part)
        if on_batch is not None:
            on_batch(len(ids), part.count - before)
    part.sums = {layer: s.cpu() for layer, s in part.sums.items()}
    return part

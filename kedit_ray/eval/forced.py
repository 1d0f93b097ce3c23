"""Teacher-forced reads of many (prompt, target) pairs in a few forward passes: the batched scorers' one pass.

A pair (p, t) is read at the positions that predict t's tokens in a row p + t[:-1]. Pairs of one prompt share a
row when one's t[:-1] starts the other's continuation (o* and a one-token o; the same prompt in two cases), so
the prompt runs once. Rows are sorted by length and cut into passes of at most `tokens` padded tokens (little
padding). The body runs pass by pass up to the final norm; the LM head (`LM.head_logits`) then runs once per
HEAD_ROWS positions read, over the positions of all passes, each position once.
"""
from __future__ import annotations

import torch

from kedit_ray.editors.toolkit import pad
from kedit_ray.models import LM, Trace

HEAD_ROWS = 256   # positions per LM-head call: 256 MiB of float32 logits for gemma-3-270m's 262k-word vocabulary


def plan_rows(ctxs: list[list[int]], targets: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The rows to run and each pair's row: longest targets first, each into a row of its prompt whose
    continuation starts with t[:-1], else into a new row p + t[:-1]."""
    rows: list[list[int]] = []
    row_of = [0] * len(ctxs)
    of_ctx: dict[tuple[int, ...], list[int]] = {}
    for i in sorted(range(len(ctxs)), key=lambda i: -len(targets[i])):
        ctx, fed = ctxs[i], targets[i][:-1]
        mine = of_ctx.setdefault(tuple(ctx), [])
        r = next((r for r in mine if rows[r][len(ctx):len(ctx) + len(fed)] == fed), None)
        if r is None:
            r = len(rows)
            rows.append(ctx + fed)
            mine.append(r)
        row_of[i] = r
    return rows, row_of


def passes(rows: list[list[int]], tokens: int, overhead: int = 16) -> list[list[int]]:
    """Row indices in groups, one padded pass each, of at most `tokens` padded tokens (rows × longest). Rows go
    longest first; the cuts between lengths minimise padded tokens plus `overhead` per pass (a pass reads the
    weights once more: roughly 16 tokens' compute for gemma-3-270m's 400 MB body on one core), by dynamic
    programming over the distinct lengths."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    widths = sorted({len(r) for r in rows}, reverse=True)
    ends = [sum(len(r) >= w for r in rows) for w in widths]   # rows as long as widths[k] or longer
    starts = [0, *ends[:-1]]

    def per_pass(w: int) -> int:
        return max(1, tokens // w)

    def cost(i: int, k: int) -> int:   # rows starts[i]:ends[k] padded to widths[i]
        m = ends[k] - starts[i]
        return -(-m // per_pass(widths[i])) * overhead + m * widths[i]

    best, cut = [0] * (len(widths) + 1), [0] * (len(widths) + 1)   # best[k]: the rows of widths[:k]
    for k in range(1, len(widths) + 1):
        best[k], cut[k] = min((best[i] + cost(i, k - 1), i) for i in range(k))
    groups, k = [], len(widths)
    while k:
        i = cut[k]
        seg, n = order[starts[i]:ends[k - 1]], per_pass(widths[i])
        groups[:0] = [seg[j:j + n] for j in range(0, len(seg), n)]
        k = i
    return groups


@torch.no_grad()
def forced_reads(lm: LM, prompts: list[str], targets: list[list[int]], reads: list[list[int] | None] | None = None,
                 tokens: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair (p, t), at each position predicting a token of t (teacher-forced after p + t's earlier tokens):
    the argmax token and log p(r) of the read token r: t's own by default, `reads[i]` where given (a None entry
    reads the argmax). Returns (argmax [len(t)], log p [len(t)]) per pair, on the CPU."""
    if not prompts:
        return []
    ctxs = lm.tok(prompts).input_ids
    rows, row_of = plan_rows(ctxs, targets)
    cols = [range(len(c) - 1, len(c) - 1 + len(t)) for c, t in zip(ctxs, targets)]   # read in the pair's row
    read_at: dict[int, set[int]] = {}
    for r, c in zip(row_of, cols):
        read_at.setdefault(r, set()).update(c)
    at: dict[tuple[int, int], int] = {}   # (row, column) -> its final hidden state's index in `hidden`
    hidden = []
    for group in passes(rows, tokens):   # the body, stopped at the final norm
        ids, mask = pad([rows[r] for r in group], lm.tok.pad_token_id, lm.input_device)
        with Trace(lm.model, lm.arch.final_norm, retain_output=True, stop=True) as final:
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        cells = [(b, c) for b, r in enumerate(group) for c in sorted(read_at[r])]
        at.update({(group[b], c): len(at) + k for k, (b, c) in enumerate(cells)})
        hidden.append(final.output[[b for b, _ in cells], [c for _, c in cells]])
    h = torch.cat(hidden).to(lm.device_of(lm.arch.lm_head))
    pos = torch.tensor([at[r, c] for r, cs in zip(row_of, cols) for c in cs])
    tok = torch.tensor([x for t, r in zip(targets, reads or targets) for x in (r if r is not None else [-1] * len(t))])
    argmax, logp = torch.empty(len(h), dtype=torch.long), torch.empty(len(pos))
    for s in range(0, len(h), HEAD_ROWS):   # the head, HEAD_ROWS positions at a time
        lp = torch.log_softmax(lm.head_logits(h[s:s + HEAD_ROWS]).float(), -1)
        argmax[s:s + HEAD_ROWS] = lp.argmax(-1).cpu()
        sel = ((pos >= s) & (pos < s + HEAD_ROWS)).nonzero()[:, 0]
        t = torch.where(tok[sel] < 0, argmax[pos[sel]], tok[sel])
        logp[sel] = lp[(pos[sel] - s).to(lp.device), t.to(lp.device)].cpu()
    sizes = [len(t) for t in targets]
    return list(zip(argmax[pos].split(sizes), logp.split(sizes)))

"""CounterFact metrics (ROME paper and code): teacher-forced target NLLs, compared per prompt."""
from __future__ import annotations

import math
from collections import Counter

import torch

from kedit_ray.editors.toolkit import pad, target_ids
from kedit_ray.eval.forced import forced_reads
from kedit_ray.models import LM, head_at
from kedit_ray.requests import EditRequest

METRICS = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
           "neighborhood_score", "neighborhood_magnitude")


@torch.no_grad()
def target_nll(lm: LM, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """NLL(t | p): mean per-token negative log-likelihood of each target (with its leading space) after its
    prompt, teacher-forced. One forward pass; logits only at the target positions."""
    rows, pos, toks, pair = [], [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ctx, tgt = lm.tok(p).input_ids, target_ids(lm, t)
        rows.append(ctx + tgt[:-1])
        pos += [(i, len(ctx) - 1 + j) for j in range(len(tgt))]
        toks += tgt
        pair += [i] * len(tgt)
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    r, c = (torch.tensor([x[j] for x in pos]) for j in (0, 1))
    dev = lm.device_of(lm.arch.lm_head)
    with head_at(lm.model, lm.arch.lm_head, r.to(dev), c.to(dev)):
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[0].float()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(toks, device=logits.device)[:, None])[:, 0]
    pair_t = torch.tensor(pair, device=nll.device)
    total = torch.zeros(len(prompts), device=nll.device).index_add(0, pair_t, nll)
    return (total / torch.bincount(pair_t, minlength=len(prompts))).cpu()


def pairs(req: EditRequest) -> list[tuple[str, str, str]]:
    """(prompt, preferred answer, other answer) per prompt: (o*, o) after the rewrite and paraphrase prompts,
    (o, o*) after each neighbour."""
    if not req.target_true:
        raise ValueError(f"case {req.case_id}: CounterFact metrics need target_true (the true object o)")
    own = [(p, req.target_new, req.target_true) for p in [req.text, *req.paraphrase_prompts]]
    return own + [(n, a, req.target_new) for n, a in zip(req.neighborhood_prompts, req.neighborhood_answers)]


def figures(req: EditRequest, nll: torch.Tensor) -> dict[str, float]:
    """The six figures from NLL [prompts, 2] of (preferred, other) per prompt, in the order of `pairs`."""
    out, start = {}, 0
    for name, n in [("efficacy", 1), ("paraphrase", len(req.paraphrase_prompts)),
                    ("neighborhood", len(req.neighborhood_prompts))]:
        x = nll[start:start + n]
        start += n
        # score: the preferred answer has the lower NLL; magnitude: the probability gap
        out[f"{name}_score"] = (x[:, 0] < x[:, 1]).double().mean().item() if n else math.nan
        out[f"{name}_magnitude"] = (torch.exp(-x[:, 0]) - torch.exp(-x[:, 1])).double().mean().item() if n else math.nan
    return out


def counterfact_scores(lm: LM, req: EditRequest) -> dict[str, float]:
    """The six CounterFact figures for one case, one padded pass of two rows per prompt: the reference
    implementation that `counterfact_many` is checked and benchmarked against (tests/test_fast_scoring.py)."""
    ps = pairs(req)
    prompts = [p for p, _, _ in ps for _ in (0, 1)]
    targets = [t for _, a, b in ps for t in (a, b)]
    return figures(req, target_nll(lm, prompts, targets).view(-1, 2))


def counterfact_many(lm: LM, cases: list[tuple[EditRequest, dict | None]]) -> list[dict[str, float]]:
    """The six CounterFact figures of each case (its pre-edit dict is not used), all cases in a few passes."""
    ps = [pairs(req) for req, _ in cases]
    ids = {t: target_ids(lm, t) for c in ps for _, a, b in c for t in (a, b)}
    flat = [(p, ids[t]) for c in ps for p, a, b in c for t in (a, b)]
    reads = forced_reads(lm, [p for p, _ in flat], [t for _, t in flat])
    nll = torch.stack([-lp.sum() / len(lp) for _, lp in reads]) if reads else torch.zeros(0)  # NLL(t | p)
    out, start = [], 0
    for (req, _), c in zip(cases, ps):
        out.append(figures(req, nll[start:start + 2 * len(c)].view(-1, 2)))
        start += 2 * len(c)
    return out


def ngram_entropy(text: str, n: int) -> float:
    grams = Counter(zip(*[text.split()[i:] for i in range(n)]))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(texts: list[str]) -> float:
    """Weighted n-gram entropy (bigrams 2/3, trigrams 4/3), averaged over generations."""
    return sum(2 / 3 * ngram_entropy(t, 2) + 4 / 3 * ngram_entropy(t, 3) for t in texts) / max(len(texts), 1)

"""zsRE metrics (MEND / ROME): teacher-forced token accuracy, in the CounterFact column names.

    efficacy_score      token accuracy of o* (alt) after the question: at each target position, does the argmax
                        equal the target token; averaged over the target's tokens
    paraphrase_score    the same after the rephrased question(s) (generalization)
    portability_score   token accuracy of the portability answer after its one-hop question (the efficacy's
                        definition); None for a case without one
    neighborhood_score  locality: share of the loc answer's tokens (teacher-forced after loc + "?", as ROME's zsRE
                        eval does) whose argmax is unchanged by the edit, i.e. equals the pre-edit argmax
    *_magnitude         mean probability of the reference tokens (o*'s tokens; for locality the pre-edit argmaxes)

The locality needs the unedited predictions: score the case before the edit (its `neighborhood_argmax` holds
them, and its neighborhood figures are 1 by definition), then after it with that dict as `pre` (plain or
`pre_`-prefixed keys). `zsre_many` scores many cases in a few passes; `zsre_scores`, one case at a time, is the
reference it is checked and benchmarked against.
"""
from __future__ import annotations

import math
from itertools import accumulate

import torch

from kedit_ray.editors.toolkit import pad, target_ids
from kedit_ray.eval.forced import forced_reads
from kedit_ray.models import LM, head_at
from kedit_ray.requests import EditRequest


def loc_prompt(text: str) -> str:
    """ROME's zsRE evaluation asks the NQ question with a "?" appended."""
    return text if text.rstrip().endswith("?") else text + "?"


@torch.no_grad()
def teacher_forced(lm: LM, prompts: list[str], targets: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per (prompt, target ids): the argmax token and the softmax over the vocabulary at each target position,
    given the prompt and the target's earlier tokens. Returns (argmax [n], probs [n, vocab]) per pair."""
    rows, r, c = [], [], []
    for i, (p, tgt) in enumerate(zip(prompts, targets)):
        ctx = lm.tok(p).input_ids
        rows.append(ctx + tgt[:-1])
        r += [i] * len(tgt)
        c += range(len(ctx) - 1, len(ctx) - 1 + len(tgt))
    ids, mask = pad(rows, lm.tok.pad_token_id, lm.input_device)
    dev = lm.device_of(lm.arch.lm_head)
    with head_at(lm.model, lm.arch.lm_head, torch.tensor(r, device=dev), torch.tensor(c, device=dev)):
        probs = torch.softmax(lm.model(input_ids=ids, attention_mask=mask).logits[0].float(), -1).cpu()
    out, start = [], 0
    for tgt in targets:
        p = probs[start:start + len(tgt)]
        out.append((p.argmax(-1), p))
        start += len(tgt)
    return out


def _accuracy(argmax: list[torch.Tensor], refs: list[list[int]], probs: list[torch.Tensor]) -> tuple[float, float]:
    """Token accuracy (argmax == reference token) and mean reference-token probability `probs`, averaged per prompt
    over its tokens, then over prompts."""
    if not argmax:
        return math.nan, math.nan
    acc = [(a == torch.tensor(ref)).double().mean().item() for a, ref in zip(argmax, refs)]
    mag = [p.double().mean().item() for p in probs]
    return sum(acc) / len(acc), sum(mag) / len(mag)


def pre_argmax(req: EditRequest, pre: dict, n: int) -> list[int]:
    """The pre-edit argmaxes of the loc answer's `n` tokens, from the case's pre-edit scores."""
    ref = pre.get("neighborhood_argmax", pre.get("pre_neighborhood_argmax"))
    if ref is None or len(ref) != n:
        raise ValueError(f"case {req.case_id}: zsRE locality needs the pre-edit predictions "
                         f"('neighborhood_argmax' of zsre_scores on the unedited model)")
    return list(ref)


def zsre_scores(lm: LM, req: EditRequest, pre: dict | None = None) -> dict:
    """The zsRE figures for one case on the model as it is now, one padded pass of a row per prompt with the
    whole softmax kept; `pre` is this function's result on the unedited model (needed for locality after an
    edit). The reference implementation of `zsre_many` (tests/test_fast_scoring.py, benchmarks/bench_scoring.py)."""
    new = target_ids(lm, req.target_new)
    groups = {"efficacy": [req.text], "paraphrase": list(req.paraphrase_prompts)}
    port = [target_ids(lm, a) for a in req.portability_answers]
    locs = [loc_prompt(n) for n in req.neighborhood_prompts]
    answers = [target_ids(lm, a) for a in req.neighborhood_answers]
    prompts = groups["efficacy"] + groups["paraphrase"] + list(req.portability_prompts) + locs
    n_new = len(prompts) - len(port) - len(locs)
    res = teacher_forced(lm, prompts, [new] * n_new + port + answers) if prompts else []

    def accuracy(part, refs):
        return _accuracy([a for a, _ in part], refs, [p.gather(1, torch.tensor(r)[:, None])[:, 0]
                                                      for (_, p), r in zip(part, refs)])

    out: dict = {}
    start = 0
    for name, ps in groups.items():
        out[f"{name}_score"], out[f"{name}_magnitude"] = accuracy(res[start:start + len(ps)], [new] * len(ps))
        start += len(ps)
    out["portability_score"] = accuracy(res[start:start + len(port)], port)[0] if port else None
    start += len(port)
    loc_res = res[start:]
    argmax = [int(t) for am, _ in loc_res for t in am]
    ref = argmax if pre is None else pre_argmax(req, pre, len(argmax))
    refs, k = [], 0
    for am, _ in loc_res:
        refs.append(list(ref[k:k + len(am)]))
        k += len(am)
    out["neighborhood_score"], out["neighborhood_magnitude"] = accuracy(loc_res, refs)
    out["neighborhood_argmax"] = argmax
    return out


def zsre_many(lm: LM, cases: list[tuple[EditRequest, dict | None]]) -> list[dict]:
    """`zsre_scores` of each (case, its pre-edit dict or None), all cases in a few passes."""
    blocks = []   # per case and block: (prompt, forced ids, reference ids or None: the argmax) per prompt
    for req, pre in cases:
        new = target_ids(lm, req.target_new)
        port = [target_ids(lm, a) for a in req.portability_answers]
        answers = [target_ids(lm, a) for a in req.neighborhood_answers]
        ref = None if pre is None else pre_argmax(req, pre, sum(map(len, answers)))
        ends = accumulate(map(len, answers))
        blocks.append({"efficacy": [(req.text, new, new)],
                       "paraphrase": [(p, new, new) for p in req.paraphrase_prompts],
                       "portability": [(p, a, a) for p, a in zip(req.portability_prompts, port)],
                       "neighborhood": [(loc_prompt(n), a, None if ref is None else ref[e - len(a):e])
                                        for n, a, e in zip(req.neighborhood_prompts, answers, ends)]})
    flat = [x for b in blocks for xs in b.values() for x in xs]
    res = iter(forced_reads(lm, [p for p, _, _ in flat], [t for _, t, _ in flat], [r for _, _, r in flat]))
    out = []
    for b in blocks:
        figs, argmax = {}, {}
        for name, xs in b.items():
            got = [next(res) for _ in xs]
            argmax[name] = [a for a, _ in got]
            refs = [a.tolist() if r is None else r for (_, _, r), a in zip(xs, argmax[name])]
            figs[name] = _accuracy(argmax[name], refs, [lp.exp() for _, lp in got])
        out.append({"efficacy_score": figs["efficacy"][0], "efficacy_magnitude": figs["efficacy"][1],
                    "paraphrase_score": figs["paraphrase"][0], "paraphrase_magnitude": figs["paraphrase"][1],
                    "portability_score": figs["portability"][0] if b["portability"] else None,
                    "neighborhood_score": figs["neighborhood"][0], "neighborhood_magnitude": figs["neighborhood"][1],
                    "neighborhood_argmax": [int(t) for a in argmax["neighborhood"] for t in a]})
    return out

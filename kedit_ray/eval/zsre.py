"""zsRE metrics (MEND / ROME): teacher-forced token accuracy, in the CounterFact column names.

    efficacy_score      token accuracy of o* (alt) after the question: at each target position, does the argmax
                        equal the target token; averaged over the target's tokens
    paraphrase_score    the same after the rephrased question(s) (generalization)
    portability_score   token accuracy of the portability answer after its one-hop question (the efficacy's
                        definition); None for a case without one
    neighborhood_score  locality: share of the loc answer's tokens (teacher-forced after loc + "?", as ROME's zsRE
                        eval does) whose argmax is unchanged by the edit, i.e. equals the pre-edit argmax
    *_magnitude         mean probability of the reference tokens (o*'s tokens; for locality the pre-edit argmaxes)

The locality needs the unedited predictions: call `zsre_scores(lm, req)` before the edit (its
`neighborhood_argmax` holds them, and its neighborhood figures are 1 by definition), then
`zsre_scores(lm, req, pre)` after it with that dict (plain or `pre_`-prefixed keys).
"""
from __future__ import annotations

import math

import torch

from kedit_ray.editors.toolkit import pad, target_ids
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


def _accuracy(results: list[tuple[torch.Tensor, torch.Tensor]], refs: list[list[int]]) -> tuple[float, float]:
    """Token accuracy and mean reference-token probability, averaged per prompt over its tokens, then over prompts."""
    if not results:
        return math.nan, math.nan
    acc, mag = [], []
    for (am, p), ref in zip(results, refs):
        ref_t = torch.tensor(ref)
        acc.append((am == ref_t).double().mean().item())
        mag.append(p.gather(1, ref_t[:, None]).double().mean().item())
    return sum(acc) / len(acc), sum(mag) / len(mag)


def zsre_scores(lm: LM, req: EditRequest, pre: dict | None = None) -> dict:
    """The zsRE figures for one case on the model as it is now; `pre` is this function's result on the
    unedited model (needed for locality after an edit)."""
    new = target_ids(lm, req.target_new)
    groups = {"efficacy": [req.text], "paraphrase": list(req.paraphrase_prompts)}
    port = [target_ids(lm, a) for a in req.portability_answers]
    locs = [loc_prompt(n) for n in req.neighborhood_prompts]
    answers = [target_ids(lm, a) for a in req.neighborhood_answers]
    prompts = groups["efficacy"] + groups["paraphrase"] + list(req.portability_prompts) + locs
    n_new = len(prompts) - len(port) - len(locs)
    res = teacher_forced(lm, prompts, [new] * n_new + port + answers) if prompts else []
    out: dict = {}
    start = 0
    for name, ps in groups.items():
        out[f"{name}_score"], out[f"{name}_magnitude"] = _accuracy(res[start:start + len(ps)], [new] * len(ps))
        start += len(ps)
    out["portability_score"] = _accuracy(res[start:start + len(port)], port)[0] if port else None
    start += len(port)
    loc_res = res[start:]
    argmax = [int(t) for am, _ in loc_res for t in am]
    if pre is None:
        ref = argmax
    else:
        ref = pre.get("neighborhood_argmax", pre.get("pre_neighborhood_argmax"))
        if ref is None or len(ref) != len(argmax):
            raise ValueError(f"case {req.case_id}: zsRE locality needs the pre-edit predictions "
                             f"('neighborhood_argmax' of zsre_scores on the unedited model)")
    refs, k = [], 0
    for am, _ in loc_res:
        refs.append(list(ref[k:k + len(am)]))
        k += len(am)
    out["neighborhood_score"], out["neighborhood_magnitude"] = _accuracy(loc_res, refs)
    out["neighborhood_argmax"] = argmax
    return out

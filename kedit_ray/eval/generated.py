"""Generated answers (issue 19 §3): does the model say the target on its own?

    efficacy_generated    1 if the greedy continuation of the prompt starts with o*, else 0
    paraphrase_generated  the share of the paraphrase prompts whose greedy continuation starts with o*

"Starts with" after normalisation: lower case, whitespace runs made one space, leading whitespace dropped (so
"\\n Paris is" matches "paris"). Teacher forcing (the `_score` columns) asks whether o* beats o, or whether each of
o*'s tokens is the argmax given the right earlier ones; here the model's own earlier tokens are fed back.

One batched greedy decode per case (left-padded, KV cache): a row stops as soon as its text starts with the target
or can no longer (its text is not a prefix of the target), and after the target's tokens + SLACK at most, so the
cost is one pass over the prompts plus a step per target token.
"""
from __future__ import annotations

import math

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kedit_ray.editors.toolkit import target_ids
from kedit_ray.models import LM
from kedit_ray.requests import EditRequest

SLACK = 3   # new tokens allowed beyond the target's own, for a leading newline or a different split of the target


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@torch.no_grad()
def greedy(lm: LM, prompts: list[str], max_new_tokens: int, stop: StoppingCriteria | None = None) -> list[list[int]]:
    """Greedy continuations' token ids (left-padded batch, KV cache); `stop` may end rows early."""
    lm.tok.padding_side = "left"
    try:
        enc = lm.tok(prompts, return_tensors="pt", padding=True).to(lm.input_device)
    finally:
        lm.tok.padding_side = "right"
    out = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                            pad_token_id=lm.tok.pad_token_id,
                            stopping_criteria=StoppingCriteriaList([stop] if stop else []))
    return out[:, enc.input_ids.shape[1]:].tolist()


def generate(lm: LM, prompts: list[str], max_new_tokens: int = 50) -> list[str]:
    """Greedy generations (fluency)."""
    return lm.tok.batch_decode(greedy(lm, prompts, max_new_tokens), skip_special_tokens=True)


class _Verdicts(StoppingCriteria):
    """Per row: stop once the continuation starts with the target or cannot; `match` holds the verdicts."""

    def __init__(self, lm: LM, targets: list[str]):
        self.tok, self.targets = lm.tok, [normalise(t) for t in targets]
        self.start: int | None = None   # the prompts' padded length, known at the first call
        self.match = [False] * len(targets)
        self.done = [False] * len(targets)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        for i, row in enumerate(input_ids[:, self.start:].tolist()):
            if not self.done[i]:
                text = normalise(self.tok.decode(row, skip_special_tokens=True))
                self.match[i] = text.startswith(self.targets[i])
                self.done[i] = self.match[i] or not self.targets[i].startswith(text)
        return torch.tensor(self.done, device=input_ids.device)


def starts_with(lm: LM, prompts: list[str], targets: list[str]) -> list[bool]:
    """Whether each prompt's greedy continuation starts with its target (normalised; see the module docstring)."""
    if not prompts:
        return []
    verdicts = _Verdicts(lm, targets)
    greedy(lm, prompts, max(len(target_ids(lm, t)) for t in targets) + SLACK, verdicts)
    return verdicts.match


def generated_scores(lm: LM, req: EditRequest) -> dict[str, float]:
    """efficacy_generated and paraphrase_generated (NaN without paraphrases) on the model as it is now."""
    prompts = [req.text, *req.paraphrase_prompts]
    match = starts_with(lm, prompts, [req.target_new] * len(prompts))
    para = match[1:]
    return {"efficacy_generated": float(match[0]),
            "paraphrase_generated": sum(para) / len(para) if para else math.nan}

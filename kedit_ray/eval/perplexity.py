"""General ability: the model's perplexity on the first N documents of the default stats corpus (issue 19 §2).

perplexity = exp(Σ NLL / Σ tokens), the NLL of each token given the ones before it, pooled over every predicted
token of every document (a document of one token predicts none and adds nothing). Each document is tokenized with
the tokenizer's defaults and truncated to MAX_LEN tokens (or the model's context when shorter), one forward pass
each, no grad, stopped at the final norm; the LM head then runs on a few positions at a time (`LM.head_logits`),
and NLL = logsumexp(logits) − the token's logit, in float32 (float64 for a float64 model), summed in float64.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from kedit_ray.models import LM, Trace
from kedit_ray.stats.cache import context_length
from kedit_ray.stats.corpus import DEFAULT_CORPUS, documents

MAX_LEN = 256   # tokens per document: a quarter of the stats' 1024, enough for WikiText's paragraphs, cheap on a CPU
HEAD_ROWS = 64  # positions per LM-head call: gemma-3-270m's 262k-word head then holds 64 MiB of logits, not 256 MiB


def corpus_docs(n: int) -> list[str]:
    """The first `n` documents of the default stats corpus (the shipped WikiText-2 test split)."""
    return list(itertools.islice(documents(DEFAULT_CORPUS), n))


@torch.no_grad()
def perplexity(lm: LM, docs: list[str], max_len: int = MAX_LEN) -> float:
    """exp(mean token NLL) of `lm` as it is now over `docs`, each truncated to min(max_len, context) tokens."""
    max_len = min(max_len, context_length(lm.model.config))
    nll, tokens = 0.0, 0
    for ids in lm.tok(docs, truncation=True, max_length=max_len)["input_ids"]:
        if len(ids) < 2:
            continue
        with Trace(lm.model, lm.arch.final_norm, retain_output=True, stop=True) as final:   # the body, no head
            lm.model(input_ids=torch.tensor([ids], device=lm.input_device), use_cache=False)
        h = final.output[0, :-1].to(lm.device_of(lm.arch.lm_head))
        for i in range(0, len(h), HEAD_ROWS):   # the head a few positions at a time: [HEAD_ROWS, vocab] at most
            logits = lm.head_logits(h[i:i + HEAD_ROWS])
            nxt = torch.tensor(ids[i + 1:i + 1 + HEAD_ROWS], device=logits.device)
            nll += (torch.logsumexp(logits, -1) - logits.gather(1, nxt[:, None])[:, 0]).double().sum().item()
        tokens += len(ids) - 1
    if tokens == 0:
        raise ValueError(f"perplexity: the {len(docs)} document(s) hold no token to predict")
    return math.exp(nll / tokens)


def collapsed(post: float, pre: float, factor: float) -> bool:
    """An edit collapsed the model when it multiplied the perplexity by more than `factor` (--collapse-factor)."""
    return post > factor * pre


@dataclass
class Probe:
    """--ppl-docs on one worker: the documents, the collapse factor, whether a sequential run stops at the first
    collapse, and the unedited model's perplexity, measured once (`before`) and kept."""

    docs: list[str]
    factor: float
    stop: bool = False
    pre: float | None = None

    @classmethod
    def of(cls, spec) -> Probe | None:
        """The probe an EvalSpec asks for; None without --ppl-docs."""
        return cls(corpus_docs(spec.ppl_docs), spec.collapse_factor, spec.stop_on_collapse) if spec.ppl_docs else None

    def before(self, lm: LM) -> None:
        """Measure the unedited model (call it before any edit); later calls keep the first value."""
        if self.pre is None:
            self.pre = perplexity(lm, self.docs)

    def after(self, lm: LM) -> dict:
        """The row columns of the model as it is now."""
        return self.columns(perplexity(lm, self.docs))

    def columns(self, post: float) -> dict:
        """perplexity, pre_perplexity and collapsed, for a perplexity `post` measured after edits."""
        return {"perplexity": post, "pre_perplexity": self.pre, "collapsed": collapsed(post, self.pre, self.factor)}

"""One case at a time: pre-edit metrics, edit, post-edit metrics, revert. Ray-free; the workers wrap it."""
from __future__ import annotations

import time

from kedit_ray.editors import make_editor
from kedit_ray.eval import score
from kedit_ray.eval.counterfact import fluency, generate
from kedit_ray.eval.perplexity import collapsed, corpus_docs, perplexity
from kedit_ray.models import LM
from kedit_ray.requests import EditRequest
from kedit_ray.spec import EvalSpec


class CaseRunner:
    """The single protocol's runner: the spec's editor on the worker's model, scored by the spec's dataset."""

    def __init__(self, spec: EvalSpec, lm: LM):
        self.spec, self.lm = spec, lm
        self.editor = make_editor(spec.method, spec.params)
        self.ppl_docs = corpus_docs(spec.ppl_docs) if spec.ppl_docs else []
        self._pre_ppl: float | None = None   # the unedited model's, measured once per worker

    def pre_perplexity(self) -> float:
        """The unedited model's perplexity (--ppl-docs), measured on first use, before any edit, then kept."""
        if self._pre_ppl is None:
            self._pre_ppl = perplexity(self.lm, self.ppl_docs)
        return self._pre_ppl

    def scores(self, req: EditRequest, prefix: str = "", pre: dict | None = None) -> dict:
        out = score(self.spec.dataset, self.lm, req, pre)
        if self.spec.fluency:
            out["fluency"] = fluency(generate(self.lm, [req.text, *req.paraphrase_prompts]))
        return {prefix + k: v for k, v in out.items()}

    def run(self, req: EditRequest) -> dict:
        pre = self.scores(req, "pre_")
        ppl = {"pre_perplexity": self.pre_perplexity()} if self.ppl_docs else {}   # before the edit: cached once
        t0 = time.perf_counter()
        delta = self.editor.edit(self.lm, req)
        seconds = time.perf_counter() - t0
        with delta.applied(self.lm.model):
            post = self.scores(req, pre=pre)
            if ppl:   # general ability after the edit, and whether the edit collapsed the model
                ppl["perplexity"] = perplexity(self.lm, self.ppl_docs)
                ppl["collapsed"] = collapsed(ppl["perplexity"], ppl["pre_perplexity"], self.spec.collapse_factor)
        meta = delta.meta   # what the editor reports (ROME: all of these; MEMIT: no key_s)
        numeric = {k: v for k, v in {**post, **pre}.items() if not isinstance(v, list)}  # zsRE's argmax lists
        return {"case_id": req.case_id, "method": self.spec.method, "model": self.spec.model.name, **numeric, **ppl,
                "edit_seconds": seconds, "error": None, "delta_norm": sum(delta.norms().values()),
                **{k: meta[k] for k in ("layer", "cov", "v_steps", "key_s", "value_s", "solve_s") if k in meta}}

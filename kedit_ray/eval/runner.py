"""One case at a time: pre-edit metrics, edit, post-edit metrics, revert. Ray-free; the workers wrap it."""
from __future__ import annotations

import time

from kedit_ray.editors import make_editor
from kedit_ray.eval import Scorer
from kedit_ray.eval.perplexity import Probe
from kedit_ray.models import LM
from kedit_ray.requests import EditRequest
from kedit_ray.spec import EvalSpec


class CaseRunner:
    """The single protocol's runner: the spec's editor on the worker's model, scored by the spec's dataset."""

    def __init__(self, spec: EvalSpec, lm: LM):
        self.spec, self.lm = spec, lm
        self.editor = make_editor(spec.method, spec.params)
        self.scorer = Scorer.of(spec)   # the dataset's figures, --generate, --fluency
        self.probe = Probe.of(spec)   # --ppl-docs: the unedited model's perplexity is measured once per worker

    def scores(self, req: EditRequest, prefix: str = "", pre: dict | None = None) -> dict:
        return {prefix + k: v for k, v in self.scorer(self.lm, req, pre).items()}

    def run(self, req: EditRequest) -> dict:
        pre = self.scores(req, "pre_")
        if self.probe:
            self.probe.before(self.lm)
        t0 = time.perf_counter()
        delta = self.editor.edit(self.lm, req)
        seconds = time.perf_counter() - t0
        with delta.applied(self.lm.model):
            post = self.scores(req, pre=pre)
            ppl = self.probe.after(self.lm) if self.probe else {}   # general ability after the edit, collapse
        meta = delta.meta   # what the editor reports (ROME: all of these; MEMIT: no key_s)
        numeric = {k: v for k, v in {**post, **pre}.items() if not isinstance(v, list)}  # zsRE's argmax lists
        return {"case_id": req.case_id, "method": self.spec.method, "model": self.spec.model.name, **numeric, **ppl,
                "edit_seconds": seconds, "error": None, "delta_norm": sum(delta.norms().values()),
                **{k: meta[k] for k in ("layer", "cov", "v_steps", "key_s", "value_s", "solve_s") if k in meta}}

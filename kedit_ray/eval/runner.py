"""One case at a time: pre-edit metrics, edit, post-edit metrics, revert. Ray-free; the workers wrap it."""
from __future__ import annotations

import time

from kedit_ray.editors import make_editor
from kedit_ray.eval.counterfact import counterfact_scores, fluency, generate
from kedit_ray.models import load
from kedit_ray.requests import EditRequest


class CaseRunner:
    """config: model, method, params (editor hyper-parameters), device_map, templates, fluency (bool)."""

    def __init__(self, config: dict):
        self.config = config
        self.lm = load(config["model"], device_map=config.get("device_map"), templates=config.get("templates"))
        self.editor = make_editor(config["method"], config.get("params"))

    def scores(self, req: EditRequest, prefix: str = "") -> dict:
        out = counterfact_scores(self.lm, req)
        if self.config.get("fluency"):
            out["fluency"] = fluency(generate(self.lm, [req.text, *req.paraphrase_prompts]))
        return {prefix + k: v for k, v in out.items()}

    def run(self, req: EditRequest) -> dict:
        pre = self.scores(req, "pre_")
        t0 = time.perf_counter()
        delta = self.editor.edit(self.lm, req)
        seconds = time.perf_counter() - t0
        with delta.applied(self.lm.model):
            post = self.scores(req)
        meta = delta.meta
        return {"case_id": req.case_id, "method": self.config["method"], "model": self.config["model"],
                **post, **pre, "edit_seconds": seconds, "error": None, "layer": meta["layer"], "cov": meta["cov"],
                "v_steps": meta["v_steps"], "delta_norm": sum(delta.norms().values()),
                **{k: meta[k] for k in ("key_s", "value_s", "solve_s")}}


"""A case runner for the driver tests: metrics derived from case_id, no model.

spec.options: "fail" (case_ids that raise), "sleep" (seconds per case), and "die_case" / "die_file" /
"die_times" (the worker process exits on die_case, die_times times in all, counted in die_file).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from kedit_ray.requests import EditRequest


def fake_row(case_id: int, method: str, model: str) -> dict:
    x = case_id / 100
    return {"case_id": case_id, "method": method, "model": model,
            "efficacy_score": 1.0, "efficacy_magnitude": x, "paraphrase_score": 0.5, "paraphrase_magnitude": x / 2,
            "neighborhood_score": 0.8, "neighborhood_magnitude": 0.1,
            "pre_efficacy_score": 0.0, "pre_efficacy_magnitude": -x, "pre_paraphrase_score": 0.25,
            "pre_paraphrase_magnitude": -x / 2, "pre_neighborhood_score": 1.0, "pre_neighborhood_magnitude": 0.2,
            "edit_seconds": x, "error": None, "layer": 3}


class FakeRunner:
    needs_model = False

    def __init__(self, spec, lm=None):
        self.spec, self.options = spec, spec.options

    def run(self, request: EditRequest) -> dict:
        c = self.options
        if request.case_id == c.get("die_case"):
            counter = Path(c["die_file"])
            died = int(counter.read_text()) if counter.exists() else 0
            if died < c.get("die_times", 1):
                counter.write_text(str(died + 1))
                os._exit(1)
        if request.case_id in c.get("fail", []):
            raise ValueError(f"case {request.case_id} is bad")
        time.sleep(c.get("sleep", 0.0))
        return fake_row(request.case_id, self.spec.method, self.spec.model.name)


"""benchmarks/gpu_check.py end to end on the CPU, as the GPU machine runs it but tiny: assets prepared from the tiny
model's directory (no weights travel), then `--quick` with Ray, rich and hypothesis unimportable (the GPU machine
has none of them)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ABSENT = ("ray", "rich", "hypothesis")
# runs the script as `python benchmarks/gpu_check.py ARGS` does, with ABSENT made unimportable, then checks that
# nothing of kedit_ray's Ray side was loaded
RUN = """
import runpy, sys
absent = {absent!r}
for name in absent:
    sys.modules[name] = None
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
loaded = [m for m in sys.modules if m.startswith("kedit_ray.distributed")
          or (m.split(".")[0] in absent and sys.modules[m] is not None)]
assert not loaded, loaded
"""
MEASURES = ("ROME, float32, C = I", "ROME, bfloat16, C = I", "MEMIT z, all requests in one batch",
            "MEMIT z, one request at a time", "MEMIT z batch speed-up", "stats, 4 layers in one pass", "bare forward to the same depth",
            "stats throughput / bare forward", "trace, batched restorations", "trace, one pass per restoration",
            "trace batch speed-up")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}   # CPU only, one thread
    done = subprocess.run([sys.executable, "-c", RUN.format(absent=ABSENT, script=str(SCRIPT), args=list(args))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_gpu_check_quick_on_a_tiny_model(tiny_dir, tmp_path):
    assets = tmp_path / "assets"
    run("--prepare", "--model", tiny_dir, "--assets", str(assets))
    files = {f.name for f in assets.iterdir()}
    assert {"config.json", "tokenizer.json.gz"} <= files and not any(f.endswith(".safetensors") for f in files)

    out = tmp_path / "report.json"
    done = run("--quick", "--threads", "1", "--assets", str(assets), "--model", "tiny", "--out", str(out))
    report = json.loads(out.read_text())
    assert "no CUDA: CPU only" in done.stdout
    assert [r["measure"] for r in report["rows"]] == list(MEASURES)
    for r in report["rows"]:
        assert r["measure"] in done.stdout
        assert r["cuda"] is None and r["speed-up"] is None
        assert math.isfinite(r["cpu"]) and r["cpu"] > 0, r
    assert report["model"].startswith("tiny architecture, random weights (seed 0): 4 layers, hidden 32")
    # the two ways of tracing compute the same probabilities (float32 rounding apart)
    assert report["checks"]["trace on cpu: max |batched - one pass per restoration|"] < 1e-4

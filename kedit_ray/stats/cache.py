"""Stats files: one safetensors file per (model, layer, module, corpus, samples, max_len, dtype).

    {cache}/{model}/{corpus}-{corpus sha[:12]}/{module}.L{layer:02d}.n{samples}.t{max_len}.{dtype}.safetensors

tensor `mom2` = Σ k kᵀ / count (uncentered), metadata: count, model, layer, module, corpus, samples, max_len,
dtype, fingerprint (of the model's weights), dim (d_in), corpus_fingerprint, documents (used), sha256 (of mom2).
A run in progress keeps its float64 sums and finished shards in one `.partial.*` file beside them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kedit_ray.io import save_tensors
from kedit_ray.models import LM, get_module, weight_of
from kedit_ray.models.loading import kedit_home

MODULES = ("mlp_out", "mlp_in")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class StatsError(ValueError):
    """A stats file that cannot be used: corrupted, or computed for another model, module or setting."""


def default_cache() -> Path:
    """`$KEDIT_STATS_CACHE`, else `$KEDIT_HOME/stats`."""
    return Path(os.environ.get("KEDIT_STATS_CACHE") or kedit_home() / "stats")


def context_length(config) -> int:
    config = config.get_text_config()          # an image-text model: its text model's
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a model (a worker can report it without the driver loading it)."""

    name: str
    fingerprint: str
    n_layers: int
    context: int
    dims: dict[str, list[int]]   # module -> d_in per layer

    @classmethod
    def of(cls, lm: LM) -> ModelInfo:
        dims = {m: [weight_of(get_module(lm.model, lm.arch.name(m, i))).shape[1] for i in range(lm.n_layers)]
                for m in MODULES}
        return cls(lm.name, lm.fingerprint, lm.n_layers, context_length(lm.model.config), dims)


def model_slug(name: str) -> str:
    """Hub ids keep their name ("org--model"); local paths get their base name and a hash of the full path."""
    path = Path(name).expanduser()
    if path.exists():
        full = str(path.resolve())
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', path.resolve().name)}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "--"))


@dataclass(frozen=True)
class Key:
    model: str
    module: str
    corpus: str               # as the user gave it (shown in commands and metadata)
    corpus_fingerprint: str
    corpus_slug: str
    samples: int
    max_len: int
    dtype: str

    def folder(self, cache: Path) -> Path:
        return Path(cache) / model_slug(self.model) / f"{self.corpus_slug}-{self.corpus_fingerprint[:12]}"

    def path(self, cache: Path, layer: int) -> Path:
        return self.folder(cache) / f"{self.module}.L{layer:02d}.n{self.samples}.t{self.max_len}.{self.dtype}.safetensors"

    def partial_path(self, cache: Path, layers: list[int], shard_docs: int) -> Path:
        tag = "-".join(f"{layer:02d}" for layer in layers)
        return self.folder(cache) / f".partial.{self.module}.L{tag}.n{self.samples}.t{self.max_len}.s{shard_docs}.safetensors"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.contiguous().numpy()).cast("B")).hexdigest()


def save(key: Key, cache: Path, layer: int, total: torch.Tensor, count: int, docs: int, fingerprint: str) -> dict:
    """Write mom2 = Σ k kᵀ / count in the key's dtype, atomically; returns the file's info."""
    mom2 = (total / count).to(DTYPES[key.dtype])
    meta = {"count": count, "model": key.model, "layer": layer, "module": key.module, "corpus": key.corpus,
            "samples": key.samples, "max_len": key.max_len, "dtype": key.dtype, "fingerprint": fingerprint,
            "dim": mom2.shape[0], "corpus_fingerprint": key.corpus_fingerprint, "documents": docs,
            "sha256": _digest(mom2)}
    path = save_tensors(key.path(cache, layer), {"mom2": mom2}, {k: str(v) for k, v in meta.items()})
    return {"path": str(path), **meta}


def load(path: Path, key: Key, layer: int, fingerprint: str | None = None,
         dim: int | None = None) -> tuple[torch.Tensor, dict]:
    """Read and check a stats file against what the caller expects; StatsError says what is wrong.

    Without `fingerprint` (no model loaded), the model name is checked instead of the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2 = f.get_tensor("mom2")
    except Exception as e:  # safetensors raises several types for a damaged file
        raise StatsError(f"stats file {path} is corrupted or not a stats file ({e}); delete it and recompute") from None
    missing = [k for k in ("count", "model", "layer", "module", "samples", "max_len", "dtype", "fingerprint", "dim",
                           "corpus_fingerprint", "sha256") if k not in meta]
    if missing:
        raise StatsError(f"stats file {path} lacks metadata {', '.join(missing)}; delete it and recompute")
    expect = {"module": key.module, "layer": str(layer), "dim": None if dim is None else str(dim),
              "fingerprint": fingerprint, "model": key.model if fingerprint is None else None,
              "samples": str(key.samples), "max_len": str(key.max_len), "dtype": key.dtype,
              "corpus_fingerprint": key.corpus_fingerprint}
    for k, want in expect.items():
        if want is not None and meta[k] != want:
            raise StatsError(f"stats file {path} is for {k}={meta[k]!r}, not {want!r} "
                             f"(model {meta['model']!r}, fingerprint {meta['fingerprint']}); refusing to use it")
    d = int(meta["dim"])
    if tuple(mom2.shape) != (d, d) or mom2.dtype != DTYPES[key.dtype] or _digest(mom2) != meta["sha256"] \
            or int(meta["count"]) <= 0:
        raise StatsError(f"stats file {path} is corrupted (shape {tuple(mom2.shape)}, {mom2.dtype}, "
                         f"checksum or count does not match its metadata); delete it and recompute")
    info = {"path": str(path), **{k: int(v) if k in ("count", "layer", "samples", "max_len", "dim", "documents")
                                  else v for k, v in meta.items()}}
    return mom2, info


def _partial_digest(sums: dict[int, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over the partial sums and the counts beside them (so a damaged partial file is never resumed)."""
    h = hashlib.sha256(json.dumps({k: meta[k] for k in ("done", "count", "docs")}, sort_keys=True).encode())
    for layer in sorted(sums):
        h.update(str(layer).encode())
        h.update(memoryview(sums[layer].contiguous().numpy()).cast("B"))
    return h.hexdigest()


def save_partial(path: Path, partial, done: set[int], header: dict) -> None:
    meta = {**header, "done": json.dumps(sorted(done)), "count": str(partial.count), "docs": str(partial.docs)}
    meta["sha256"] = _partial_digest(partial.sums, meta)
    save_tensors(path, {f"L{layer}": s for layer, s in partial.sums.items()}, meta)


def load_partial(path: Path, header: dict):
    """The sums and finished shards of an interrupted run, checked against their checksum and this run's header."""
    from safetensors import safe_open

    from kedit_ray.stats.accumulate import Partial

    again = "delete the file (or pass --recompute) to start over"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sums = {int(name[1:]): f.get_tensor(name) for name in f.keys()}
        done = set(json.loads(meta["done"]))
        partial = Partial(sums, int(meta["count"]), int(meta["docs"]))
        digest = _partial_digest(sums, meta)
    except Exception as e:
        raise StatsError(f"partial stats {path} are unreadable ({e}); {again}") from None
    if meta.get("sha256") != digest:
        raise StatsError(f"partial stats {path} are damaged (their checksum does not match); {again}")
    for k, want in header.items():
        if meta.get(k) != want:
            raise StatsError(f"partial stats {path} are for {k}={meta.get(k)!r}, not {want!r}; {again}")
    return partial, done


def header(key: Key, info: ModelInfo, layers: list[int], shard_docs: int) -> dict[str, str]:
    """What a partial file must agree on to be resumed."""
    return {k: str(v) for k, v in {**asdict(key), "fingerprint": info.fingerprint, "layers": json.dumps(layers),
                                   "shard_docs": shard_docs}.items() if k not in ("corpus", "dtype", "corpus_slug")}

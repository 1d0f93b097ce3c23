"""The driver: look up the cache, resume a partial run, sum the shards (here or on Ray workers), write C.

    C = E[k kᵀ] = Σ_shards Σ_tokens k kᵀ / count

Shard i holds documents [i·S, (i+1)·S) of the first `samples`. After each shard the running float64 sums and
the set of finished shards are written together, atomically, so a killed run resumes without counting a
shard twice; the result does not depend on how many workers summed the shards.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kedit_ray.models import LM, check_layer
from kedit_ray.spec import Resources
from kedit_ray.stats import cache as sc
from kedit_ray.stats import corpus as sp
from kedit_ray.stats.accumulate import Partial, accumulate

DEFAULT_CORPUS = sp.DEFAULT_CORPUS
# ROME's reference code takes 100,000 documents; the shipped corpus has 1,322, so by default all of them
DEFAULT_SAMPLES = 100_000

Shards = Iterator[tuple[int, list[str]]]
RunShards = Callable[[Shards, Callable[[int, int], None]], Iterator[tuple[int, Partial]]]


class MissingStats(FileNotFoundError):
    """The stats file is absent and computing it was not allowed; `command` computes it."""

    def __init__(self, path: Path, command: str):
        super().__init__(f"no layer statistics at {path}; compute them with:\n  {command}")
        self.path, self.command = path, command


def command_line(model: str, layers: Iterable[int], module: str, corpus: str, samples: int, max_len: int,
                 dtype: str, cache: Path) -> str:
    """The exact `kedit stats` call that computes these stats."""
    args = ["kedit", "stats", "--model", model, "--layers", ",".join(map(str, layers)), "--module", module,
            "--corpus", corpus, "--samples", str(samples), "--max-len", str(max_len), "--stats-dtype", dtype]
    if Path(cache) != sc.default_cache():
        args += ["--cache", str(cache)]
    return shlex.join(args)


def _key(lm: LM | str, module: str, corpus: str | Path, samples: int, max_len: int | None, dtype: str) -> sc.Key:
    if module not in sc.MODULES:
        raise ValueError(f"module must be one of {', '.join(sc.MODULES)}, not {module!r}")
    if dtype not in sc.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sc.DTYPES)}, not {dtype!r}")
    fingerprint = sp.fingerprint(corpus)  # a bad corpus fails here, before any model is touched
    max_len = _max_len(lm, max_len)
    if samples < 1 or max_len < 1:
        raise ValueError(f"samples and max_len must be positive (got {samples}, {max_len})")
    name = lm if isinstance(lm, str) else lm.name
    return sc.Key(name, module, str(corpus), fingerprint, sp.slug(corpus), samples, max_len, dtype)


def _max_len(lm: LM | str, max_len: int | None) -> int:
    """The default: min(model context, 1024); a model given by name is asked through its config only."""
    if max_len is not None:
        return max_len
    if isinstance(lm, str):
        from transformers import AutoConfig

        from kedit_ray.models.loading import resolve

        config = AutoConfig.from_pretrained(resolve(lm))
    else:
        config = lm.model.config
    return min(sc.context_length(config), 1024)


class _Progress:
    """A bar in documents with tokens/s (of this run) beside it; Ray workers report per shard."""

    def __init__(self, docs: int, done: Partial, enabled: bool):
        self.bar = tqdm(total=docs, initial=done.docs, unit="doc", dynamic_ncols=True, disable=not enabled,
                        desc="stats", file=sys.stderr)
        self.t0, self.tokens, self.shard_docs, self.shard_tokens = time.perf_counter(), 0, 0, 0

    def batch(self, docs: int, tokens: int) -> None:
        self.shard_docs += docs
        self.shard_tokens += tokens
        self._advance(docs, tokens)

    def shard(self, part: Partial) -> None:
        self._advance(part.docs - self.shard_docs, part.count - self.shard_tokens)
        self.shard_docs = self.shard_tokens = 0

    def _advance(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.t0):,.0f} tok/s", refresh=False)
        self.bar.update(docs)

    def close(self) -> None:
        self.bar.close()


def _unusable(error: sc.StatsError, path: Path, recompute: bool) -> None:
    """A damaged or foreign stats file: an error naming it, or (`recompute`) said and removed."""
    if not recompute:
        raise error
    print(f"[kedit] {error}; --recompute: computing it again", file=sys.stderr, flush=True)
    path.unlink()


def _compute(info: sc.ModelInfo, key: sc.Key, cache: Path, layers: list[int], shard_docs: int, progress: bool,
             run_shards: RunShards, recompute: bool = False) -> list[dict]:
    head = sc.header(key, info, layers, shard_docs)
    partial_path = key.partial_path(cache, layers, shard_docs)
    total, done = Partial(), set()
    if partial_path.exists():
        try:
            total, done = sc.load_partial(partial_path, head)
        except sc.StatsError as e:
            _unusable(e, partial_path, recompute)
    resumed = len(done)
    if resumed:
        print(f"[kedit] resuming {partial_path}: {resumed} shards ({total.docs} documents, {total.count} tokens) "
              f"already summed", file=sys.stderr, flush=True)
    bar = _Progress(sp.count(key.corpus, key.samples), total, progress)
    todo = ((i, docs) for i, docs in sp.shards(key.corpus, key.samples, shard_docs) if i not in done)
    for i, part in run_shards(todo, bar.batch):
        total.add(part)
        done.add(i)
        sc.save_partial(partial_path, total, done, head)
        bar.shard(part)
    bar.close()
    if total.count == 0:
        raise sc.StatsError(f"corpus {key.corpus} gave no tokens in its first {key.samples} documents")
    if total.docs < key.samples and Path(key.corpus) != DEFAULT_CORPUS:   # the shipped one is taken whole
        print(f"[kedit] corpus {key.corpus} has {total.docs} documents, fewer than --samples {key.samples}; "
              f"used them all", file=sys.stderr)
    infos = [{**sc.save(key, cache, layer, total.sums[layer], total.count, total.docs, info.fingerprint),
              "cached": False, "resumed_shards": resumed} for layer in layers]
    partial_path.unlink()
    return infos


def _cached(key: sc.Key, cache: Path, layers: list[int], lm: LM | None, recompute: bool = False) -> dict[int, dict]:
    """Checked infos of the layers whose files exist (a wrong file raises StatsError, or with `recompute` is
    removed, to be computed again)."""
    dims = sc.ModelInfo.of(lm).dims[key.module] if lm is not None else None
    found = {}
    for layer in layers:
        path = key.path(cache, layer)
        if path.exists():
            fp, dim = (lm.fingerprint, dims[layer]) if lm is not None else (None, None)
            try:
                found[layer] = {**sc.load(path, key, layer, fp, dim)[1], "cached": True}
            except sc.StatsError as e:
                _unusable(e, path, recompute)
    return found


def compute_stats(lm: LM | str, layers: Iterable[int], module: str = "mlp_out", corpus: str | Path = DEFAULT_CORPUS,
                  samples: int = DEFAULT_SAMPLES, max_len: int | None = None, batch_tokens: int = 4096,
                  dtype: str = "float32", cache: str | Path | None = None, workers: int = 1, shard_docs: int = 256,
                  progress: bool = True, address: str | None = None, load_kw: dict | None = None, pool=None,
                  gpus_per_worker: float = 0, cpus_per_worker: float | None = None,
                  recompute: bool = False) -> list[dict]:
    """C for several layers in one pass per batch; returns one info dict (path and metadata) per layer.

    `lm` is a loaded model or a name; by name, a cache hit loads nothing (the name is checked, not the weights),
    and a miss loads it with `load_kw` (device_map, templates, ...).
    With `workers` > 1 or a Ray `address` (or $RAY_ADDRESS), Ray workers (each loading the model by name) sum the
    shards; so do the workers of `pool` (an open kedit_ray.distributed pool); otherwise they are summed here,
    without Ray. A damaged or foreign cached or partial file is an error naming it; with `recompute` it is
    computed again."""
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("no layers requested")
    cache = Path(cache) if cache else sc.default_cache()
    key = _key(lm, module, corpus, samples, max_len, dtype)
    if not isinstance(lm, str):
        for layer in layers:
            check_layer(lm.model, layer)
    found = _cached(key, cache, layers, None if isinstance(lm, str) else lm, recompute)
    missing = [layer for layer in layers if layer not in found]
    resources = Resources(workers, cpus_per_worker, gpus_per_worker, address)
    if missing and (pool is not None or not resources.in_process):
        from kedit_ray.distributed.stats import stats_pool, sum_shards

        with contextlib.nullcontext(pool) if pool is not None else stats_pool(lm, resources, load_kw) as pool:
            info = pool.call("model_info")
            for layer in missing:
                if not 0 <= layer < info.n_layers:
                    raise ValueError(f"layer {layer} does not exist: the model has layers 0..{info.n_layers - 1}")
            computed = _compute(info, key, cache, missing, shard_docs, progress,
                                lambda todo, _batch: sum_shards(pool, todo, missing, module, key.max_len, batch_tokens),
                                recompute)
    elif missing:
        if isinstance(lm, str):
            from kedit_ray.models import load

            lm = load(lm, **{"device_map": "auto" if torch.cuda.is_available() else None, **(load_kw or {})})
        for layer in missing:
            check_layer(lm.model, layer)

        def run_here(todo: Shards, on_batch: Callable[[int, int], None]) -> Iterator[tuple[int, Partial]]:
            for i, docs in todo:
                yield i, accumulate(lm, missing, module, docs, key.max_len, batch_tokens, on_batch)

        computed = _compute(sc.ModelInfo.of(lm), key, cache, missing, shard_docs, progress, run_here, recompute)
    else:
        computed = []
    found.update(zip(missing, computed))
    return [found[layer] for layer in layers]


def load_stats(model: LM | str, layers: Iterable[int], module: str = "mlp_out", corpus: str | Path = DEFAULT_CORPUS,
               samples: int = DEFAULT_SAMPLES, max_len: int | None = None, dtype: str = "float32",
               cache: str | Path | None = None) -> dict[int, tuple[torch.Tensor, dict]]:
    """{layer: (C = E[k kᵀ] [d_in, d_in] on the CPU in the stored dtype, its info)} from the cache.

    A missing file raises MissingStats carrying the one `kedit stats` command that computes every missing
    layer; a file for another model (weights fingerprint; by name when `model` is a name), module or dim
    raises StatsError."""
    cache = Path(cache) if cache else sc.default_cache()
    key = _key(model, module, corpus, samples, max_len, dtype)
    lm = None if isinstance(model, str) else model
    layers = [layer if lm is None else check_layer(lm.model, layer) for layer in sorted(set(layers))]
    missing = [layer for layer in layers if not key.path(cache, layer).exists()]
    if missing:
        raise MissingStats(key.path(cache, missing[0]), command_line(key.model, missing, module, str(corpus), samples,
                                                                     key.max_len, dtype, cache))
    if lm is None:   # checked by model name here; the weights' fingerprint is in the info
        return {layer: sc.load(key.path(cache, layer), key, layer) for layer in layers}
    dims = sc.ModelInfo.of(lm).dims[module]
    return {layer: sc.load(key.path(cache, layer), key, layer, lm.fingerprint, dims[layer]) for layer in layers}


def layer_stats(lm: LM, layer: int, module: str = "mlp_out", corpus: str | Path = DEFAULT_CORPUS,
                samples: int = DEFAULT_SAMPLES, max_len: int | None = None, dtype: str = "float32",
                cache: str | Path | None = None, compute: bool = True, workers: int = 1) -> tuple[torch.Tensor, dict]:
    """C = E[k kᵀ] of one layer and its info (see load_stats), computed first when missing unless `compute`
    is False."""
    if compute:
        compute_stats(lm, [layer], module, corpus, samples, max_len, dtype=dtype, cache=cache, workers=workers)
    return load_stats(lm, [layer], module, corpus, samples, max_len, dtype, cache)[layer]

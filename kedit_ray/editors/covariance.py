"""C = E[k kᵀ] for the editors that weigh their update by it (ROME, MEMIT, AlphaEdit).

By default C comes from the layer statistics of the corpus shipped with the package (WikiText-2's test
split), computed once on first use and cached; `stats_corpus` names another corpus, and `use_cov=False`
(`--no-cov`) is the only way to C = I, labelled "identity" in every result.

A driver that runs editors on several workers resolves C once (`stats_need`, then `read_covariances`
by model name) and hands it to each worker's editor (`use_covariances`), which checks that it was made
for its model; an editor then never reads the stats cache of its own node.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from kedit_ray.editors.contract import Editor, option
from kedit_ray.models import LM, weight_of
from kedit_ray.options import positive
from kedit_ray.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, MissingStats, StatsError, compute_stats, load_stats

IDENTITY = "identity"


@dataclass
class CovParams:
    """Where C comes from; the fields every C-using editor's parameters share."""

    use_cov: bool = option(True, "C = I instead of the layer statistics (results then say C = identity)",
                           flag="--no-cov", sets=False)
    stats_corpus: str | None = option(None, "corpus for C (default: the WikiText-2 test split shipped with kedit; "
                                      "computed on first use and cached, as `kedit stats` makes it)")
    stats_samples: int = option(DEFAULT_SAMPLES, "the first N documents of that corpus for C", parse=positive)
    stats_max_len: int | None = option(None, "tokens per document for C (default: min(model context, 1024))",
                                       parse=positive)
    compute_stats: bool = option(True, "fail, naming the `kedit stats` command, instead of computing missing "
                                 "statistics", flag="--no-compute-stats", sets=False)


@dataclass(frozen=True)
class StatsNeed:
    """The statistics an editor reads: C of `module`'s inputs at `layers`, over a corpus."""

    layers: tuple[int, ...]
    corpus: str
    samples: int
    max_len: int | None
    module: str = "mlp_out"


def stats_need(hp: CovParams, layers: list[int]) -> StatsNeed | None:
    """What `hp` asks for at `layers`; None under --no-cov."""
    if not hp.use_cov:
        return None
    corpus = str(hp.stats_corpus if hp.stats_corpus is not None else DEFAULT_CORPUS)
    return StatsNeed(tuple(sorted(layers)), corpus, hp.stats_samples, hp.stats_max_len)


def read_covariances(model: LM | str, need: StatsNeed, compute: bool = True,
                     **compute_kw) -> dict[int, tuple[torch.Tensor, dict]]:
    """{layer: (C, the stats file's info)} for `need`, computing the missing layers first (one pass for all
    of them, with a progress bar) unless `compute` is False (then MissingStats names the `kedit stats`
    command). `model` may be a name, for a driver that holds no model: the files are then checked by model
    name, and `use_covariances` checks the weights' fingerprint. `compute_kw` goes to compute_stats."""
    args = (need.layers, need.module, need.corpus, need.samples, need.max_len)
    try:
        return load_stats(model, *args)
    except MissingStats as e:
        if not compute:
            raise
        name = model if isinstance(model, str) else model.name
        print(f"[kedit] no cached C for {name}, layers {','.join(map(str, need.layers))}: computing it once from "
              f"{need.corpus} into {e.path.parent}", file=sys.stderr, flush=True)
    compute_stats(model, *args, **compute_kw)
    return load_stats(model, *args)


def check_covariance(lm: LM, layer: int, c: torch.Tensor, info: dict) -> None:
    """Refuse C made for another model or of the wrong size, naming its file."""
    d = weight_of(lm.model.get_submodule(lm.arch.name("mlp_out", layer))).shape[1]
    where = info.get("path", "the given C")
    if info.get("fingerprint") not in (None, lm.fingerprint):
        raise StatsError(f"stats file {where} was made for model {info.get('model')!r} (fingerprint "
                         f"{info['fingerprint']}), not for {lm.name!r} ({lm.fingerprint}); refusing to use it")
    if tuple(c.shape) != (d, d):
        raise StatsError(f"C from {where} is {tuple(c.shape)}, but layer {layer}'s keys have {d} dimensions")


class UsesCovariance(Editor):
    """Base of the editors weighed by C: per edited layer, the C given by `use_covariances`, else read for `hp`
    (computed on first use). The editor defines `hp` (a CovParams) and `cov_layers(lm)`."""

    def stats_need(self, lm: LM) -> StatsNeed | None:
        return stats_need(self.hp, self.cov_layers(lm))

    def use_covariances(self, lm: LM, covs: dict[int, torch.Tensor | tuple[torch.Tensor, dict] | None]) -> None:
        """Use these C per layer: a tensor (labelled "given"), (C, info) from read_covariances, or None (C = I).
        C made for another model or of another size is refused."""
        given = {}
        for layer, c in covs.items():
            if c is not None:
                c, info = c if isinstance(c, tuple) else (c, {"path": "given"})
                check_covariance(lm, layer, c, info)
            given[layer] = (c, IDENTITY if c is None else info["path"])
        self.__dict__.setdefault("_covs", {})[id(lm.model)] = given
        self._forget(lm)

    def covariances(self, lm: LM) -> tuple[dict[int, torch.Tensor | None], dict[int, str]]:
        """(C per edited layer, its label: the stats file, "given" or "identity")."""
        layers = self.cov_layers(lm)
        if id(lm.model) not in self.__dict__.get("_covs", {}):
            need = self.stats_need(lm)
            read = {} if need is None else read_covariances(lm, need, self.hp.compute_stats)
            self.use_covariances(lm, {layer: read.get(layer) for layer in layers})
        found = self._covs[id(lm.model)]
        if missing := [layer for layer in layers if layer not in found]:
            raise ValueError(f"no C was given for layer(s) {missing}")
        return {layer: found[layer][0] for layer in layers}, {layer: found[layer][1] for layer in layers}

    def _forget(self, lm: LM) -> None:
        """Drop what the editor built from earlier C (a solver); nothing by default."""

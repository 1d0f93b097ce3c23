"""Where the editors' C comes from: the shipped corpus by default, computed once; handed over by a driver; checked."""
from __future__ import annotations

import gzip

import pytest
import torch

from conftest import make_tiny_lm
from kedit_ray.editors import Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.covariance import read_covariances, stats_need
from kedit_ray.stats import DEFAULT_CORPUS, StatsError, compute_stats, corpus


def test_the_shipped_corpus_is_wikitext_with_its_licence():
    docs = list(corpus.documents(DEFAULT_CORPUS))
    assert len(docs) == 1322 and docs[0].startswith("= Robert Boulter =")
    licence = (DEFAULT_CORPUS.parent / "README.md").read_text()
    assert "CC BY-SA 3.0" in licence and "Merity" in licence
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        assert f.read(200).strip().startswith("= Robert Boulter =")


def test_stats_need_follows_the_options():
    need = stats_need(RomeParams(), [3])
    assert need.layers == (3,) and need.corpus == str(DEFAULT_CORPUS) and need.samples == 100_000
    assert stats_need(RomeParams(use_cov=False), [3]) is None
    assert stats_need(RomeParams(stats_corpus="x.txt", stats_samples=5), [2, 1]).layers == (1, 2)


def test_a_driver_reads_c_by_name_and_hands_it_to_editors(tiny_dir, tmp_path, monkeypatch):
    """read_covariances by model name (no model loaded) computes once, then reads; an editor given C never reads
    the cache (an empty cache on its node does not make it fall back to I), and C for another model is refused."""
    from kedit_ray.models import load

    monkeypatch.setenv("KEDIT_STATS_CACHE", str(tmp_path / "driver"))
    text = tmp_path / "c.txt"
    text.write_text("\n\n".join(f"the city of Paris is in France {i}" for i in range(12)))
    editor = Memit(MemitParams(layers=[1, 2], stats_corpus=str(text), stats_samples=12))
    lm = load(tiny_dir)
    need = editor.stats_need(lm)
    covs = read_covariances(tiny_dir, need)                            # computed, by name
    assert sorted(covs) == [1, 2] and covs[1][1]["fingerprint"] == lm.fingerprint
    monkeypatch.setenv("KEDIT_STATS_CACHE", str(tmp_path / "empty-worker-cache"))
    editor.use_covariances(lm, covs)
    c, labels = editor.covariances(lm)
    assert labels == {1: covs[1][1]["path"], 2: covs[2][1]["path"]} and torch.equal(c[1], covs[1][0])
    assert not (tmp_path / "empty-worker-cache").exists()
    other = make_tiny_lm(seed=1)
    with pytest.raises(StatsError, match="made for model"):
        Rome(RomeParams(layer=1)).use_covariances(other, {1: covs[1]})
    with pytest.raises(StatsError, match="dimensions"):
        Rome(RomeParams(layer=1)).use_covariances(make_tiny_lm(inter=48), {1: (covs[1][0], {"path": "x"})})


def test_no_compute_stats_names_the_command_for_every_layer(tiny_lm, tmp_path, monkeypatch):
    from kedit_ray.stats import MissingStats

    monkeypatch.setenv("KEDIT_STATS_CACHE", str(tmp_path / "stats"))
    editor = Memit(MemitParams(layers=[1, 2], compute_stats=False))
    with pytest.raises(MissingStats, match="--layers 1,2 --module mlp_out --corpus") as e:
        editor.covariances(tiny_lm)
    assert str(DEFAULT_CORPUS) in e.value.command
    (info,) = compute_stats(tiny_lm, [2], progress=False)   # one of the two layers made: the command names the other
    with pytest.raises(MissingStats, match="--layers 1 "):
        editor.covariances(tiny_lm)
    assert info["documents"] == 1322

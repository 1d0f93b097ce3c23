"""Layer statistics: C against plain hooks, one pass for many layers, resume, cache, refusals, Ray workers."""
from __future__ import annotations

import json
import random
import shlex
import re
import shutil
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import WORDS, data_file, job_script, make_tiny_lm
from kedit_ray.stats import MissingStats, StatsError, compute_stats, layer_stats
from kedit_ray.cli import main
from kedit_ray.options import layers
from kedit_ray.stats import corpus
from kedit_ray.stats.accumulate import pack

pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(path: Path, n_sections: int = 6, seed: int = 0) -> Path:
    """WikiText-like raw text: headings, runs of lines, blank lines; one document longer than the context."""
    rnd = random.Random(seed)
    lines = []
    for s in range(n_sections):
        lines += [f" = {WORDS[s]} {WORDS[s + 1]} = ", ""]
        for p in range(4):
            lines.append(" " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 40))) + " .")
            if p % 2:
                lines.append("")
    lines += [" ".join(rnd.choice(WORDS) for _ in range(300)), ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def direct_mom2(lm, layer: int, docs: list[str], max_len: int, module: str = "mlp_out"
                ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """C by its definition: each document alone, a plain forward pre-hook, float64; and count and M = E[|k| |k|ᵀ]
    (what bounds the rounding of a float32 Σ k kᵀ, see `gram_error`)."""
    total, count, absolute = torch.zeros(()), 0, torch.zeros(())

    def hook(_m, args):
        nonlocal total, count, absolute
        k = args[0].reshape(-1, args[0].shape[-1]).double()     # one document: [time, d] (flat in an MoE block)
        total, count, absolute = total + k.T @ k, count + k.shape[0], absolute + k.abs().T @ k.abs()

    handle = lm.model.get_submodule(lm.arch.name(module, layer)).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for doc in docs:
                lm.model(lm.tok(doc, truncation=True, max_length=max_len, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    return total / count, count, absolute / count


def gram_error(got: torch.Tensor, want: torch.Tensor, m: torch.Tensor) -> float:
    """‖got − want‖ in units of the float32 rounding a computed C may carry: `gram` sums at most n products per
    batch in float32 (error ≤ γ_n |K|ᵀ|K|, γ_n ≈ n 2⁻²⁴), the keys are rounded to float32 (2⁻²³) and C may be stored
    in float32 (2⁻²⁴); so ‖Ĉ − C‖ ≤ (n + 4) 2⁻²⁴ ‖M‖ for M = E[|k||k|ᵀ], on any correct arithmetic. The keys come
    from a float64 model (both sides), so the forward passes add nothing comparable. Returns ‖got − want‖ / (2⁻²⁴ ‖M‖):
    a C off by one token, one document or one layer is off by far more than any n here."""
    return float((got.double() - want.double()).norm() / (2.0 ** -24 * m.double().norm()))


def run_cli(argv: list[str]) -> int:
    return main(["stats", *argv])


@pytest.fixture
def text(tmp_path):
    return write_corpus(tmp_path / "corpus.raw")


# ------------------------------------------------------------------ corpus and packing

def test_corpus_formats_and_errors(tmp_path, text):
    docs = list(corpus.documents(text))
    assert docs[0] == "= The Where =" and docs[1].count("\n") == 1 and len(docs) == 6 * 3 + 1
    d = tmp_path / "dir"
    (d / "b").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    pq.write_table(pa.table({"text": ["three", "four"]}), d / "b" / "c.parquet")
    (d / "b" / "d.txt").write_text("five\nstill five\n\n = Six = \nseven\n")
    (d / "notes.md").write_text("ignored")
    assert list(corpus.documents(d)) == ["one", "two", "three", "four", "five\nstill five", "= Six = \nseven"]
    assert [(i, len(s)) for i, s in corpus.shards(d, 5, 2)] == [(0, 2), (1, 2), (2, 1)]
    fp = corpus.fingerprint(d)
    (d / "a.jsonl").write_text('{"text": "one"}\n{"text": "2"}\n')
    assert corpus.fingerprint(d) != fp

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(corpus.CorpusError, match=r"bad.jsonl:2: field 'text'"):
        list(corpus.documents(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(corpus.CorpusError, match=r"bad.parquet: no 'text' column"):
        list(corpus.documents(tmp_path / "bad.parquet"))
    with pytest.raises(corpus.CorpusError, match="not a file or directory"):
        corpus.fingerprint(tmp_path / "wikitext-103")


def test_pack_respects_the_token_budget():
    lengths = [5, 17, 3, 128, 9, 9, 64, 1, 30]
    batches = pack(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    assert len(batches) < len(lengths)


# ------------------------------------------------------------------ correctness

def test_command_file_matches_plain_hooks(tmp_path, text, tiny_dir, capsys, monkeypatch):
    """The acceptance check: C from `kedit stats` vs C from plain torch hooks, one document at a time. Both load the
    model in float64, so the keys agree and what differs is the float32 products of `gram` (batches ≤ 96 tokens)."""
    from kedit_ray import models

    load = lambda name, **kw: models.loading.load(name, **{**kw, "dtype": torch.float64})  # noqa: E731
    monkeypatch.setattr(models, "load", load)
    argv = ["--model", tiny_dir, "--layers", "1,2", "--corpus", str(text), "--samples", "15", "--batch-tokens",
            "96", "--shard-docs", "4", "--stats-dtype", "float64", "--cache", str(tmp_path / "stats"), "--json"]
    assert run_cli(argv) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    lm = load(tiny_dir)
    docs = list(corpus.documents(text))[:15]
    from safetensors import safe_open

    for layer, path in zip((1, 2), files):
        want, count, m = direct_mom2(lm, layer, docs, max_len=128)
        with safe_open(path, "pt") as f:
            got, meta = f.get_tensor("mom2"), f.metadata()
        assert got.dtype == torch.float64 and got.shape == (64, 64)
        assert gram_error(got, want, m) <= 128 + 4      # ≤ 96 tokens a batch, or one of ≤ 128
        assert int(meta["count"]) == count and meta["layer"] == str(layer) and meta["fingerprint"] == lm.fingerprint
        assert {k: meta[k] for k in ("module", "samples", "max_len", "dtype", "dim")} == \
               {"module": "mlp_out", "samples": "15", "max_len": "128", "dtype": "float64", "dim": "64"}


def test_one_pass_many_layers_stops_at_the_deepest(tmp_path, text, tiny_lm64):
    """Several layers in one pass equal separate passes, and nothing above the deepest input runs."""
    tiny_lm = tiny_lm64
    calls = {}
    for name, m in tiny_lm.model.named_modules():
        if name.endswith(("mlp.down_proj", "lm_head")):
            m.register_forward_hook(lambda _m, _a, _o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    both = compute_stats(tiny_lm, [0, 2], corpus=text, samples=10, dtype="float64", cache=tmp_path / "a",
                         progress=False)
    assert set(calls) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}  # not 2, 3, lm_head
    alone = compute_stats(tiny_lm, [2], corpus=text, samples=10, dtype="float64", cache=tmp_path / "b",
                          progress=False)
    c2 = layer_stats(tiny_lm, 2, corpus=text, samples=10, dtype="float64", cache=tmp_path / "a", compute=False)[0]
    docs = list(corpus.documents(text))[:10]
    want, count, m = direct_mom2(tiny_lm, 2, docs, 128)
    assert both[1]["count"] == alone[0]["count"] == count
    c2_alone = layer_stats(tiny_lm, 2, corpus=text, samples=10, dtype="float64", cache=tmp_path / "b",
                           compute=False)[0]
    assert gram_error(c2, c2_alone, m) <= 2 * (count + 4)       # the same sums; each within the float32 bound
    mlp_in = layer_stats(tiny_lm, 1, "mlp_in", corpus=text, samples=10, dtype="float64", cache=tmp_path / "a")[0]
    assert mlp_in.shape == (32, 32)
    want, count, m = direct_mom2(tiny_lm, 1, docs, 128, "mlp_in")
    assert gram_error(mlp_in, want, m) <= count + 4


def test_killed_run_resumes_without_double_counting(tmp_path, text, tiny_lm64, monkeypatch, capsys):
    from kedit_ray.stats import compute as compute_mod

    tiny_lm = tiny_lm64

    kw = dict(corpus=text, samples=19, dtype="float64", shard_docs=3, batch_tokens=80, progress=False)
    whole = compute_stats(tiny_lm, [1, 3], cache=tmp_path / "whole", **kw)

    real, n = compute_mod.accumulate, {"calls": 0}

    def dies_on_third_shard(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt  # a kill between two shards' checkpoints
        return real(*a, **k)

    monkeypatch.setattr(compute_mod, "accumulate", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        compute_stats(tiny_lm, [1, 3], cache=tmp_path / "resumed", **kw)
    assert not list((tmp_path / "resumed").rglob("mlp_out.*.safetensors"))
    assert len(list((tmp_path / "resumed").rglob(".partial.*"))) == 1
    capsys.readouterr()

    seen = []
    monkeypatch.setattr(compute_mod, "accumulate", lambda lm, layers, module, docs, *a: seen.append(docs[0]) or
                        real(lm, layers, module, docs, *a))
    resumed = compute_stats(tiny_lm, [1, 3], cache=tmp_path / "resumed", **kw)
    assert "resuming" in capsys.readouterr().err and resumed[0]["resumed_shards"] == 2
    assert len(seen) == 7 - 2  # 19 documents in shards of 3: only the 5 unfinished shards ran again
    assert not list((tmp_path / "resumed").rglob(".partial.*"))
    for a, b in zip(whole, resumed):
        assert a["count"] == b["count"] and a["documents"] == b["documents"] == 19
        ca = layer_stats(tiny_lm, a["layer"], cache=tmp_path / "whole", compute=False, **{
            k: v for k, v in kw.items() if k in ("corpus", "samples", "dtype")})[0]
        cb = layer_stats(tiny_lm, b["layer"], cache=tmp_path / "resumed", compute=False, **{
            k: v for k, v in kw.items() if k in ("corpus", "samples", "dtype")})[0]
        _, count, m = direct_mom2(tiny_lm, a["layer"], list(corpus.documents(text))[:19], 128)
        assert a["count"] == count and gram_error(cb, ca, m) <= 2 * (128 + 4)   # ≤ 128 tokens a batch, twice


def test_damaged_partial_or_final_file_is_named_then_recomputed_on_request(tmp_path, text, tiny_lm64, tiny_dir,
                                                                         monkeypatch, capsys):
    """Two float64 values overwritten in a .partial file are found by its checksum (not resumed silently); with
    --recompute the run starts over and gives the uninterrupted C. A truncated final file is named, and recomputed
    on request."""
    from kedit_ray.stats import compute as compute_mod

    tiny_lm = tiny_lm64
    kw = dict(corpus=text, samples=19, dtype="float64", shard_docs=3, batch_tokens=80, progress=False)
    whole = compute_stats(tiny_lm, [1], cache=tmp_path / "whole", **kw)[0]
    real, n = compute_mod.accumulate, {"calls": 0}

    def dies_on_third_shard(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compute_mod, "accumulate", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        compute_stats(tiny_lm, [1], cache=tmp_path / "cut", **kw)
    monkeypatch.setattr(compute_mod, "accumulate", real)
    [partial] = (tmp_path / "cut").rglob(".partial.*")
    data = bytearray(partial.read_bytes())
    data[-8 * 70:-8 * 68] = struct.pack("<2d", 139.2, -5.0)     # two float64 sums, the header left intact
    partial.write_bytes(bytes(data))
    with pytest.raises(StatsError, match=f"{re.escape(str(partial))} are damaged"):
        compute_stats(tiny_lm, [1], cache=tmp_path / "cut", **kw)
    again = compute_stats(tiny_lm, [1], cache=tmp_path / "cut", recompute=True, **kw)[0]
    assert "--recompute: computing it again" in capsys.readouterr().err and again["resumed_shards"] == 0
    c = lambda cache: layer_stats(tiny_lm, 1, cache=cache, compute=False, corpus=text, samples=19,  # noqa: E731
                                  dtype="float64")[0]
    m = direct_mom2(tiny_lm, 1, list(corpus.documents(text))[:19], max_len=128)[2]
    assert gram_error(c(tmp_path / "cut"), c(tmp_path / "whole"), m) <= 2 * (80 + 4)   # ≤ 80 tokens a batch
    assert again["count"] == whole["count"]

    argv = ["--model", tiny_dir, "--layers", "1", "--corpus", str(text), "--samples", "19", "--stats-dtype", "float64",
            "--shard-docs", "3", "--cache", str(tmp_path / "cli"), "--json"]
    assert run_cli(argv) == 0
    [made] = json.loads(capsys.readouterr().out)["files"]
    from kedit_ray.models import load

    lm = load(tiny_dir)
    read = lambda: layer_stats(lm, 1, corpus=text, samples=19, dtype="float64", cache=tmp_path / "cli",  # noqa: E731
                               compute=False)
    first = read()
    Path(made).write_bytes(Path(made).read_bytes()[:100])        # truncated, found by the command
    assert run_cli(argv) == 2
    assert made in capsys.readouterr().err
    assert run_cli(argv + ["--recompute"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [made]
    again_c, info = read()                                       # a whole, checked file again, of the same count
    assert info["count"] == first[1]["count"] and again_c.shape == first[0].shape


# ------------------------------------------------------------------ cache and refusals

def test_cache_is_hit_without_a_forward_pass(tmp_path, text, tiny_lm, tiny_dir, monkeypatch, capsys):
    kw = dict(corpus=text, samples=12, cache=tmp_path / "stats")
    c, info = layer_stats(tiny_lm, 1, **kw)
    assert c.dtype == torch.float32 and info["count"] > 0
    forwards = []
    tiny_lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    c2, info2 = layer_stats(tiny_lm, 1, **kw)
    assert forwards == [] and info2["path"] == info["path"] and torch.equal(c, c2)

    argv = ["--model", tiny_dir, "--layers", "2", "--corpus", str(text), "--samples", "12", "--cache",
            str(tmp_path / "cli"), "--json"]
    assert run_cli(argv) == 0
    first = capsys.readouterr().out

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded although the stats are cached")

    monkeypatch.setattr("kedit_ray.models.load", no_load)
    assert run_cli(argv) == 0
    assert capsys.readouterr().out == first


def test_missing_stats_names_the_command_that_makes_them(tmp_path, text, tiny_dir, monkeypatch):
    from kedit_ray.models import load

    lm = load(tiny_dir)
    with pytest.raises(MissingStats) as e:
        layer_stats(lm, 3, corpus=text, samples=7, cache=tmp_path / "stats", compute=False)
    cmd = shlex.split(e.value.command)
    assert cmd[:2] == ["kedit", "stats"] and e.value.command in str(e.value)
    assert run_cli(cmd[2:]) == 0
    c, info = layer_stats(lm, 3, corpus=text, samples=7, cache=tmp_path / "stats", compute=False)
    assert info["layer"] == 3 and c.shape == (64, 64)


def test_corrupted_and_foreign_files_are_refused(tmp_path, text, tiny_lm):
    kw = dict(corpus=text, samples=8, cache=tmp_path / "stats", compute=False)
    compute_stats(tiny_lm, [1], corpus=text, samples=8, cache=tmp_path / "stats", progress=False)
    path = Path(layer_stats(tiny_lm, 1, **kw)[1]["path"])
    good = path.read_bytes()

    path.write_bytes(good[:-7] + bytes([good[-7] ^ 1]) + good[-6:])  # one flipped bit in the tensor
    with pytest.raises(StatsError, match="corrupted"):
        layer_stats(tiny_lm, 1, **kw)
    path.write_bytes(good[: len(good) // 2])  # a truncated file
    with pytest.raises(StatsError, match="corrupted"):
        layer_stats(tiny_lm, 1, **kw)
    path.write_bytes(good)

    other = make_tiny_lm(seed=1)
    other.name = tiny_lm.name  # same name, other weights
    with pytest.raises(StatsError, match="fingerprint"):
        layer_stats(other, 1, **kw)
    wider = make_tiny_lm(inter=48)
    wider.name = tiny_lm.name
    with pytest.raises(StatsError, match="dim='64', not '48'"):
        layer_stats(wider, 1, **kw)
    mlp_in = Path(str(path).replace("mlp_out.", "mlp_in."))
    shutil.copy(path, mlp_in)
    with pytest.raises(StatsError, match="module='mlp_out', not 'mlp_in'"):
        layer_stats(tiny_lm, 1, "mlp_in", **kw)
    with pytest.raises(StatsError, match="module='mlp_out', not 'mlp_in'"):  # refused even when computing
        compute_stats(tiny_lm, [1], "mlp_in", corpus=text, samples=8, cache=tmp_path / "stats", progress=False)


def test_bad_arguments_are_refused(tmp_path, text, tiny_lm, capsys):
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        compute_stats(tiny_lm, [9], corpus=text, samples=4, cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match="module must be one of"):
        compute_stats(tiny_lm, [1], "attn", corpus=text, samples=4, cache=tmp_path, progress=False)
    assert layers("1,3-5") == [1, 3, 4, 5]
    assert run_cli(["--model", "x", "--layers", "1", "--corpus", str(tmp_path / "nope.raw")]) == 2
    assert "nope.raw" in capsys.readouterr().err


# ------------------------------------------------------------------ Ray and the real model

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_workers_agree_and_job_runs(tmp_path, text, tiny_dir, ray_local, capsys):
    kw = dict(corpus=text, samples=19, dtype="float64", shard_docs=3, progress=False)
    one = compute_stats(tiny_dir, [0, 2], cache=tmp_path / "w1", workers=1, **kw)
    two = compute_stats(tiny_dir, [0, 2], cache=tmp_path / "w2", workers=2, **kw)
    from kedit_ray.models import load

    lm = load(tiny_dir)
    for a, b in zip(one, two):
        assert a["count"] == b["count"] and a["fingerprint"] == b["fingerprint"] == lm.fingerprint
        ca = layer_stats(lm, a["layer"], cache=tmp_path / "w1", compute=False, **{k: kw[k] for k in ("corpus", "samples", "dtype")})[0]
        cb = layer_stats(lm, b["layer"], cache=tmp_path / "w2", compute=False, **{k: kw[k] for k in ("corpus", "samples", "dtype")})[0]
        # the workers load the model in float32, so their keys also carry the forward's float32 rounding (~2⁻²⁴
        # per layer, below the gram's n 2⁻²⁴, n up to `count` tokens a batch)
        _, count, m = direct_mom2(lm, a["layer"], list(corpus.documents(text))[:19], 128)
        assert gram_error(cb, ca, m) <= 2 * (count + 4)

    job_argv = job_script("evaluate").job_argv
    assert main(job_argv("stats", ["--model", tiny_dir, "--layers", "0,2", "--corpus", str(text), "--samples", "19",
                                  "--stats-dtype", "float64", "--shard-docs", "3", "--cache", str(tmp_path / "job"),
                                  "--workers", "2", "--json"])) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    from safetensors.torch import load_file

    _, count, m = direct_mom2(lm, 2, list(corpus.documents(text))[:19], 128)
    assert gram_error(load_file(files[1])["mom2"], layer_stats(lm, 2, cache=tmp_path / "w1", compute=False, **{
        k: kw[k] for k in ("corpus", "samples", "dtype")})[0], m) <= 2 * (count + 4)


@pytest.mark.slow
def test_gemma_matches_plain_hooks(tmp_path, gemma):
    wiki = data_file("wiki.valid.raw")
    docs = list(corpus.documents(wiki))[:6]
    got = layer_stats(gemma, 4, corpus=wiki, samples=6, max_len=64, dtype="float64", cache=tmp_path)[0]
    want, count, m = direct_mom2(gemma, 4, docs, max_len=64)
    assert got.shape == (2048, 2048)
    assert gram_error(got, want, m) <= count + 4   # float32 gemma: its forward's rounding is far below the gram's

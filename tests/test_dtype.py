"""Half precision: the model runs in bfloat16 (or float16); k*, v*, δ, C and the solves stay in float32/float64,
and an update is cast once, when W + ΔW is written back in W's dtype."""
from __future__ import annotations

import os

import pytest
import torch

import kedit_ray.models.dtype as choice
from kedit_ray.cli import build_parser
from kedit_ray.editors import FT, Grace, GraceParams, Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.ft import FTParams
from kedit_ray.editors.rome import value_params
from kedit_ray.editors.toolkit import compute_keys, context_prefixes, optimize_values
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import load
from kedit_ray.models.dtype import auto_dtype, cpu_flags, places_on_gpu, resolve_dtype
from kedit_ray.models.loading import DTYPES
from kedit_ray.models.weights import weight
from kedit_ray.options import model_kw
from kedit_ray.requests import EditRequest

from conftest import data_file, make_tiny_lm

TAIL = EditRequest(1, "Space Needle", "the city of {}", "Goa", "Seattle")   # subject last: see test_rome.py
LAYER = 1
EDITED = f"model.layers.{LAYER}.mlp.down_proj"
U_BF16 = 2.0 ** -8   # bfloat16's unit roundoff: 8 significant bits
METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


@pytest.fixture(scope="module")
def bf16(tiny_saved):
    return load(str(tiny_saved), dtype="bfloat16")


def test_load_in_each_dtype_keeps_the_fingerprint(tiny_saved, bf16):
    fp32 = load(str(tiny_saved))
    fp16 = load(str(tiny_saved), dtype=torch.float16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp16.model.parameters()} == {torch.float16}
    assert bf16.fingerprint == fp16.fingerprint == fp32.fingerprint == make_tiny_lm().fingerprint
    with pytest.raises(ValueError, match="dtype must be one of"):
        load(str(tiny_saved), dtype="float8")


def test_rome_in_bfloat16_computes_in_float32_and_casts_once(bf16, one_thread):
    hp = RomeParams(layer=LAYER, n_prefixes=2, prefix_len=4, use_cov=False)
    prefixes = context_prefixes(bf16, hp.n_prefixes, hp.prefix_len)
    k = compute_keys(bf16, LAYER, [TAIL], prefixes)                          # k*, as ROME computes it
    v0, delta, _ = optimize_values(bf16, LAYER, [TAIL], prefixes, k, value_params(bf16, hp.values))
    assert k.dtype == v0.dtype == delta.dtype == torch.float32
    v_star = (v0 + delta)[0].double()

    d = Rome(hp).edit(bf16, TAIL)
    dw = d.deltas[EDITED]
    assert dw.dtype == torch.float32
    w0 = weight(bf16.model, EDITED).clone()
    nll0 = target_nll(bf16, [TAIL.text], [TAIL.target_new])
    with d.applied(bf16.model):
        w1 = weight(bf16.model, EDITED)
        assert w1.dtype == torch.bfloat16
        assert torch.equal(w1, (w0.float() + dw).to(torch.bfloat16))       # one rounding, of W + ΔW
        assert target_nll(bf16, [TAIL.text], [TAIL.target_new]) < nll0 - 1.0
        # W' k* = v* up to that rounding, |W' k* - v*| ≤ u_bf16 |W'| |k*|, plus float32's share (v0 = W k* and
        # ΔW in float32: well under 1e-5 |W'| |k*| for d_in = 64)
        k64 = k[0].double()
        err = (w1.double() @ k64 - v_star).abs()
        bound = (U_BF16 + 1e-5) * (w1.double().abs() @ k64.abs())
        assert (err <= bound).all(), (err / bound).max()
    assert torch.equal(weight(bf16.model, EDITED), w0)                     # reverted bit for bit


def test_memit_grace_ft_run_in_bfloat16(bf16, one_thread):
    w0 = {n: p.clone() for n, p in bf16.model.named_parameters()}
    nll0 = target_nll(bf16, [TAIL.text], [TAIL.target_new])
    memit = Memit(MemitParams(layers=[LAYER], use_cov=False, n_prefixes=1, mom2_update_weight=1.0)).edit(bf16, TAIL)
    ft = FT(FTParams(layer=LAYER, steps=10, lr=1e-2)).edit(bf16, TAIL)
    for d in (memit, ft):
        assert {t.dtype for t in d.deltas.values()} == {torch.float32}
        with d.applied(bf16.model):
            assert target_nll(bf16, [TAIL.text], [TAIL.target_new]) < nll0
    grace = Grace(GraceParams(layer=LAYER, eps_init=1.0, steps=20)).edit(bf16, TAIL)
    assert grace.keys.dtype == grace.values.dtype == torch.float32
    with grace.applied(bf16.model):
        assert target_nll(bf16, [TAIL.text], [TAIL.target_new]) < nll0
    for n, p in bf16.model.named_parameters():
        assert torch.equal(p, w0[n]), n


def test_generate_hands_the_output_layer_a_contiguous_input(bf16):
    """`generate` slices the prompts' last position, a strided view; in bfloat16 on the CPU torch's matmul then
    copies the output layer's weight once per sequence (6.4 GB for WISE's 20 texts on gemma-3-270m): a loaded
    model's output layer gets a contiguous input."""
    seen = []
    spy = bf16.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    ids = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10]])
    try:
        torch.manual_seed(0)
        out = bf16.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                  max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    finally:
        spy.remove()
    assert seen[0][0] == (3, 1, bf16.model.config.hidden_size) and all(ok for _, ok in seen)
    assert out.shape == (3, 6)


def test_stats_and_tracing_in_bfloat16(tiny_saved, bf16, one_thread):
    from kedit_ray.stats.accumulate import accumulate
    from kedit_ray.tracing.trace import TraceParams, trace_fact

    docs = ["The Space Needle is located in Seattle.", "Danielle Darrieux speaks French."]
    half = accumulate(bf16, [1], "mlp_out", docs, max_len=16, batch_tokens=32).sums[1]
    full = accumulate(load(str(tiny_saved)), [1], "mlp_out", docs, max_len=16, batch_tokens=32).sums[1]
    assert half.dtype == torch.float64
    # the keys themselves differ by the bfloat16 forward pass: a few roundings of 2^-8 through two blocks
    assert ((half - full).norm() / full.norm()).item() < 20 * U_BF16
    t = trace_fact(bf16, "The Space Needle is located in the city of", "Space Needle", 0.5,
                   TraceParams(kinds=("hidden",), samples=2))
    assert 0 <= t.p <= 1 and all(torch.isfinite(torch.from_numpy(s)).all() for s in t.scores.values())


# ------------------------------------------------------------------------------------ --dtype auto

def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    return path


@pytest.mark.parametrize("flags, want", [("fpu avx2 avx512f avx512_bf16 amx_tile", "bfloat16"),
                                         ("fpu avx2 amx_bf16", "bfloat16"),
                                         ("fpu avx2 avx512f avx512_fp16", "float32"),   # fp16 is not bf16
                                         ("", "float32")])
def test_auto_dtype_on_a_cpu_reads_its_flags(tmp_path, flags, want):
    assert auto_dtype(gpu=False, cpuinfo=cpuinfo(tmp_path, flags))[0] == want
    assert cpu_flags(cpuinfo(tmp_path, flags)) == set(flags.split())     # the first processor's line only
    assert cpu_flags(tmp_path / "absent") == set() and auto_dtype(False, tmp_path / "absent")[0] == "float32"


@pytest.mark.parametrize("bf16, want", [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_on_a_gpu_asks_the_gpu(tmp_path, monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_dtype(gpu=True, cpuinfo=cpuinfo(tmp_path, "avx512_bf16"))[0] == want    # the GPU's, not the CPU's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_dtype(cpuinfo=cpuinfo(tmp_path, ""))[0] == want                         # default: CUDA sees one


def test_the_device_map_says_whether_the_model_is_on_a_gpu(monkeypatch):
    maps = [None, {"": 0}, "auto", {"a": "cpu", "b": "disk"}, {"a": "cpu", "b": "cuda:1"}, "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [places_on_gpu(m) for m in maps] == [False, True, True, False, True, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not any(places_on_gpu(m) for m in maps)


@pytest.mark.parametrize("flags, want", [({"avx512_bf16"}, torch.bfloat16), (set(), torch.float32)])
def test_load_auto_picks_the_dtype_and_says_so_once(tiny_saved, monkeypatch, capsys, flags, want):
    monkeypatch.setattr(choice, "cpu_flags", lambda *a: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice._say.cache_clear()
    for _ in range(2):
        assert {p.dtype for p in load(str(tiny_saved), dtype="auto").model.parameters()} == {want}
    lines = capsys.readouterr().err.splitlines()
    assert [ln for ln in lines if "--dtype auto" in ln] == [f"[kedit] --dtype auto: {str(want).removeprefix('torch.')} "
                                                             f"({auto_dtype(False)[1]})"]


def test_an_explicit_dtype_wins(tiny_saved, monkeypatch, capsys):
    monkeypatch.setattr(choice, "cpu_flags", lambda *a: {"amx_bf16"})
    choice._say.cache_clear()
    assert resolve_dtype("auto") == "bfloat16"
    for name in ("float32", "float16"):
        assert resolve_dtype(name) == name
        assert {p.dtype for p in load(str(tiny_saved), dtype=name).model.parameters()} == {DTYPES[name]}
    assert capsys.readouterr().err.count("--dtype auto") == 1      # only the "auto" call spoke
    for argv, want in [([], "auto"), (["--dtype", "float32"], "float32"), (["--dtype", "bfloat16"], "bfloat16")]:
        args = build_parser().parse_args(["eval", "--data", "x.json", "--out", "o", *argv])
        assert model_kw(args)["dtype"] == want                     # the command line's default: the machine's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--data", "x.json", "--out", "o", "--dtype", "float8"])


# ------------------------------------------------------------------------------------ quality: bf16 vs fp32

# N held-out-style CounterFact cases (after the first 100, which the gemma-3-270m defaults were measured on);
# KEDIT_DTYPE_CASES shortens the run, KEDIT_DTYPE_STATS the documents C is computed from.
QUALITY_CASES = int(os.environ.get("KEDIT_DTYPE_CASES", "100"))
QUALITY_STATS = int(os.environ.get("KEDIT_DTYPE_STATS", "2000"))
# ΔW = Λ uᵀ made through a bfloat16 and through a float32 model, compared by its two factors:
# - û = u / ||u||, u = C⁻¹k*: k* comes out of bfloat16 blocks (k* measured 1.5-3.8 u_bf16 apart, u_bf16 = 2^-8: a
#   few roundings), C⁻¹ weighs that error by C's conditioning on k*'s direction (measured: û 2.5-3.9 u_bf16 apart,
#   1.0-1.9 times k*'s error). U_BOUND = u_bf16 × 16: four times the largest seen (cases 100-102, C from 100
#   WikiText documents or from all of them).
# - Λ = δ / (uᵀk*) carries v*'s optimisation: Adam at lr 0.5 stopped at NLL < 0.05, so a gradient changed by
#   rounding moves the path, not only the end point: Λ 7.5% apart with equal step counts (9 and 9), 37% and 55% when
#   early stop came a step or two apart (12/11, 10/12). No u × conditioning bound holds there; LAMBDA_BOUND = 1
#   (||Λ_bf16 − Λ_fp32|| < ||Λ_fp32||) only catches an update turned elsewhere, and the scores judge the rest.
U_BOUND = 16 * U_BF16
LAMBDA_BOUND = 1.0


def rank_one_factors(dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, û) with ΔW = Λ ûᵀ, ||û|| = 1, in float64 (the top singular pair; ΔW is rank one)."""
    u, sv, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    return u[:, 0] * sv[0], vh[0]


class SharedPrefixes(Rome):
    """ROME with the context prefixes a given model samples: a bfloat16 model samples other text than a float32
    one (seen on case 229: other prefixes, ΔW 15% apart), which is not the arithmetic this test compares."""

    def __init__(self, params: RomeParams, source):
        super().__init__(params)
        self.source = source

    def prefixes(self, lm):
        return context_prefixes(self.source, self.hp.n_prefixes, self.hp.prefix_len)


@pytest.mark.slow
def test_rome_in_bfloat16_scores_as_float32_on_counterfact(gemma):
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval import Scorer

    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=100 + QUALITY_CASES)
    cases = cases[100:]
    hp = RomeParams(stats_corpus=str(data_file("wiki.test.raw")), stats_samples=QUALITY_STATS, stats_max_len=256)
    half = load("gemma-3-270m", dtype="bfloat16")
    scorer = Scorer("counterfact")
    scores, rel = {"float32": [], "bfloat16": []}, []
    for case in cases:
        dws = {}
        for name, lm in (("float32", gemma), ("bfloat16", half)):
            d = SharedPrefixes(hp, gemma).edit(lm, case)
            with d.applied(lm.model):
                scores[name].append(scorer(lm, case))
            dws[name] = rank_one_factors(next(iter(d.deltas.values())))
        (lam32, u32), (lam16, u16) = dws["float32"], dws["bfloat16"]
        sign = torch.sign(u16 @ u32)                                   # a singular pair's sign is arbitrary
        rel.append(((sign * u16 - u32).norm().item(), ((sign * lam16 - lam32).norm() / lam32.norm()).item()))
    means = {name: {m: sum(r[m] for r in rows) / len(rows) for m in METRICS} for name, rows in scores.items()}
    print(f"ROME fp32 vs bf16 on {len(cases)} cases: {means}; û apart by {[f'{u:.4f}' for u, _ in rel]}, "
          f"Λ by {[f'{x:.3f}' for _, x in rel]}")
    for m in METRICS:
        assert abs(means["bfloat16"][m] - means["float32"][m]) <= 0.01, (m, means)
    assert max(u for u, _ in rel) <= U_BOUND, rel
    assert max(x for _, x in rel) <= LAMBDA_BOUND, rel

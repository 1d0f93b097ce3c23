"""Half precision: the model runs in bfloat16 (or float16); k*, v*, δ, C and the solves stay in float32/float64,
and an update is cast once, when W + ΔW is written back in W's dtype."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import FT, Grace, GraceParams, Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.ft import FTParams
from kedit_ray.editors.rome import value_params
from kedit_ray.editors.toolkit import compute_keys, context_prefixes, optimize_values
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import load
from kedit_ray.models.weights import weight
from kedit_ray.requests import EditRequest

from conftest import make_tiny_lm

TAIL = EditRequest(1, "Space Needle", "the city of {}", "Goa", "Seattle")   # subject last: see test_rome.py
LAYER = 1
EDITED = f"model.layers.{LAYER}.mlp.down_proj"
U_BF16 = 2.0 ** -8   # bfloat16's unit roundoff: 8 significant bits


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

"""FT and FT-L on a tiny random Llama: the target NLL falls, FT-L's change stays in its L∞ ball."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import FT, Delta, FTLParams, FTParams, make_editor
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import get_module, weight_of
from kedit_ray.requests import EditRequest

REQ = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle")   # a two-token target


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ft_lowers_the_target_nll_and_reverts(tiny_lm, tmp_path):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    nll0 = target_nll(tiny_lm, [REQ.text], [REQ.target_new]).item()
    delta = FT(FTParams(layer=1, lr=1e-2, steps=20)).edit(tiny_lm, REQ)
    assert isinstance(delta, Delta) and delta.meta["method"] == "ft" and delta.meta["layer"] == 1
    assert list(delta.deltas) == [tiny_lm.arch.name("mlp_out", 1)]
    with delta.applied(tiny_lm.model):
        nll1 = target_nll(tiny_lm, [REQ.text], [REQ.target_new]).item()
    assert nll1 < nll0 - 1.0
    assert nll1 == pytest.approx(delta.meta["v_nll"], rel=1e-3, abs=1e-4)   # the hook trained what W + ΔW computes
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = Delta.load(delta.save(tmp_path / "ft.safetensors"))
    assert all(torch.equal(again.deltas[k], d) for k, d in delta.deltas.items())


def test_ft_l_change_is_bounded_in_l_inf(tiny_lm):
    eps = 2e-3
    free = FT(FTParams(layer=1, lr=1e-2, steps=20)).edit(tiny_lm, REQ)
    bound = FT(FTParams(layer=1, lr=1e-2, steps=20, norm_constraint=eps)).edit(tiny_lm, REQ)
    name = tiny_lm.arch.name("mlp_out", 1)
    assert bound.meta["method"] == "ft-l"
    assert free.deltas[name].abs().max() > eps                              # the bound binds
    assert bound.deltas[name].abs().max() <= eps
    w = weight_of(get_module(tiny_lm.model, name)).clone()
    nll0 = target_nll(tiny_lm, [REQ.text], [REQ.target_new])
    with bound.applied(tiny_lm.model):
        assert (weight_of(get_module(tiny_lm.model, name)) - w).abs().max() <= eps * (1 + 1e-3)
        assert target_nll(tiny_lm, [REQ.text], [REQ.target_new]) < nll0                 # still moves towards o*


def test_registry():
    assert make_editor("ft").hp.norm_constraint is None
    assert make_editor("ft-l").hp.norm_constraint == FTLParams().norm_constraint
    assert make_editor("ft-l", {"norm_constraint": 1e-3}).name == "ft-l"
    with pytest.raises(ValueError, match="norm_constraint"):
        FTParams(norm_constraint=0.0)


@pytest.mark.slow
def test_ft_l_keeps_more_locality_than_ft_over_50_sequential_zsre_edits(gemma):
    """FT's locality loss next to FT-L's on the same 50 zsRE edits applied one after another."""
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_sequential

    from conftest import data_file

    cases, _ = load_requests(data_file("zsre_mend_train-1k.json"), dataset="zsre", limit=80)
    out = {}
    for method in ("ft", "ft-l"):
        _, summary = run_sequential(gemma, make_editor(method), cases[:50], 1, None, cases[50:], method,
                                    dataset="zsre", progress=False)
        out[method] = {k: summary[k] for k in ("ERR", "TRR", "neighborhood_score", "paraphrase_score")}
    print(out)
    assert out["ft-l"]["TRR"] > out["ft"]["TRR"]
    assert out["ft-l"]["neighborhood_score"] > out["ft"]["neighborhood_score"]

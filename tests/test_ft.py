"""FT and FT-L on a tiny random Llama: the target NLL falls, FT-L's change stays in its L∞ ball."""
from __future__ import annotations

import pytest
import torch

from kedit_ray.editors import FT, Delta, FTLParams, FTParams, make_editor
from kedit_ray.editors.toolkit import target_ids
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import get_module, weight_of
from kedit_ray.requests import EditRequest

REQ = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle")   # a two-token target


pytestmark = pytest.mark.usefixtures("one_thread")
U = 2.0 ** -24   # float32's unit roundoff


def nll_sensitivity(lm, name: str, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the target NLL of `req`: its gradient by the module's output, the module's input (per token) and the
    logits, from one forward pass with autograd."""
    seen = {}

    def hook(_m, args, out):
        seen["x"], seen["out"] = args[0][0], out.detach().requires_grad_()
        return seen["out"]

    ctx, y = lm.tok(req.text).input_ids, target_ids(lm, req.target_new)
    handle = get_module(lm.model, name).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = lm.model(input_ids=torch.tensor([ctx + y[:-1]])).logits[0, len(ctx) - 1:]
            grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor(y)), seen["out"])
    finally:
        handle.remove()
    return grad[0], seen["x"], logits.detach()


def test_ft_lowers_the_target_nll_and_reverts(tiny_lm64, tmp_path):
    tiny_lm = tiny_lm64
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    nll0 = target_nll(tiny_lm, [REQ.text], [REQ.target_new]).item()
    delta = FT(FTParams(layer=1, lr=1e-2, steps=20)).edit(tiny_lm, REQ)
    assert isinstance(delta, Delta) and delta.meta["method"] == "ft" and delta.meta["layer"] == 1
    assert list(delta.deltas) == [tiny_lm.arch.name("mlp_out", 1)]
    name = tiny_lm.arch.name("mlp_out", 1)
    with delta.applied(tiny_lm.model):
        nll1 = target_nll(tiny_lm, [REQ.text], [REQ.target_new]).item()
        g, x, logits = nll_sensitivity(tiny_lm, name, REQ)
    assert nll1 < nll0 - 1.0
    # the hook trained what W + ΔW computes. A float64 model, but the hook forms ΔW x in float32 (within
    # (n + 2) 2⁻²⁴ |ΔW||x|, n = d_in) and both NLLs take float32 logits and log-softmax (2⁻²⁴ |logit| a rounding, a
    # few each): twice the first-order bound that this puts on |nll1 − v_nll|, on any correct arithmetic
    dw = delta.deltas[name].double()
    bound = (dw.shape[1] + 2) * U * (g.abs() * (x.abs() @ dw.abs().T)).sum() + 8 * U * logits.abs().max()
    assert abs(nll1 - delta.meta["v_nll"]) <= 2 * bound
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
    with bound.applied(tiny_lm.model):   # W' = W + ΔW rounded to float32: off by ≤ 2⁻²⁴ |W'|; |ΔW| ≤ float32(ε)
        w_edited = weight_of(get_module(tiny_lm.model, name)).double()
        assert ((w_edited - w.double()).abs() <= eps * (1 + U) + U * w_edited.abs()).all()
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
                                    scorer="zsre", progress=False)
        out[method] = {k: summary[k] for k in ("ERR", "TRR", "neighborhood_score", "paraphrase_score")}
    print(out)
    assert out["ft-l"]["TRR"] > out["ft"]["TRR"]
    assert out["ft-l"]["neighborhood_score"] > out["ft"]["neighborhood_score"]

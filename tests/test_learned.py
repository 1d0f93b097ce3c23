"""KE and MEND on a tiny random Llama: the update's form, the KL term, training lowers the loss, checkpoints
(round trip, resume, refusal), Ray Train with one worker and the CLI; on gemma-3-270m (slow) a real training run
then an evaluation on zsRE cases it did not see."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from kedit_ray.cli import build_parser, editor_params, main
from kedit_ray.editors import make_editor
from kedit_ray.editors.ke import KE
from kedit_ray.editors.learned import LearnedParams, base_pass, build_rows, edited_pass, save_checkpoint, step_terms
from kedit_ray.editors.nets import build_net, load_net
from kedit_ray.eval.summary import summarize
from kedit_ray.models import get_module, weight_of
from kedit_ray.options import UsageError
from kedit_ray.requests import EditRequest
from kedit_ray.train import TrainConfig, train_loop, training_requests, unrelated
from kedit_ray.train import run as run_train_command

from conftest import data_file, make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

REQ = EditRequest(0, "Space Needle", "Where is the {} located ?", "Goa Rome", "Seattle",
                  ["Where can the Space Needle be found ?"], ["nq question: capital of France"], ["Paris"])
FACTS = [("Space Needle", "Seattle", "Goa", "Paris"), ("Eiffel Tower", "Paris", "Rome", "Berlin"),
         ("Michel Rocard", "French", "English", "Rome"), ("Danielle Darrieux", "French", "Spain", "London")]


def tiny_zsre(path):
    recs = [{"subject": s, "src": f"Where is the {s} located ?", "pred": old,
             "rephrase": f"Where can the {s} be found ?", "alt": new, "answers": [old],
             "loc": f"nq question: capital of {loc}", "loc_ans": loc}
            for s, old, new, loc in FACTS]
    path.write_text(json.dumps(recs))
    return path


def config(tmp_path, method: str, steps: int, **kw) -> dict:
    net = {"layers": [2, 3]} if method == "ke" else {}
    return asdict(TrainConfig(method, str(tiny_zsre(tmp_path / "zsre.json")), str(tmp_path / "out"), steps=steps,
                              lr=3e-3, save_every=2, progress=False, net=net, **kw))


def test_ke_update_has_the_stated_form(tiny_lm64, tmp_path):
    """With α, β, γ, δ, η fixed (the last layer's bias, its weight zero),
    ΔW = σ(η) (softmax(α)γᵀ ⊙ ∇_W L + softmax(β)δᵀ), ∇_W L taken by autograd on W itself; through a saved
    checkpoint and the registered editor."""
    tiny_lm = tiny_lm64
    torch.manual_seed(1)
    net, names = build_net(tiny_lm, "ke", {"layers": [1, 3]})
    coef = {}
    for n in names:
        o, i = weight_of(get_module(tiny_lm.model, n)).shape
        coef[n] = [torch.randn(o), torch.randn(o), torch.randn(i), torch.randn(i), torch.randn(1)]
        last = net.heads[n.replace(".", "/")][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.cat(coef[n]))
    save_checkpoint(tmp_path, net, {"method": "ke", "model": tiny_lm.name, "fingerprint": tiny_lm.fingerprint,
                                    "net": asdict(net.cfg), "step": 0})
    delta = make_editor("ke", {"editor_checkpoint": str(tmp_path)}).edit(tiny_lm, REQ)

    ctx = tiny_lm.tok(REQ.text).input_ids
    y = tiny_lm.tok(" " + REQ.target_new, add_special_tokens=False).input_ids
    for n in names:
        mod, seen = get_module(tiny_lm.model, n), {}
        w = weight_of(mod)
        w.requires_grad_(True)
        handle = mod.register_forward_hook(lambda _m, args, out: seen.update(x=args[0][0], dy=out))
        logits = tiny_lm.model(input_ids=torch.tensor([ctx + y[:-1]])).logits[0, len(ctx) - 1:]
        grad, dy = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor(y)), [w, seen["dy"]])
        handle.remove()
        w.requires_grad_(False)
        alpha, beta, gamma, dlt, eta = (c.double() for c in coef[n])
        a_hat, b_hat = torch.outer(alpha.softmax(0), gamma), torch.outer(beta.softmax(0), dlt)
        expected = torch.sigmoid(eta) * (a_hat * grad + b_hat)
        assert grad.abs().max() > 1e-4
        # Float64 here; the editor takes ∇_W L = Σ_t δ_t x_tᵀ and forms the coefficients in float32, so on any correct
        # arithmetic it is within (T + o + 16) 2⁻²⁴ of the float64 terms' magnitudes (T ≤ 128 tokens summed,
        # softmax over o outputs), |∇_W L| taken as Σ_t |δ_t| |x_t|ᵀ
        grad_abs = dy[0].abs().T @ seen["x"].detach().abs()
        bound = (128 + len(alpha) + 16) * 2.0 ** -24 * torch.sigmoid(eta) * (a_hat.abs() * grad_abs + b_hat.abs())
        assert (delta.deltas[n].double() - expected).abs().le(bound).all()
    assert delta.meta["method"] == "ke" and delta.meta["layers"] == [1, 3]


@pytest.mark.parametrize("shared", [True, False])
def test_mend_starts_as_the_identity_with_one_network_per_shape(tiny_lm64, shared):
    """At initialisation g is the identity, so ΔW = −lr Σ_t δ̂_t û_tᵀ (û, δ̂ standardised by the statistics of
    the tokens seen); `shared`: the three same-shape matrices share one g (their own scale, offset and lr)."""
    net, names = build_net(tiny_lm64, "mend", {"shared": shared})
    assert len(names) == 3 and len(net.nets) == (1 if shared else 3)
    rows = build_rows(tiny_lm64, [REQ, EditRequest(1, "Eiffel Tower", "Where is the {} ?", "Rome", "Paris")])
    grads = base_pass(tiny_lm64, names, min(net.cfg.layers), rows)
    net.update_stats(grads)
    deltas = net(grads)
    keep = grads.tokens.bool()
    for n in names:
        u, d = grads.u[n].double(), grads.delta[n].double()
        # each matrix's tokens once, or (shared) all three matrices' tokens pooled
        us = torch.cat([grads.u[m][keep] for m in (names if shared else [n])]).double()
        ds = torch.cat([grads.delta[m][keep] for m in (names if shared else [n])]).double()
        uh, dh = (u - us.mean(0)) / us.std(0), (d - ds.mean(0)) / ds.std(0)
        expected = -1e-4 * torch.einsum("rto,rti->roi", dh * grads.tokens[..., None], uh)
        # float32 running moments and standardisation, sums over ≤ 64 tokens: each factor within 2⁻¹⁶ of
        # (|x| + max|x|) / std, so the sum within 2⁻¹⁵ of Σ_t of those magnitudes' products
        mu = (u.abs() + us.abs().amax(0)) / us.std(0)
        md = (d.abs() + ds.abs().amax(0)) / ds.std(0) * grads.tokens[..., None]
        bound = 2.0 ** -15 * 1e-4 * torch.einsum("rto,rti->roi", md, mu)
        assert (deltas[n].double() - expected).abs().le(bound).all()


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_kl_term_is_zero_when_the_update_is_zero(tiny_lm64, method):
    tiny_lm = tiny_lm64
    net, names = build_net(tiny_lm, method, {})
    rows = build_rows(tiny_lm, [REQ], [[("nq question: capital of France ?", "Paris"), ("The Eiffel Tower is", "")]])
    first = min(net.cfg.layers)
    grads = base_pass(tiny_lm, names, first, rows)
    zero = {n: torch.zeros(1, *grads.grad(n).shape[1:]) for n in names}
    terms = edited_pass(tiny_lm, first, rows, grads, zero)
    # a float64 model: the two passes' log-probabilities agree to ~1e-15 before their float32 casts, which may then
    # differ by one ulp (2⁻²³ |log p|): KL ≤ Σ p 2⁻²³ |log p| ≤ 2⁻²³ log V per position, on any correct arithmetic
    assert len(grads.loc_lp) == 3 and abs(terms["kl"].item()) <= 2.0 ** -23 * math.log(len(tiny_lm.tok))
    moved = edited_pass(tiny_lm, first, rows, grads, {n: 0.1 * torch.randn_like(z) for n, z in zero.items()})
    assert moved["kl"].item() > 1e-4


def _mean_terms(lm, net, names, requests, stats: bool = False):
    """Post-edit NLL on P^x and KL on O^x, averaged over the requests (no gradient step; `stats`: MEND's running
    statistics see the requests)."""
    out = []
    for i in range(len(requests)):
        rows = build_rows(lm, [requests[i]], [unrelated(requests, i, [(i + 1) % len(requests)], True)])
        terms, _ = step_terms(lm, net, names, min(net.cfg.layers), rows, train=stats)
        out.append((terms["nll"].item(), terms["kl"].item()))
    return torch.tensor(out).mean(0).tolist()


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_training_lowers_the_loss(tiny_lm, tmp_path, method):
    cfg = config(tmp_path, method, steps=40)
    requests, zsre = training_requests(TrainConfig.from_dict(cfg))
    assert zsre and len(requests) == 4
    torch.manual_seed(cfg["seed"])
    net0, names = build_net(tiny_lm, method, cfg["net"])
    nll0, kl0 = _mean_terms(tiny_lm, net0, names, requests, stats=True)
    train_loop(cfg, lm=tiny_lm)
    net1, _, meta = load_net(tiny_lm, cfg["out"], method)
    nll1, kl1 = _mean_terms(tiny_lm, net1, names, requests)
    assert meta["step"] == 40 and math.isfinite(kl1)
    assert nll1 + kl1 < 0.7 * (nll0 + kl0), (nll0, kl0, nll1, kl1)


def test_checkpoint_resumes_and_refuses_another_model(tiny_lm, tmp_path):
    seen = []
    cfg = config(tmp_path, "mend", steps=2)
    train_loop(cfg, lm=tiny_lm, report=seen.append)
    net, _, meta = load_net(tiny_lm, cfg["out"])
    train_loop({**cfg, "steps": 5}, lm=tiny_lm, report=seen.append)         # resumes at step 2
    assert [s["step"] for s in seen] == [1, 2, 3, 4, 5]
    again, _, meta = load_net(tiny_lm, cfg["out"], "mend")
    assert meta["step"] == 5 and meta["train_s"] > 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors")
    assert files == ["editor-000005.safetensors", "optim-000005.safetensors"]          # older steps removed
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="trained for 'tiny-llama-0'"):
        load_net(make_tiny_lm(seed=1), cfg["out"])
    with pytest.raises(ValueError, match="not 'ke'"):
        KE(LearnedParams(cfg["out"])).edit(tiny_lm, REQ)
    with pytest.raises(ValueError, match="another --out|not this run"):
        train_loop({**cfg, "steps": 6, "net": {"rank": 8}}, lm=tiny_lm)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "editor-000005.safetensors").write_bytes((tmp_path / "out" / "editor-000005.safetensors").read_bytes())
    (stale / "editor.json").write_text(json.dumps({**meta, "step": 4}))
    with pytest.raises(ValueError, match="written at step 5"):
        load_net(tiny_lm, stale)
    (stale / "editor.json").write_text(json.dumps({**meta, "net": {**meta["net"], "shared": True}}))
    with pytest.raises(ValueError, match="editor-000005.safetensors: not the network editor.json describes"):
        load_net(tiny_lm, stale)
    with pytest.raises(ValueError, match="--editor-checkpoint"):
        make_editor("mend").edit(tiny_lm, REQ)
    delta = make_editor("mend", {"editor_checkpoint": cfg["out"]}).edit(tiny_lm, REQ)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    with delta.applied(tiny_lm.model):
        pass
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())
    assert sorted(delta.deltas) == [tiny_lm.arch.name("mlp_out", x) for x in (1, 2, 3)]


def test_ray_train_two_workers_then_cli_eval(tmp_path, capsys):
    """`kedit train` on Ray Train (2 workers, gloo), then `kedit eval --method ke --editor-checkpoint`."""
    lm = make_tiny_lm()
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tok.save_pretrained(model_dir)
    data = tiny_zsre(tmp_path / "zsre.json")
    out = tmp_path / "ke"
    assert main(["train", "--method", "ke", "--model", str(model_dir), "--data", str(data), "--steps", "3",
                 "--holdout", "1", "--layers", "2,3", "--workers", "2", "--out", str(out)]) == 0
    meta = json.loads((out / "editor.json").read_text())
    assert meta["step"] == 3 and meta["workers"] == 2 and meta["train"]["holdout"] == 1
    assert meta["net"]["layers"] == [2, 3]
    assert (out / "ray").is_dir()
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert main(["eval", "--method", "ke", "--editor-checkpoint", str(out), "--model", str(model_dir), "--data",
                 str(data), "--limit", "1", "--out", str(ev)]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["method"] == "ke"
    for key in ("success_rate", "retain_accuracy", "equivalence_accuracy"):
        assert 0 <= summary[key] <= 1


def test_cli_wiring():
    args = build_parser().parse_args(["eval", "--method", "mend", "--editor-checkpoint", "ckpt", "--data", "x",
                                      "--out", "o"])
    assert editor_params(args) == {"editor_checkpoint": "ckpt"}
    assert make_editor("mend", editor_params(args)).hp.editor_checkpoint == "ckpt"
    with pytest.raises(UsageError, match="not apply to --method"):
        editor_params(build_parser().parse_args(["eval", "--method", "rome", "--editor-checkpoint", "c",
                                                 "--data", "x", "--out", "o"]))
    args = build_parser().parse_args(["train", "--method", "ke", "--data", "x", "--out", "o", "--layers", "9-10"])
    assert args.layers == [9, 10] and args.workers == 1 and args.steps == 1000 and args.net == {}
    args = build_parser().parse_args(["train", "--method", "mend", "--data", "x", "--out", "o", "--net",
                                      '{"c_loc": 3, "shared": true}', "--loc-others", "4"])
    assert args.net == {"c_loc": 3, "shared": True} and args.loc_others == 4
    with pytest.raises(UsageError, match="--net: MENDConfig: unknown field.*margin_min"):
        run_train_command(build_parser().parse_args(["train", "--method", "mend", "--data", "x", "--out", "o",
                                                     "--net", '{"margin_min": 0.1}']))


def test_summary_reports_the_ke_paper_figures():
    rows = [{"case_id": i, "efficacy_score": e, "paraphrase_score": p, "neighborhood_score": n, "error": None}
            for i, (e, p, n) in enumerate([(1.0, 1.0, 1.0), (1.0, 0.5, 1.0), (0.5, 0.0, 0.75), (1.0, 1.0, 1.0)])]
    s = summarize(rows + [{"case_id": 9, "efficacy_score": None, "error": "boom"}])
    assert (s["success_rate"], s["equivalence_accuracy"], s["retain_accuracy"]) == (0.75, 0.5, 0.75)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ke", "mend"])
def test_gemma_train_with_the_defaults_then_eval_on_unseen_zsre_cases(tmp_path, method):
    """`kedit train` with its defaults (1,000 steps, ~25 min on one core here) on zsre_mend_train-1k.json less the
    first 50 records, then those 50 cases. The issue's goal is success ≥ 0.85 and retain ≥ 0.95; this budget reaches
    about 0.65-0.8 of each (README, Learned editors: the curves, and what keeps retain below ROME's). Asserted: that
    level less two standard errors of a share over 50 cases (~0.13)."""
    import time

    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.protocols import run_batch
    from kedit_ray.models import load

    data = data_file("zsre_mend_train-1k.json")
    out = tmp_path / method
    t0 = time.perf_counter()
    assert main(["train", "--method", method, "--data", str(data), "--holdout", "50", "--out", str(out)]) == 0
    train_s = time.perf_counter() - t0
    cases, _ = load_requests(data, "zsre", limit=50)
    lm = load("gemma-3-270m")
    editor = make_editor(method, {"editor_checkpoint": str(out)})
    s = summarize(run_batch(lm, editor, cases, 1, method, scorer="zsre", progress=False))
    print(method, f"{train_s:.0f} s", {k: s[k] for k in ("success_rate", "equivalence_accuracy", "retain_accuracy",
                                                        "efficacy_score", "paraphrase_score", "neighborhood_score",
                                                        "pre_efficacy_score")})
    assert s["errors"] == 0 and s["cases"] == 50
    assert s["efficacy_score"] > s["pre_efficacy_score"] + 0.4
    assert s["success_rate"] >= 0.5 and s["equivalence_accuracy"] >= 0.3 and s["retain_accuracy"] >= 0.55

"""Every editor and tool on a tiny random model of every family (tests/families.py), and the architecture
discovery that finds a family's modules from its structure.

Numeric checks are in float64 or bounded by float32 rounding: u = 2⁻²⁴, and a float32 dot product of length n
is off by at most n·u·(|W||k|) (Higham's γₙ bound)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from families import FAMILIES, FUSED_MOE, make_family_lm, make_family_model
from kedit_ray.editors import (FT, AlphaEdit, AlphaEditParams, Emmet, EmmetParams, FTParams, Grace, GraceParams,
                               UltraEdit, UltraEditParams, make_editor)
from kedit_ray.editors.learned import build_rows, step_terms
from kedit_ray.editors.nets import build_net
from kedit_ray.editors.rome import Rome, RomeParams, rank_one
from kedit_ray.editors.toolkit import ValueParams, compute_keys, context_prefixes, optimize_values
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import ARCHS, Trace, UnknownArchitecture, detect_arch, get_module, weight_of
from kedit_ray.models.arch import TEMPLATE_FLAGS, discover
from kedit_ray.requests import EditRequest
from kedit_ray.stats import compute_stats, layer_stats
from kedit_ray.stats.corpus import documents
from kedit_ray.tracing.trace import TraceParams, grid, prepare, restored_prob_one, restored_probs, trace_fact
from kedit_ray.train import TrainConfig, train_loop

from test_learned import REQ as ZSRE_REQ, tiny_zsre
from test_memit import close_in_norm, handed_to_solver, memit, spd
from test_rome import TAIL
from test_stats import direct_mom2, gram_error, ray_local, write_corpus  # noqa: F401 (ray_local: the module's one Ray)
from test_tracing import PROMPT, SUBJECT, sigma

pytestmark = pytest.mark.usefixtures("one_thread")
U32 = 2.0 ** -24
LAYER = 1
FAR = "Danielle Darrieux speaks French"


@pytest.fixture(params=FAMILIES)
def lm(request):
    return make_family_lm(request.param)


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def check_delta(lm, delta, names: list[str]) -> None:
    """The delta changes exactly the weights of `names` (nothing else, tied embeddings included) and reverts
    bit for bit."""
    before = snapshot(lm)
    weights = {n + ".weight" for n in names}
    assert sorted(delta.deltas) == sorted(names)
    with delta.applied(lm.model):
        after = lm.model.state_dict()
        changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
        assert changed == weights, changed ^ weights
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([lm.tok(text).input_ids])).logits


# ------------------------------------------------------------------------------------ locate-then-edit

def test_rome_writes_v_star_at_k_star(lm):
    """v0 = W k* (+ b) as the model computes it (GPT-2's Conv1D included), and W′k* = v* in float64 for C = I and
    a real C; the editor's delta changes W alone and reverts bit for bit."""
    prefixes = context_prefixes(lm, 1, 3)
    k = compute_keys(lm, LAYER, [TAIL], prefixes)                                    # k* [1, d_in]
    v0, delta, _ = optimize_values(lm, LAYER, [TAIL], prefixes, k, ValueParams(steps=3))
    mod = get_module(lm.model, lm.arch.name("mlp_out", LAYER))
    w, k64 = weight_of(mod).double(), k[0].double()
    b = mod.bias.double() if getattr(mod, "bias", None) is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    wk = w @ k64 + b
    bound = (w.shape[1] + 1) * U32 * (w.abs() @ k64.abs() + b.abs())               # float32 W k + b
    assert ((v0[0].double() - wk).abs() <= bound).all()
    assert ((mod(k)[0].double() - wk).abs() <= bound).all()                         # the module's own forward
    assert delta.norm() > 0
    for c in (None, spd(w.shape[1])):
        dw = rank_one(k64, delta[0].double(), c)
        v_star = wk + delta[0].double()
        torch.testing.assert_close((w + dw) @ k64 + b, v_star, rtol=1e-10, atol=1e-10 * v_star.norm().item())
        assert torch.linalg.matrix_rank(dw) == 1
    rome = Rome(RomeParams(layer=LAYER, n_prefixes=1, prefix_len=3, use_cov=False, values=ValueParams(steps=3)))
    check_delta(lm, rome.edit(lm, TAIL), [lm.arch.name("mlp_out", LAYER)])


def test_memit_and_alphaedit_one_request_one_layer_are_romes_closed_form(lm, monkeypatch):
    """Δ_MEMIT = a/(λ+a)·Δ_ROME (a = k*ᵀC⁻¹k*), with the same k*, target residual r = z − h and C (those the solver
    was handed, in float64); AlphaEdit with no stats (P = I) is MEMIT with C = I and λ = α. Both deltas revert bit
    for bit."""
    req, name = TAIL, lm.arch.name("mlp_out", LAYER)
    d = weight_of(get_module(lm.model, name)).shape[1]
    c, lam = spd(d), 2.0
    m = memit([LAYER], lam, n_prefixes=1, values={"steps": 3})
    m.use_covariances(lm, {LAYER: c})
    seen = handed_to_solver(m, lm, monkeypatch)
    delta = m.edit(lm, req)
    (k, r), = seen
    k, r = k[0], r[0]                                                                # k*, r = z − h
    a = k @ torch.linalg.solve(c, k)
    close_in_norm(delta.deltas[name], a / (lam + a) * rank_one(k, r, c), c, lam * c + torch.outer(k, k))
    check_delta(lm, delta, [name])

    alpha = AlphaEdit(AlphaEditParams(layers=[LAYER], n_prefixes=1, prefix_len=4, l2=1.0))
    alpha.hp.values.steps = 3
    alpha.use_covariances(lm, {LAYER: None})
    seen = handed_to_solver(alpha, lm, monkeypatch)
    delta = alpha.edit(lm, req)
    (k, r), = seen
    k, r = k[0], r[0]
    a = k @ k
    close_in_norm(delta.deltas[name], a / (1.0 + a) * rank_one(k, r, None),
                  torch.eye(d, dtype=torch.float64) + torch.outer(k, k))
    check_delta(lm, delta, [name])


# ------------------------------------------------------------------------------------ GRACE, FT, FT-L

def test_grace_miss_is_bit_identical(lm):
    """With ε_init below the distance of every position of an unrelated prompt to the key, that prompt's
    logits are bit-identical under the adaptor, while the edited prompt's change."""
    block = lm.arch.name("layer", LAYER)
    queries = {}
    for text in (TAIL.text, FAR):
        with Trace(lm.model, block, retain_input=True, stop=True) as t:
            lm.model(input_ids=torch.tensor([lm.tok(text).input_ids]))
        queries[text] = t.input[0]
    eps = 0.5 * torch.cdist(queries[FAR], queries[TAIL.text][-1:]).min().item()
    far, edited = logits(lm, FAR), logits(lm, TAIL.text)
    adaptor = Grace(GraceParams(layer=LAYER, eps_init=eps, steps=3)).edit(lm, TAIL)
    with adaptor.applied(lm.model):
        assert torch.equal(logits(lm, FAR), far)
        assert not torch.equal(logits(lm, TAIL.text), edited)
    assert torch.equal(logits(lm, TAIL.text), edited)


@pytest.mark.parametrize("bound", [None, 5e-3])
def test_ft_changes_its_layer_only_and_lowers_the_nll(lm, bound):
    """FT and FT-L: ΔW on the layer's MLP output projection alone, the target NLL falls, FT-L's |ΔW| ≤ ε."""
    req, name = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle"), lm.arch.name("mlp_out", LAYER)
    nll0 = target_nll(lm, [req.text], [req.target_new]).item()
    delta = FT(FTParams(layer=LAYER, lr=1e-2, steps=10, norm_constraint=bound)).edit(lm, req)
    w = weight_of(get_module(lm.model, name)).double().clone()
    with delta.applied(lm.model):
        assert target_nll(lm, [req.text], [req.target_new]).item() < nll0
        w1 = weight_of(get_module(lm.model, name)).double()
    if bound is not None:
        assert delta.deltas[name].abs().max() <= bound
        assert ((w1 - w).abs() <= bound + 2 * U32 * w1.abs()).all()                 # W′ = fl(W + ΔW)
    check_delta(lm, delta, [name])


# ------------------------------------------------------------------------------------ UltraEdit

def test_ultraedit_turn_equals_the_plain_hooks_reference(lm):
    """A turn of UltraEdit on the MLP input and output projections of two layers equals the plain-hooks reference
    in float64 (one float32 rounding of ΔW), and its delta changes those weights alone. (Qwen2-MoE's fused experts
    compute in float32 alone: there the delta's reach is checked, not its value.)"""
    from test_ultraedit import REQS, reference_turn

    exact = "qwen2_moe" not in lm.name
    if exact:
        lm.model.to(torch.float64)
    delta = UltraEdit(UltraEditParams(layers=[1, 2], modules=["mlp_in", "mlp_out"], eta=1e-3)).edit_batch(lm, REQS)
    names = [lm.arch.name(m, x) for x in (1, 2) for m in ("mlp_in", "mlp_out")]
    ref = reference_turn(lm, REQS, names, 1e-3) if exact else {}
    for n, r in ref.items():
        assert (delta.deltas[n].double() - r).norm() <= 1e-6 * r.norm() and r.norm() > 0, n
    check_delta(lm, delta, names)


# ------------------------------------------------------------------------------------ KE, MEND

@pytest.mark.parametrize("method", ["ke", "mend"])
def test_one_learned_training_step(lm, method, tmp_path):
    """One step's loss and gradients are finite (some non-zero) and leave the model alone; a one-step
    `train_loop` checkpoint edits, and its delta reverts bit for bit."""
    before = snapshot(lm)
    torch.manual_seed(0)
    net, names = build_net(lm, method, {})
    rows = build_rows(lm, [ZSRE_REQ], [[("nq question: capital of France ?", "Paris")]])
    terms, _ = step_terms(lm, net, names, min(net.cfg.layers), rows)
    loss, shown = net.objective(terms, 0.0)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in shown.values())
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())

    cfg = asdict(TrainConfig(method, str(tiny_zsre(tmp_path / "zsre.json")), str(tmp_path / "out"), steps=1,
                             progress=False))
    figures = train_loop(cfg, lm=lm)
    assert figures["step"] == 1 and all(math.isfinite(v) for v in figures.values())
    delta = make_editor(method, {"editor_checkpoint": cfg["out"]}).edit(lm, ZSRE_REQ)
    check_delta(lm, delta, names)


# ------------------------------------------------------------------------------------ tracing, stats

def test_causal_tracing(lm):
    """The trace runs with finite effects of shape [tokens, layers] per kind, and the batched restorations (cached
    residual stream, keys and values of the corrupted run) equal one plain forward pass per restoration."""
    params = TraceParams(samples=2, window=3)
    s = sigma(lm)
    trace = trace_fact(lm, PROMPT, SUBJECT, s, params)
    assert set(trace.scores) == {"hidden", "mlp", "attn"} and math.isfinite(trace.p) and math.isfinite(trace.p_star)
    for scores in trace.scores.values():
        assert scores.shape == (len(trace.tokens), lm.n_layers) and np.isfinite(scores).all()
    run = prepare(lm, PROMPT, SUBJECT, s, params)
    restores = grid(lm, run, params)[::7]
    one = torch.tensor([restored_prob_one(lm, run, rs) for rs in restores])
    batched = restored_probs(lm, run, restores)
    # the two differ only in float32 rounding (batch shapes, the cached keys): |Δp| ≤ 2·max|Δlogit|, given a
    # budget of 64 float32 ulps of the logits' scale
    scale = float(logits(lm, PROMPT).abs().max())
    torch.testing.assert_close(batched, one, rtol=0, atol=64 * U32 * max(1.0, scale))
    assert (batched - run.p_star).abs().max() > 1e-3                    # the restorations do move P*


def test_stats_match_plain_hooks(lm, tmp_path):
    """C of two layers in one pass, stopped at the deepest, against its definition: a plain pre-hook on the
    module, one document at a time, float64."""
    text = write_corpus(tmp_path / "corpus.raw")
    docs = list(documents(text))[:9]
    kw = dict(corpus=text, samples=9, max_len=128, dtype="float64", cache=tmp_path / "stats")
    infos = compute_stats(lm, [0, 2], progress=False, **kw)
    for info in infos:
        want, count, m = direct_mom2(lm, info["layer"], docs, max_len=128)
        assert info["count"] == count
        assert gram_error(layer_stats(lm, info["layer"], compute=False, **kw)[0], want, m) <= 128 + 4   # test_stats


# W = 2 starts two Ray workers, each importing torch and transformers (~4 CPU-seconds, 5-15 s of wall time on two
# shared cores): in `make test` for a registered family with a Conv1D and tied embeddings and for a discovered one
# whose MLP sees the tokens flattened (a mixture of experts); for every family under `slow`.
FAST_W2 = ("gpt2", "qwen2_moe")


@pytest.mark.parametrize("family", [f if f in FAST_W2 else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_stats_one_and_two_workers_agree(family, tmp_path, ray_local):  # noqa: F811
    """C for two layers from the model saved and loaded by name, summed here (W = 1) and by two Ray StatsWorkers
    (W = 2), agree; both load the weights of the model in memory."""
    lm = make_family_lm(family)
    path = tmp_path / "model"
    lm.model.save_pretrained(path)
    lm.tok.save_pretrained(path)
    text = write_corpus(tmp_path / "corpus.raw")
    kw = dict(corpus=text, samples=9, dtype="float64", shard_docs=3, progress=False)
    one = compute_stats(str(path), [0, 2], cache=tmp_path / "w1", workers=1, **kw)
    two = compute_stats(str(path), [0, 2], cache=tmp_path / "w2", workers=2, **kw)
    named = dataclasses.replace(lm, name=str(path))
    docs = list(documents(text))[:9]
    for a, b in zip(one, two):
        assert a["count"] == b["count"] > 0 and a["fingerprint"] == b["fingerprint"] == lm.fingerprint
        get = {k: kw[k] for k in ("corpus", "samples", "dtype")}
        ca = layer_stats(named, a["layer"], cache=tmp_path / "w1", compute=False, **get)[0]
        cb = layer_stats(named, b["layer"], cache=tmp_path / "w2", compute=False, **get)[0]
        m = direct_mom2(lm, a["layer"], docs, max_len=128)[2]
        assert gram_error(cb, ca, m) <= 2 * (128 + 4)            # each within test_stats' float32 bound


# ------------------------------------------------------------------------------------ architecture discovery

@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ARCHS])
def test_discovery_finds_the_registry_templates(family, monkeypatch):
    model = make_family_model(family)
    registered = detect_arch(model)
    monkeypatch.delitem(ARCHS, model.config.model_type)
    assert detect_arch(model) == registered


def test_unknown_structure_names_the_template_flags():
    """OPT keeps its MLP's two Linears in the block itself: no MLP module to find. The error names the flags;
    templates given by hand then win, on a registered family too."""
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(UnknownArchitecture, match="not in the registry") as e:
        detect_arch(model)
    for field in ("mlp", "mlp_in", "mlp_out"):
        assert TEMPLATE_FLAGS[field] in str(e.value)
    found, _ = discover(model)
    assert found["layer"] == "model.decoder.layers.{}" and found["attn"] == "model.decoder.layers.{}.self_attn"
    by_hand = {"mlp": "model.decoder.layers.{}.fc2", "mlp_in": "model.decoder.layers.{}.fc1",
               "mlp_out": "model.decoder.layers.{}.fc2", "final_norm": "model.decoder.final_layer_norm"}
    arch = detect_arch(model, by_hand)
    assert {f: getattr(arch, f) for f in by_hand} == by_hand
    llama = make_family_model("llama")
    assert detect_arch(llama, {"mlp_in": "model.layers.{}.mlp.gate_proj"}).mlp_in == "model.layers.{}.mlp.gate_proj"
    with pytest.raises(UnknownArchitecture, match="lm_head"):
        detect_arch(llama, {"lm_head": "model.head"})


@pytest.mark.parametrize("family", list(FUSED_MOE))
def test_fused_mixture_of_experts_is_refused_with_the_reason(family):
    with pytest.raises(UnknownArchitecture, match=r"mixture of experts .* fused into 3-D parameters"):
        detect_arch(make_family_model(family))


def test_emmet_one_request_is_romes_closed_form(lm, monkeypatch):
    """EMMET's equality-constrained solve with one request is ROME's rank one, Δ = r (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*), for
    any λ, with the k* and r the solver was handed (float64); the delta reverts bit for bit."""
    req, name = TAIL, lm.arch.name("mlp_out", LAYER)
    c = spd(weight_of(get_module(lm.model, name)).shape[1])
    m = Emmet(EmmetParams(layers=[LAYER], mom2_update_weight=2.0, n_prefixes=1, prefix_len=4))
    m.hp.values.steps = 3
    m.use_covariances(lm, {LAYER: c})
    seen = handed_to_solver(m, lm, monkeypatch)
    delta = m.edit(lm, req)
    (k, r), = seen
    close_in_norm(delta.deltas[name], rank_one(k[0], r[0], c), c)
    check_delta(lm, delta, [name])


def test_lora_delta_touches_its_modules_alone_and_no_adapter_is_left(lm):
    """LoRA (peft) on the MLP input and output projections of two layers (GPT-2's Conv1D, Phi-3's fused gate_up,
    Qwen2-MoE's shared expert included): the model's own modules are back once edit() returns, the target NLL falls
    under ΔW, which changes those weights alone and reverts bit for bit."""
    from kedit_ray.editors import LoRA, LoRAParams

    req = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle")
    modules = [(n, id(m)) for n, m in lm.model.named_modules()]
    nll0 = target_nll(lm, [req.text], [req.target_new]).item()
    delta = LoRA(LoRAParams(layers=[1, 2], modules=["mlp_in", "mlp_out"], rank=2, lr=1e-2, steps=5)).edit(lm, req)
    assert [(n, id(m)) for n, m in lm.model.named_modules()] == modules
    with delta.applied(lm.model):
        assert target_nll(lm, [req.text], [req.target_new]).item() < nll0
    check_delta(lm, delta, [lm.arch.name(m, x) for x in (1, 2) for m in ("mlp_in", "mlp_out")])


def test_ike_context_reads_like_a_direct_run(lm):
    """IKE's hooks (C put in each row after its padding and BOS, its positions taken out at the final norm): right-
    padded rows give what the plain model gives for C + row alone, a left-padded greedy decode with a KV cache what
    it decodes for the left-padded rows C + row (Gemma 2's eager attention gives NaN on left padding, unhooked too);
    revert is bit for bit. Float64: the two are the same arithmetic on other paddings."""
    from kedit_ray.editors import Ike, IkeParams
    from kedit_ray.editors.toolkit import pad

    lm.model.double()
    if "Moe" in type(lm.model).__name__:
        lm.model.set_experts_implementation("eager")            # the grouped kernel has no float64
    texts = [TAIL.text, FAR, "Rome"]
    rows = [lm.tok(t).input_ids for t in texts]
    ids, mask = pad(rows, lm.tok.pad_token_id, "cpu")

    def decode(texts):
        lm.tok.padding_side = "left"
        enc = lm.tok(texts, return_tensors="pt", padding=True)
        lm.tok.padding_side = "right"
        return lm.model.generate(**enc, do_sample=False, max_new_tokens=4, min_new_tokens=4, use_cache=True,
                                 pad_token_id=lm.tok.pad_token_id)[:, enc.input_ids.shape[1]:]

    with torch.no_grad():
        before = lm.model(input_ids=ids, attention_mask=mask).logits
        ctx = Ike(IkeParams(k=0)).edit(lm, TAIL)
        assert lm.tok(ctx.text + FAR).input_ids == ctx.ids + rows[1][1:]
        with ctx.applied(lm.model):
            hooked = lm.model(input_ids=ids, attention_mask=mask).logits
            gen = decode(texts)
        for b, row in enumerate(rows):
            want = lm.model(input_ids=torch.tensor([ctx.ids + row[1:]])).logits[0, len(ctx.ids) - 1:]
            assert (hooked[b, :len(row)] - want).abs().max() <= 1e-9 * want.abs().max()
        assert torch.equal(gen, decode([ctx.text + t for t in texts]))
        assert torch.equal(lm.model(input_ids=ids, attention_mask=mask).logits, before)


def test_wise_answers_the_edit_from_its_side_memory_and_reverts(lm):
    """WISE's side memory of the MLP output projection: the edited prompt is answered by it and its target's NLL
    falls; reverted, the logits and every weight are the unedited model's bit for bit."""
    from kedit_ray.editors import Wise, WiseParams

    req = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle")
    before, far, edited = snapshot(lm), logits(lm, FAR), logits(lm, req.text)
    nll0 = target_nll(lm, [req.text], [req.target_new]).item()
    adaptor = Wise(WiseParams(layer=LAYER, lr=0.1, steps=10, alpha=0.5, beta=3.0, gamma=2.0, n_prefixes=0,
                              n_irrelevant=2)).edit(lm, req)
    with adaptor.applied(lm.model):
        assert target_nll(lm, [req.text], [req.target_new]).item() < nll0
    assert torch.equal(logits(lm, FAR), far) and torch.equal(logits(lm, req.text), edited)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())

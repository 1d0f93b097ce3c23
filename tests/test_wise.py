"""WISE on a tiny random Llama: routing (an unrelated input bit-identical), TIES against a float64 reference, shards,
save/load, revert, the sequential state, export's refusal, cached generation; gemma-3-270m."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from kedit_ray.editors import Wise, WiseAdaptor, WiseParams, make_editor
from kedit_ray.editors.toolkit import target_ids
from kedit_ray.editors.wise import Memory, active_adaptor, scores, shard_mask, ties
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.eval.generated import greedy
from kedit_ray.models import Trace, get_module, weight_of
from kedit_ray.requests import EditRequest

LAYER = 1
A = EditRequest(0, "Space Needle", "the city of {}", "Goa", "Seattle")
B = EditRequest(1, "Eiffel Tower", "the city of {}", "Rome", "Paris")
C = EditRequest(2, "Michel Rocard", "The mother tongue of {} is", "English", "French")
FAR = "Danielle Darrieux speaks French"

pytestmark = pytest.mark.usefixtures("one_thread")


def wise(**kw) -> Wise:
    """Settings for the tiny model, whose MLP outputs are ~1 (the margins scale with them)."""
    return Wise(WiseParams(**{"layer": LAYER, "lr": 0.1, "steps": 40, "alpha": 0.5, "beta": 3.0, "gamma": 2.0,
                              "n_prefixes": 1, "prefix_len": 3, "n_irrelevant": 4, **kw}))


def logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([lm.tok(text).input_ids])).logits


def score(lm, adaptor: WiseAdaptor, text: str) -> float:
    """Δ_act of one row, from the projection's input on the unedited model."""
    with torch.no_grad(), Trace(lm.model, adaptor.module, retain_input=True, stop=True) as t:
        lm.model(input_ids=torch.tensor([lm.tok(text).input_ids]))
    return scores(t.input.float(), torch.ones(t.input.shape[:2]), adaptor.side()).item()


def forced(req: EditRequest, lm) -> str:
    """The prompt with the target's tokens but the last, as the teacher-forced scorers feed it."""
    return lm.tok.decode(lm.tok(req.text).input_ids[1:] + target_ids(lm, req.target_new)[:-1])


# ------------------------------------------------------------------------------------ TIES

def reference_ties(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES by its definition, entry by entry in float64: keep each τ's k largest magnitudes, elect the sign of the
    weighted sum (+ on a tie), the weighted mean of the kept entries of that sign (0 where there is none)."""
    flat = [t.double().flatten().tolist() for t in taus]
    n, k = len(flat[0]), int(density * len(flat[0]))
    kept = []
    for f in flat:
        top = set(sorted(range(n), key=lambda i: -abs(f[i]))[:k])
        kept.append([f[i] if i in top else 0.0 for i in range(n)])
    out = []
    for j in range(n):
        sign = 1.0 if sum(w * v[j] for w, v in zip(weights, kept)) >= 0 else -1.0
        agree = [(w, v[j]) for w, v in zip(weights, kept) if v[j] * sign > 0]
        out.append(sum(w * x for w, x in agree) / sum(w for w, _ in agree) if agree else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(taus[0].shape)


def test_ties_equals_its_definition_in_float64():
    """Hand-made task vectors with distinct magnitudes at each trim's boundary; weights as a shard's and the merged
    memory's, and plain; an entry whose weighted mass is exactly 0 (elected +)."""
    taus = [torch.tensor([[3.0, -1.0, 0.5, 2.0], [-4.0, 0.0, 1.0, -2.5]]),
            torch.tensor([[-2.0, 1.5, 1.0, 0.0], [3.0, 2.0, -0.5, -1.0]]),
            torch.tensor([[1.0, -3.0, -2.0, 4.0], [-1.0, 0.5, 2.5, 3.5]])]
    for weights in ([1.0, 1.0, 1.0], [0.2, 0.2, 0.6], [1.0, 2.0, 1.0]):
        for density in (0.5, 0.75, 1.0):
            want = reference_ties(taus, weights, density)
            torch.testing.assert_close(ties(taus, weights, density), want, rtol=4 * 2.0 ** -52, atol=0)
    tie = [torch.tensor([2.0, 1.0]), torch.tensor([-2.0, 1.0])]          # entry 0: mass 0, + wins alone
    assert ties(tie, [1.0, 1.0], 1.0).tolist() == [2.0, 1.0]
    one = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    assert ties([one], [1.0], 0.5).tolist() == [[3.0, 0.0, 0.0, 2.0]]   # one shard: trimmed, as it was


# ------------------------------------------------------------------------------------ routing

def test_edit_goes_to_the_side_memory_and_an_unrelated_input_to_the_main(tiny_lm64):
    """Float64: the edited prompt scores above ε and gets W_v' = W_v + Δ (as a model with that weight computes it,
    to float64 rounding); an unrelated input scores below and its logits are the unedited model's bit for bit."""
    lm = tiny_lm64
    far, edited = logits(lm, FAR), logits(lm, forced(A, lm))
    nll0 = target_nll(lm, [A.text], [A.target_new]).item()
    adaptor = wise().edit(lm, A)
    assert score(lm, adaptor, forced(A, lm)) > adaptor.eps > score(lm, adaptor, FAR)
    side = copy.deepcopy(lm.model)
    w = weight_of(get_module(side, adaptor.module))
    w.add_(adaptor.side().to(w))
    with torch.no_grad():
        want = side(input_ids=torch.tensor([lm.tok(forced(A, lm)).input_ids])).logits
    with adaptor.applied(lm.model):
        assert torch.equal(logits(lm, FAR), far)
        got = logits(lm, forced(A, lm))
        assert target_nll(lm, [A.text], [A.target_new]).item() < nll0 - 1.0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    assert not torch.equal(got, edited)
    assert torch.equal(logits(lm, forced(A, lm)), edited)                         # reverted


def test_cached_generation_routes_each_row_as_alone(tiny_lm):
    """Greedy decoding (left-padded batch, KV cache) under the adaptor: each row continues as it does alone (the
    padding is no position of the row, a cached step goes on from the row's earlier sums), and the unrelated row
    as on the unedited model."""
    adaptor = wise().edit(tiny_lm, A)
    plain = greedy(tiny_lm, [A.text, FAR], 4)
    with adaptor.applied(tiny_lm.model):
        both = greedy(tiny_lm, [A.text, FAR], 4)
        alone = [greedy(tiny_lm, [A.text], 4)[0], greedy(tiny_lm, [FAR], 4)[0]]
    assert both == alone and both[1] == plain[1] and both[0] != plain[0]


# ------------------------------------------------------------------------------------ shards

def test_a_shard_trains_its_mask_and_full_shards_merge_by_ties(tiny_lm):
    """Δ changes only the shard's masked entries; after N edits the shard is TIES-merged (alone: w = 1) and a new
    mask drawn; later the side memory is the merged one with the current shard merged in (w = 0.4, 0.6)."""
    hp = dict(merge_every=2, mask_ratio=0.3, steps=6)
    numel = math.prod(weight_of(get_module(tiny_lm.model, tiny_lm.arch.name("mlp_out", LAYER))).shape)
    g = wise(**hp)
    a = g.edit(tiny_lm, A)
    index = shard_mask(numel, 0.3, 0, 0)
    assert torch.equal(a.memory.index, index) and a.memory.in_shard == 1 and a.memory.merged is None
    masked = torch.zeros(numel, dtype=torch.bool)
    masked[index] = True
    delta = a.memory.shard_delta().flatten()
    assert (delta[~masked] == 0).all() and (delta[masked] != 0).any()
    assert torch.equal(a.side(), a.memory.shard_delta())                          # before a merge: the shard

    with a.applied(tiny_lm.model):
        unmerged = wise(**{**hp, "merge_every": 3}).edit(tiny_lm, B).memory    # the same training, not merged
        b = g.edit(tiny_lm, B)
    assert (b.memory.shard, b.memory.in_shard, b.memory.edits) == (1, 0, 2)
    assert torch.equal(b.memory.merged, ties([unmerged.shard_delta()], [1.0], 0.53).float())
    assert torch.equal(b.memory.index, shard_mask(numel, 0.3, 0, 1)) and not (b.memory.values != 0).any()
    assert torch.equal(b.side(), b.memory.merged)
    with b.applied(tiny_lm.model):
        c = g.edit(tiny_lm, C)
    assert c.memory.merged is b.memory.merged and c.memory.in_shard == 1
    assert torch.equal(c.side(), ties([c.memory.shard_delta(), b.memory.merged], [0.4, 0.6], 0.53).float())


# ------------------------------------------------------------------------------------ the edit object

def test_adaptors_stack_and_revert_bit_for_bit(tiny_lm):
    g = wise(steps=10)
    weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    base = logits(tiny_lm, A.text)
    a = g.edit(tiny_lm, A).apply(tiny_lm.model)
    after_a = logits(tiny_lm, A.text)
    assert active_adaptor(tiny_lm.model, a.module) is a
    b = g.edit(tiny_lm, B).apply(tiny_lm.model)                  # continues a's memory; only b is active
    assert b.memory.edits == 2 and b.memory.min_act <= a.memory.min_act
    b.revert(tiny_lm.model)
    assert torch.equal(logits(tiny_lm, A.text), after_a)
    with pytest.raises(RuntimeError):
        b.revert(tiny_lm.model)
    a.revert(tiny_lm.model)
    assert torch.equal(logits(tiny_lm, A.text), base)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_lm.model.state_dict().items())
    assert g.edit(tiny_lm, B).memory.edits == 1                   # nothing applied, nothing kept: a fresh memory


def test_save_load_apply_gives_the_same_logits(tiny_lm, tmp_path):
    g = wise(steps=10, merge_every=1)                             # a merged memory and a shard
    with g.edit(tiny_lm, A).applied(tiny_lm.model):
        b = g.edit(tiny_lm, B)
    path = b.save(tmp_path / "wise.safetensors")
    again = WiseAdaptor.load(path)
    assert again.module == b.module and again.eps == b.eps and again.meta == b.meta
    for k, v in b.memory.tensors().items():
        assert torch.equal(again.memory.tensors()[k], v), k
    with b.applied(tiny_lm.model):
        want = [logits(tiny_lm, t) for t in (forced(A, tiny_lm), forced(B, tiny_lm), FAR)]
    with again.applied(tiny_lm.model):
        assert all(torch.equal(logits(tiny_lm, t), w) for t, w in
                   zip((forced(A, tiny_lm), forced(B, tiny_lm), FAR), want))
    again.check_model(tiny_lm.name, tiny_lm.fingerprint)
    with pytest.raises(ValueError, match="made for"):
        again.check_model("other", "0" * 16)
    from kedit_ray.io import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a WISE adaptor"):
        WiseAdaptor.load(tmp_path / "x.safetensors")


def test_commit_state_and_a_resumed_run_edit_alike(tiny_lm):
    """The sequential protocol's hooks: commit keeps the active memory, state()/load_state() carry it as tensors,
    and an editor resumed from it (nothing applied) makes the next edit bit for bit as the uninterrupted one."""
    g = wise(steps=8, merge_every=1)
    a = g.edit(tiny_lm, A).apply(tiny_lm.model)
    g.commit(tiny_lm, [A])
    state = g.state()
    assert set(state) == {"index", "values", "counts", "min_act", "merged"}
    going_on = g.edit(tiny_lm, B)
    a.revert(tiny_lm.model)
    resumed = wise(steps=8, merge_every=1)
    resumed.load_state(state)
    again = resumed.edit(tiny_lm, B)
    for k, v in going_on.memory.tensors().items():
        assert torch.equal(again.memory.tensors()[k], v), k
    g.reset()
    assert g.state() == {} and g.edit(tiny_lm, B).memory.edits == 1
    with pytest.raises(ValueError, match="not a WISE memory"):
        resumed.load_state({"x": torch.zeros(1)})


def test_export_refuses_it_and_kedit_edit_saves_it(tiny_lm, tiny_saved, tmp_path, capsys):
    from kedit_ray.cli import main
    from kedit_ray.export import edit_all, save_edited
    from kedit_ray.models import load

    assert Wise.kind == "adaptor" and "side memory" in Wise.refusal
    adaptor = wise(steps=3).edit(tiny_lm, A)
    with pytest.raises(ValueError, match="WiseAdaptor is not a weight delta"):
        save_edited(tiny_lm, adaptor, tmp_path / "m")
    with pytest.raises(ValueError, match="WISE edits are an adaptor"):
        edit_all(wise(), tiny_lm, [A])
    common = ["edit", "--model", str(tiny_saved), "--method", "wise", "--layer", str(LAYER), "--prompt", A.prompt,
              "--subject", A.subject, "--target-new", A.target_new, "--v-steps", "40", "--v-lr", "0.1",
              "--wise-alpha", "0.5", "--wise-beta", "3", "--wise-gamma", "2", "--context-prefixes", "1"]
    assert main([*common, "--save-model", str(tmp_path / "m")]) == 2
    assert "--save-model: WISE edits are an adaptor" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*common, "--save", str(tmp_path / "w.safetensors")]) == 0
    lm = load(str(tiny_saved))
    before = target_nll(lm, [A.text], [A.target_new]).item()
    loaded = WiseAdaptor.load(tmp_path / "w.safetensors")
    loaded.check_model(lm.name, lm.fingerprint)
    with loaded.applied(lm.model):
        assert target_nll(lm, [A.text], [A.target_new]).item() < before - 1.0


def test_registry_and_bad_settings():
    hp = make_editor("wise", {"merge_every": 7, "mask_ratio": 0.5}).hp
    assert (hp.merge_every, hp.mask_ratio) == (7, 0.5)
    for bad in ({"mask_ratio": 0.0}, {"density": 1.5}):
        with pytest.raises(ValueError, match="must be in"):
            WiseParams(**bad)
    fresh = Memory.fresh((3, 4), 0.5, 0)
    assert torch.equal(fresh.shard_delta(), torch.zeros(3, 4)) and fresh.side(0.53).shape == (3, 4)


# ------------------------------------------------------------------------------------ gemma-3-270m

def zsre_cases(n: int):
    from kedit_ray.datasets import load_requests

    from conftest import data_file

    cases, _ = load_requests(data_file("zsre_mend_train-1k.json"), "zsre", limit=n)
    return cases


def test_mask_ratio_is_the_flag_else_the_models_defaults_else_the_reference(tiny_lm):
    """ρ is a measured per-model default: a model without a defaults file takes the reference's 0.2; the edit
    records the value it trained with, and its shard's mask holds that share of the entries."""
    for given, used in ((None, 0.2), (0.5, 0.5)):
        a = wise(steps=1, mask_ratio=given).edit(tiny_lm, A)
        assert a.meta["params"]["mask_ratio"] == used
        assert abs(len(a.memory.index) / math.prod(a.memory.shape) - used) < 0.05


def test_gemma_two_sequential_zsre_edits(gemma):
    """Two zsRE edits one after another with the measured defaults: both answered by the side memory, and unrelated
    NQ questions by the main memory, bit for bit."""
    from kedit_ray.eval.zsre import loc_prompt, zsre_scores

    cases = zsre_cases(12)
    edits, held = cases[:2], cases[2:12]
    far = [loc_prompt(r.neighborhood_prompts[0]) for r in held]
    before = [logits(gemma, t) for t in far]
    pre = [zsre_scores(gemma, r) for r in edits]
    g = Wise()
    applied = []
    try:
        for r in edits:
            applied.append(g.edit(gemma, r).apply(gemma.model))
        post = [zsre_scores(gemma, r, p) for r, p in zip(edits, pre)]
        same = sum(torch.equal(logits(gemma, t), b) for t, b in zip(far, before))
    finally:
        for a in reversed(applied):
            a.revert(gemma.model)
    print([{k: p[k] for k in ("efficacy_score", "paraphrase_score")} for p in post], same, applied[-1].meta)
    assert all(p["efficacy_score"] == 1.0 for p in post)
    assert same >= 9


@pytest.mark.slow
def test_gemma_200_sequential_zsre_edits(gemma):
    """The issue's bar: 200 zsRE edits applied one after another with the measured defaults, ERR ≥ 0.7, TRR ≥ 0.95
    on 100 held-out cases (the paper, T = 1000 on LLaMA-2-7B: Rel .77, Gen .72, Loc 1.00)."""
    from kedit_ray.eval.protocols import run_sequential

    cases = zsre_cases(300)
    rows, summary = run_sequential(gemma, Wise(), cases[:200], 1, [50, 200], cases[200:300], "wise", scorer="zsre",
                                   progress=False)
    print({t: {k: c.get(k) for k in ("ERR", "TRR", "paraphrase_score", "neighborhood_score", "ckpt_threshold",
                                      "ckpt_merges", "seconds_per_edit")} for t, c in summary["checkpoints"].items()})
    last = summary["checkpoints"]["200"]
    assert last["ERR"] >= 0.7 and last["TRR"] >= 0.95

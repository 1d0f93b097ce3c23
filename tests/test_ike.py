"""IKE on a tiny random Llama: the hooked model reads inputs after the context exactly as a direct run does, revert
is bit for bit, retrieval ranks as independent references do, contexts compose and refuse to outgrow the model.

Numeric checks run the float64 model: the hooked and the direct run are the same arithmetic on differently padded
batches, which agree to ~1e-15 relative; 1e-9 is far below any effect the checks are about."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from kedit_ray.editors import EDITORS, Ike, IkeContext, IkeParams, make_editor
from kedit_ray.editors.ike import KINDS, demonstration, fact, query
from kedit_ray.editors.toolkit import pad, target_ids
from kedit_ray.errors import SettingError
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.eval.forced import forced_reads
from kedit_ray.eval.protocols import run_batch, run_sequential
from kedit_ray.eval.zsre import teacher_forced
from kedit_ray.export import edit_all, save_edited
from kedit_ray.models import Trace
from kedit_ray.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_thread")

# flat CounterFact records over the tiny tokenizer's words
POOL = [
    (10, "Eiffel Tower", "The Eiffel Tower is located in", "Rome", "Paris", "Where is the Eiffel Tower ? It is in",
     "The Space Needle is located in", "Seattle"),
    (11, "Michel Rocard", "The mother tongue of Michel Rocard is", "English", "French", "Michel Rocard speaks",
     "Danielle Darrieux speaks", "French"),
    (12, "France", "The capital of France is", "Rome", "Paris", "France capital city is", "The capital of Italy is",
     "Rome"),
    (13, "Germany", "The capital of Germany is", "London", "Berlin", "Germany capital city is",
     "The capital of Spain is", "Spain"),
    (14, "Space Needle", "The Space Needle is located in", "Paris", "Seattle", "Where is the Space Needle ?",
     "The Eiffel Tower is located in", "Paris"),   # the edited case A itself, under another case_id
]
A = EditRequest(0, "Space Needle", "The {} is located in", "Paris", "Seattle", ["Where is the Space Needle ?"],
                ["The Eiffel Tower is located in"], ["Paris"])
B = EditRequest(1, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                ["Danielle Darrieux speaks"], ["Michel Rocard speaks"], ["French"])
PROMPTS = ["The Space Needle is located in", "Where is the Space Needle", "the capital of France", "Rome"]
TOL = 1e-9


@pytest.fixture
def pool(tmp_path) -> str:
    path = tmp_path / "pool.json"
    keys = ("case_id", "subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth")
    path.write_text(json.dumps([dict(zip(keys, r)) for r in POOL]))
    return str(path)


def ike(pool: str, **kw) -> Ike:
    return Ike(IkeParams(**{"pool": pool, "k": 3, "max_tokens": 120, **kw}))


def run(lm, rows: list[list[int]]) -> torch.Tensor:
    """Logits of right-padded rows."""
    ids, mask = pad(rows, lm.tok.pad_token_id, "cpu")
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask).logits


def direct(lm, ctx: IkeContext, row: list[int]) -> torch.Tensor:
    """The model, no context active, on C + the row less its BOS, at the row's positions (C's last one for the
    BOS)."""
    with torch.no_grad(), IkeContext.suspended(lm.model):
        out = lm.model(input_ids=torch.tensor([ctx.ids + row[1:]])).logits[0]
    return out[len(ctx.ids) - 1:]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


# ------------------------------------------------------------------------------------ the hooks

def test_hooked_model_reads_the_context_like_a_direct_run(tiny_lm64, pool):
    """Right-padded rows (the scorers'), position ids, input embeddings and a left-padded greedy decode with a KV
    cache all read C + row as the plain model does; one unpadded row is bit for bit the direct run."""
    lm = tiny_lm64
    ctx = ike(pool).edit(lm, A)
    assert ctx.ids[0] == lm.tok.bos_token_id and ctx.shift == len(ctx.ids) - 1
    rows = [lm.tok(p).input_ids for p in PROMPTS]
    ids, mask = pad(rows, lm.tok.pad_token_id, "cpu")
    before = run(lm, rows)
    with ctx.applied(lm.model), torch.no_grad():
        hooked = run(lm, rows)
        one = lm.model(input_ids=torch.tensor([rows[0]])).logits[0]
        positions = lm.model(input_ids=ids, attention_mask=mask,
                             position_ids=torch.arange(ids.shape[1]).expand(len(rows), -1)).logits
        embeds = lm.model(inputs_embeds=lm.model.get_input_embeddings()(ids), attention_mask=mask).logits
        lm.tok.padding_side = "left"
        enc = lm.tok(PROMPTS, return_tensors="pt", padding=True)
        lm.tok.padding_side = "right"
        gen = lm.model.generate(**enc, do_sample=False, max_new_tokens=5, min_new_tokens=5, use_cache=True,
                                pad_token_id=lm.tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    assert torch.equal(one, direct(lm, ctx, rows[0]))
    for b, row in enumerate(rows):
        want = direct(lm, ctx, row)
        for got in (hooked, positions, embeds):
            assert close(got[b, :len(row)], want)
        with torch.no_grad():
            alone = lm.model.generate(input_ids=torch.tensor([ctx.ids + row[1:]]), do_sample=False, max_new_tokens=5,
                                      min_new_tokens=5, use_cache=True, pad_token_id=lm.tok.pad_token_id)
        assert gen[b].tolist() == alone[0, len(ctx.ids) + len(row) - 1:].tolist()
    assert not close(hooked[0, :len(rows[0])], before[0, :len(rows[0])])
    assert torch.equal(run(lm, rows), before)                          # reverted: bit for bit


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_a_scorers_pass_reads_c_from_its_cache_as_a_direct_run(pool, monkeypatch, family):
    """A scorer's pass (no cache of its own) reads C's keys and values computed once: left- and right-padded rows
    give what C + row gives in one pass, on a model whose sliding window (gemma-3's local layers) is shorter than C
    and on one with learned absolute positions (GPT-2), twice with the same cache."""
    from families import CONFIGS, make_family_lm

    if family == "gemma3_text":
        name, fields = CONFIGS[family]
        monkeypatch.setitem(CONFIGS, family, (name, {**fields, "sliding_window": 8}))
    lm = make_family_lm(family)
    lm.model.double()
    ctx = ike(pool).edit(lm, A)
    assert family != "gemma3_text" or len(ctx.ids) > 2 * lm.model.config.sliding_window
    rows = [lm.tok(p).input_ids for p in PROMPTS]
    for side in ("right", "left"):
        ids, mask = pad(rows, lm.tok.pad_token_id, "cpu")
        if side == "left":
            ids, mask = (torch.stack([r.roll(int((m == 0).sum())) for r, m in zip(t, mask)]) for t in (ids, mask))
        with ctx.applied(lm.model), torch.no_grad():
            got = [lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits for _ in range(2)]
            assert ctx._prefix is not None                          # the cached path ran
        for b, row in enumerate(rows):
            cols = mask[b].nonzero()[:, 0]
            want = direct(lm, ctx, row)
            assert close(got[0][b, cols], want) and torch.equal(got[0][b, cols], got[1][b, cols]), (side, b)


def test_every_scorer_reads_through_the_context(tiny_lm64, pool):
    """forced_reads (a Trace of the final norm, stopped there), target_nll and zsRE's teacher forcing (the head on
    gathered positions) give with the edit what they give for the prompts written after C's text."""
    lm = tiny_lm64
    ctx = ike(pool).edit(lm, A)
    assert lm.tok(ctx.text + PROMPTS[0]).input_ids == ctx.ids + lm.tok(PROMPTS[0]).input_ids[1:]
    targets = [target_ids(lm, t) for t in ("Paris", "Seattle", "Rome London", "Paris")]
    after = [ctx.text + p for p in PROMPTS]
    with ctx.applied(lm.model):
        reads, nll = forced_reads(lm, PROMPTS, targets), target_nll(lm, PROMPTS, ["Paris"] * 4)
        forced = teacher_forced(lm, PROMPTS, targets)
    for (am, lp), (am0, lp0) in zip(reads, forced_reads(lm, after, targets)):
        assert torch.equal(am, am0) and close(lp, lp0)
    assert close(nll, target_nll(lm, after, ["Paris"] * 4))
    for (am, p), (am0, p0) in zip(forced, teacher_forced(lm, after, targets)):
        assert torch.equal(am, am0) and close(p, p0)


def test_a_row_without_its_bos_is_refused(tiny_lm64, pool):
    ctx = ike(pool).edit(tiny_lm64, A)
    for use_cache in (None, False):   # a plain pass, a scorer's (C's cache)
        with ctx.applied(tiny_lm64.model), pytest.raises(ValueError, match="does not start with"):
            tiny_lm64.model(input_ids=torch.tensor([tiny_lm64.tok(PROMPTS[0]).input_ids[1:]]), use_cache=use_cache)


# ------------------------------------------------------------------------------------ retrieval

def tfidf_reference(texts: list[str], q: str) -> list[float]:
    """Cosine of TF-IDF vectors, written out: tf = count, idf = ln((1 + N) / (1 + df)) + 1."""
    docs = [Counter(re.findall(r"\w+", t.lower())) for t in texts]
    idf = {w: math.log((1 + len(docs)) / (1 + sum(w in d for d in docs))) + 1 for d in docs for w in d}

    def vec(c):
        v = {w: n * idf[w] for w, n in c.items() if w in idf}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()}

    qv = vec(Counter(re.findall(r"\w+", q.lower())))
    return [sum(x * qv.get(w, 0.0) for w, x in vec(d).items()) for d in docs]


def hidden_reference(lm, layer: int, texts: list[str], q: str) -> list[float]:
    """Cosine of block outputs mean-pooled over each text's tokens but BOS, centred on the pool's mean: each text
    run alone, unpadded."""
    def mean(text):
        with Trace(lm.model, lm.arch.name("layer", layer), retain_output=True, stop=True) as t:
            lm.model(input_ids=torch.tensor([lm.tok(text).input_ids]))
        return t.output[0, 1:].double().mean(0)

    x = torch.stack([mean(t) for t in texts])
    mu = x.mean(0)
    x, qv = x - mu, mean(q) - mu
    return (x @ qv / (x.norm(dim=1) * qv.norm())).tolist()


@pytest.mark.parametrize("retriever", ["tfidf", "hidden"])
def test_retrieval_ranks_as_the_reference_and_leaves_the_case_out(tiny_lm64, pool, retriever):
    """The demonstrations come from the pool's records nearest the edit by the reference cosine of their copy
    demonstrations, in the kinds of KINDS down the ranking, least similar first; the edited case's own record
    (another case_id, the same subject and prompt) gives none."""
    from kedit_ray.datasets import load_requests

    lm, layer = tiny_lm64, 2
    records = load_requests(pool)[0]
    texts = [query(r) for r in records]
    ref = (tfidf_reference(texts, query(A)) if retriever == "tfidf" else
           hidden_reference(lm, layer, texts, query(A)))
    others = sorted((i for i, r in enumerate(records) if (r.subject, r.text) != (A.subject, A.text)),
                    key=lambda i: -ref[i])
    assert len(others) == len(records) - 1
    assert min(ref[i] - ref[j] for i, j in zip(others, others[1:])) > 1e-4   # far from ties: one order
    for k, nearest in ((2, others[:2]), (100, others)):                       # k past the pool: every other record
        got = ike(pool, retriever=retriever, layer=layer, k=k).retrieve(lm, [A])
        want = [(demonstration(records[i], kind), kind) for i, kind in zip(nearest, KINDS)]
        assert got == want[::-1]


def test_demonstrations_are_the_papers_three_kinds_in_its_ratio(pool):
    from kedit_ray.datasets import load_requests

    r = load_requests(pool)[0][0]
    f = "The Eiffel Tower is located in Rome"
    assert [demonstration(r, kind) for kind in ("copy", "update", "retain")] == [
        f"New Fact: {f}\n{f}\n\n", f"New Fact: {f}\nWhere is the Eiffel Tower ? It is in Rome\n\n",
        f"New Fact: {f}\nThe Space Needle is located in Seattle\n\n"]
    assert demonstration(EditRequest(0, "Rome", "{} is in", "Italy"), "retain") == "New Fact: Rome is in Italy\n" \
        "Rome is in Italy\n\n"                                             # no neighbour: a copy
    assert [KINDS.count(k) for k in ("copy", "update", "retain")] == [1, 3, 4]


# ------------------------------------------------------------------------------------ composition, limits, export

def test_contexts_compose_and_revert_in_turn(tiny_lm64, pool):
    """B edited over A states both facts (A first) and is the one active; reverting B makes A active again, and
    reverting A leaves the model bit for bit as it was."""
    lm, editor = tiny_lm64, ike(pool, k=2, max_tokens=None)
    rows = [lm.tok(p).input_ids for p in PROMPTS[:2]]
    before = run(lm, rows)
    a = editor.edit(lm, A).apply(lm.model)
    b = editor.edit(lm, B).apply(lm.model)
    assert b.requests == [A, B] and b.meta["edits"] == 2
    assert b.text.endswith(f"New Fact: {fact(A)}\nNew Fact: {fact(B)}\n")
    assert close(run(lm, rows)[0, :len(rows[0])], direct(lm, b, rows[0]))
    b.revert(lm.model)
    assert close(run(lm, rows)[0, :len(rows[0])], direct(lm, a, rows[0]))
    with pytest.raises(RuntimeError, match="not applied"):
        b.revert(lm.model)
    a.revert(lm.model)
    assert torch.equal(run(lm, rows), before)


def test_a_context_longer_than_the_model_takes_is_an_error(tiny_lm64, pool):
    lm = tiny_lm64
    editor = ike(pool, k=0)
    n = len(editor.edit(lm, A).ids)
    with editor.edit(lm, A).applied(lm.model):
        editor.hp.max_tokens = n + 3                              # room for A's fact, not for B's too
        with pytest.raises(ValueError, match=r"context of 2 edit\(s\) and 0 demonstrations is \d+ tokens, more than "
                                             rf"{n + 3} \(--ike-max-tokens\)"):
            editor.edit(lm, B)
    with pytest.raises(ValueError, match="more than 64 .the model's context of 128 less 64"):
        ike(pool, k=5, max_tokens=None).edit(lm, A)


def test_protocols_run_it_and_restore_the_model(tiny_lm64, pool):
    """Sequential: one context grows to every edit (ckpt_context_tokens); batch: a batch's edits compose. The
    model is as before at the end."""
    lm, editor = tiny_lm64, ike(pool, k=1, max_tokens=None)
    c = EditRequest(2, "Michel Rocard", "The mother tongue of {} is", "English", "French", ["Michel Rocard speaks"],
                    ["Danielle Darrieux speaks"], ["French"])
    rows = [lm.tok(p).input_ids for p in PROMPTS]
    before = run(lm, rows)
    with editor.edit(lm, A).applied(lm.model):
        both = len(editor.edit(lm, B).ids)
    out, _ = run_sequential(lm, editor, [A, B], 1, None, [c], "ike", progress=False)
    assert {r["checkpoint"] for r in out} == {2} and len(out) == 3 and not any(r["error"] for r in out)
    assert out[0]["ckpt_context_tokens"] == both
    assert len(run_batch(lm, editor, [A, B], 2, "ike", progress=False)) == 2
    assert torch.equal(run(lm, rows), before)


def test_settings_export_and_saving(tiny_lm64, pool, tmp_path):
    lm = tiny_lm64
    assert EDITORS["ike"][0].kind == "adaptor" and "no weight" in Ike.refusal
    with pytest.raises(SettingError, match="pool"):
        make_editor("ike").check_settings("m")
    with pytest.raises(SettingError, match="no such file"):
        make_editor("ike", {"pool": str(tmp_path / "none.json")}).check_settings("m")
    plain = make_editor("ike", {"k": 0}).edit(lm, A)                # no pool needed: the new fact alone
    assert plain.text == f"New Fact: {fact(A)}\n" and plain.meta["retriever"] is None
    with pytest.raises(ValueError, match="IKE changes no weight"):
        edit_all(ike(pool), lm, [A])
    with pytest.raises(ValueError, match="not a weight delta"):
        save_edited(lm, plain, tmp_path / "model")
    ctx = ike(pool).edit(lm, A)
    back = IkeContext.load(ctx.save(tmp_path / "ike.json"))
    assert (back.ids, back.requests, back.text) == (ctx.ids, ctx.requests, ctx.text)
    rows = [lm.tok(PROMPTS[0]).input_ids]
    with ctx.applied(lm.model):
        want = run(lm, rows)
    with back.applied(lm.model):
        assert torch.equal(run(lm, rows), want)


# ------------------------------------------------------------------------------------ gemma-3-270m

@pytest.mark.slow
def test_ike_20_counterfact_cases_on_gemma(gemma):
    """The single protocol on the first 20 CounterFact cases with the shared training records as the pool (TF-IDF,
    k 8). Measured: ES 0.85, PS 0.95, NS 0.30 (unedited 0.10 / 0.15 / 0.80). Also: gemma-3's tokenizer reads a
    prompt after C as on its own."""
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.summary import summarize

    from conftest import data_file

    cases, _ = load_requests(data_file("counterfact-edit.json"), limit=20)
    editor = Ike(IkeParams(pool=str(data_file("counterfact-train.json"))))
    ctx = editor.edit(gemma, cases[0])
    for r in cases:
        for p in (r.text, *r.paraphrase_prompts, *r.neighborhood_prompts):
            assert gemma.tok(ctx.text + p).input_ids == ctx.ids + gemma.tok(p).input_ids[1:]
    rows = run_batch(gemma, editor, cases, 1, "ike", progress=False)
    figures = summarize(rows, "counterfact")
    print({k: figures.get(k) for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")})
    assert figures["efficacy_score"] >= 0.85 and figures["paraphrase_score"] >= 0.7


def test_a_context_that_cannot_hook_its_modules_is_not_left_applied(tiny_lm):
    ctx = IkeContext([1, 5, 9], 1, "model.no_such_embedding", tiny_lm.arch.final_norm, [])
    with pytest.raises(Exception, match="no_such_embedding"):
        ctx.apply(tiny_lm.model)
    assert IkeContext.active(tiny_lm.model) is None
    with pytest.raises(RuntimeError, match="not applied"):
        ctx.revert(tiny_lm.model)

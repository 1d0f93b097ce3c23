"""Generated answers (issue 19 §3): the verdict against a greedy decode written out by hand (full forward passes, no
cache, no padding), early stopping counted in forward passes, and `--generate`/`--fluency` in every protocol."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import torch

from kedit_ray.cli import main
from kedit_ray.eval.generated import normalise, starts_with
from kedit_ray.eval.report import table
from test_errors import eval_argv, write

PROMPTS = ["The Space Needle is located in the city of", "Paris is the capital of", "Danielle Darrieux speaks",
           "The mother tongue of Michel Rocard is", "Where is the Eiffel Tower ?", "What company made the product",
           "Rome is in", "The religion of Italy is", "Berlin was born in the country of", "What language is French"]


@torch.no_grad()
def by_hand(lm, prompt: str, n: int = 3) -> list[int]:
    """The first `n` greedy tokens after `prompt` (fewer at EOS): argmax of a full forward pass per token."""
    ids = lm.tok(prompt).input_ids
    out = []
    for _ in range(n):
        nxt = int(lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == lm.tok.eos_token_id:
            break
        out.append(nxt)
    return out


def words(lm, ids: list[int]) -> list[str]:
    return [lm.tok.decode([i]) for i in ids]


def test_normalise():
    assert normalise("\n  Paris,\tFrance ") == "paris, france"


def test_verdicts_match_a_greedy_decode_by_hand(tiny_lm64, one_thread):
    """Every prompt in one left-padded batch: a target matches when the hand-made continuation starts with it, in any
    case and spacing, and not when it differs in a word or in a space; the batch's verdicts equal one-prompt ones."""
    lm = tiny_lm64
    conts = {p: words(lm, by_hand(lm, p)) for p in PROMPTS}
    long = [p for p, w in conts.items() if len(w) >= 2]
    assert long, "no prompt continues for two words before EOS"
    other = next(w for w in ("Goa", "Seattle", "London") if all(w != c[0] for c in conts.values() if c))
    prompts, targets, expected = [], [], []
    for p, w in conts.items():
        if not w:
            continue
        prompts += [p, p, p]
        targets += [w[0].upper(), f"  {' '.join(w[:2])} ", other]
        expected += [True, True, False]   # w[:2]: the first word alone where EOS followed it
    for p in long:
        w = conts[p]
        prompts += [p, p]
        targets += [w[0] + w[1], f"{w[0]} {other}"]   # the space between words counts; so does the second word
        expected += [False, False]
    assert starts_with(lm, prompts, targets) == expected
    assert [starts_with(lm, [p], [t])[0] for p, t in zip(prompts, targets)] == expected


def test_generation_stops_as_soon_as_it_cannot_match(tiny_lm64, one_thread):
    """Forward passes: one for a first word that differs, or for a one-word match; one per word of a longer match;
    at most the target's tokens + SLACK when the text stays a prefix (never here: word-level tokens)."""
    lm = tiny_lm64
    p = next(p for p in PROMPTS if len(by_hand(lm, p)) >= 3)
    w = words(lm, by_hand(lm, p))
    calls = []
    hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for target, passes, verdict in ((f"Goa{w[0]}", 1, False), (w[0], 1, True), (" ".join(w[:2]), 2, True),
                                        (" ".join(w[:3]), 3, True), (f"{w[0]} {w[1]} Goa{w[2]}", 3, False)):
            calls.clear()
            assert starts_with(lm, [p], [target]) == [verdict]
            assert len(calls) == passes, target
    finally:
        hook.remove()


def rows(out) -> list[dict]:
    return ds.dataset(str(out / "results")).to_table().to_pylist()


def test_eval_generate_and_fluency_in_every_protocol(tmp_path, tiny_dir, tiny_lm, capsys, one_thread):
    """--generate adds the generated columns and their pre_ forms beside the teacher-forced ones, in [0, 1]; the
    unedited model's equal a direct `starts_with`; --fluency is no longer refused in batch and sequential runs."""
    from test_protocols import cases

    reqs = cases(5)
    data = write(tmp_path / "d.jsonl", [r.to_dict() for r in reqs])
    gen = ["efficacy_generated", "paraphrase_generated", "pre_efficacy_generated", "pre_paraphrase_generated"]
    runs = {"single": [], "batch": ["--batch-size", "2"],
            "sequential": ["--batch-size", "2", "--held-out", "1", "--checkpoints", "2,4"]}
    for protocol, more in runs.items():
        out = tmp_path / protocol
        assert main(eval_argv(tiny_dir, data, out, "--workers", "1", "--limit", "4", "--generate", "--fluency",
                              "--protocol", protocol, *more)) == 0, protocol
        got = rows(out)
        assert got and all(r["error"] is None for r in got)
        for r in got:
            assert all(0 <= r[c] <= 1 for c in gen), (protocol, r)
            assert r["fluency"] is not None and r["pre_fluency"] is not None
            req = next(q for q in reqs if q.case_id == r["case_id"])
            assert r["pre_efficacy_generated"] == float(starts_with(tiny_lm, [req.text], [req.target_new])[0])
        summary = json.loads((out / "summary.json").read_text())
        keys = list(summary)
        assert keys.index("efficacy_generated") == keys.index("efficacy_score") + 1   # side by side
        assert json.loads((out / "config.json").read_text())["generate"] is True
    assert "ES gen" in table({"run": summary})
    plain = tmp_path / "plain"
    assert main(eval_argv(tiny_dir, data, plain, "--workers", "1", "--limit", "1")) == 0
    assert all(r[c] is None for r in rows(plain) for c in gen)   # in the contract schema, null when not measured
    assert "ES gen" not in table({"run": json.loads((plain / "summary.json").read_text())})

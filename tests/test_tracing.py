"""Causal tracing: the restored runs' maths on the tiny model, the files of `kedit trace`, and gemma-3-270m."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from conftest import data_file
from kedit_ray.datasets import KnownFact
from kedit_ray.results import ConfigMismatch
from kedit_ray.tracing import command, results
from kedit_ray.tracing.trace import (FactTrace, Restore, TraceParams, grid, noise_std, prepare, restored_prob_one,
                                     restored_probs, token_roles, trace_fact, trace_known, window)

PROMPT, SUBJECT = "The Space Needle is located in the city of", "Space Needle"
TINY_FACTS = [("The Space Needle is located in the city of", "Space Needle"),
              ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
              ("Danielle Darrieux was born in", "Danielle Darrieux"),
              ("The capital of France is", "France")]


pytestmark = pytest.mark.usefixtures("one_thread")
# The checks that compare two ways of computing the same probability use the tiny model in float64: the two then
# agree to ~1e-15 on any correct arithmetic, and 1e-6 is far above that and far below a restoration's effect.


def sigma(lm) -> float:
    return 3 * noise_std(lm, [p for p, _ in TINY_FACTS])


def test_window_is_romes():
    assert window(7, 18, 10) == tuple(range(2, 12))
    assert window(0, 18, 10) == tuple(range(0, 5))
    assert window(17, 18, 10) == tuple(range(12, 18))
    assert window(4, 18, 1) == (4,)


def test_token_roles():
    # <bos> The [Space Needle] is located in the city of
    assert token_roles(10, range(2, 4)) == ["prefix", "prefix", "first_subject", "last_subject", "first_subsequent",
                                            "further", "further", "further", "further", "last"]
    assert token_roles(6, range(1, 4)) == ["prefix", "first_subject", "middle_subject", "last_subject",
                                           "first_subsequent", "last"]
    assert token_roles(3, range(0, 1)) == ["last_subject", "first_subsequent", "last"]


def test_restoring_every_state_at_a_layer_gives_back_the_clean_probability(tiny_lm64):
    """'Every state' = block l's output (the residual stream) at every token. All later computation reads
    only those states, so from layer l on the run is the clean run, whatever the noise: P*_restored = P,
    up to rounding (the restored rows run in a batch of S, the clean run alone)."""
    tiny_lm = tiny_lm64
    run = prepare(tiny_lm, PROMPT, SUBJECT, sigma(tiny_lm), TraceParams(samples=4))
    assert run.p - run.p_star > 0.01  # the noise does corrupt the answer
    T, L = run.ids.shape[1], tiny_lm.n_layers
    every = [Restore("hidden", tuple(range(T)), (l,)) for l in range(L)]
    every.append(Restore("hidden", tuple(range(T)), tuple(range(L))))
    batched = restored_probs(tiny_lm, run, every)
    torch.testing.assert_close(batched, torch.full((L + 1,), run.p, dtype=batched.dtype), rtol=0, atol=1e-6)
    for rs in every:
        assert restored_prob_one(tiny_lm, run, rs) == pytest.approx(run.p, abs=1e-6)
    # restoring only the uncorrupted tokens before the subject changes nothing
    before = restored_probs(tiny_lm, run, [Restore("hidden", tuple(range(run.subject.start)), (0,))])
    assert before.item() == pytest.approx(run.p_star, abs=1e-6)


def test_zero_noise_gives_zero_effects(tiny_lm64):
    tiny_lm = tiny_lm64
    trace = trace_fact(tiny_lm, PROMPT, SUBJECT, 0.0, TraceParams(samples=2, window=3))
    assert trace.p == pytest.approx(trace.p_star, abs=1e-6)  # TE = 0
    for scores in trace.scores.values():
        np.testing.assert_allclose(scores, trace.p_star, atol=1e-6)  # IE = 0 everywhere


@pytest.mark.parametrize("max_rows", [256, 7])
def test_batched_restoration_matches_one_pass_per_restoration(tiny_lm64, max_rows):
    tiny_lm = tiny_lm64
    params = TraceParams(samples=3, window=3)
    run = prepare(tiny_lm, PROMPT, SUBJECT, sigma(tiny_lm), params)
    restores = grid(tiny_lm, run, params)
    assert len(restores) == 3 * (run.ids.shape[1] - run.subject.start) * tiny_lm.n_layers
    batched = restored_probs(tiny_lm, run, restores, max_rows)
    one = torch.tensor([restored_prob_one(tiny_lm, run, rs) for rs in restores], dtype=batched.dtype)
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-6)
    assert (batched - run.p_star).abs().max() > 1e-3  # restorations do change the answer's probability


def test_trace_fact_is_deterministic_and_checks_the_answer(tiny_lm64):
    """The same seed gives the same noise, hence the same scores (to float64 rounding: run to run a BLAS may
    round differently; another noise would move them by far more than 1e-9)."""
    tiny_lm = tiny_lm64
    params = TraceParams(samples=2, window=3)
    s = sigma(tiny_lm)
    a = trace_fact(tiny_lm, PROMPT, SUBJECT, s, params)
    b = trace_fact(tiny_lm, PROMPT, SUBJECT, s, params)
    same = lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-9)  # noqa: E731
    same(a.p_star, b.p_star)
    for k in a.scores:
        same(a.scores[k], b.scores[k])
    assert a.tokens[a.subject_range[0]:a.subject_range[1]] == ["Space", "Needle"]
    assert set(a.scores) == {"hidden", "mlp", "attn"} and a.scores["mlp"].shape == (len(a.tokens), 4)
    other = "Paris" if a.answer.strip() != "Paris" else "Rome"
    wrong = trace_known(tiny_lm, KnownFact(3, SUBJECT, PROMPT, other), s, params)
    assert wrong.skipped and not wrong.scores
    right = trace_known(tiny_lm, KnownFact(3, SUBJECT, PROMPT, a.answer.strip()), s, params)
    assert right.skipped is None
    same(right.scores["hidden"], a.scores["hidden"])
    failed = trace_known(tiny_lm, KnownFact(4, "Rome", PROMPT, "Paris"), s, params)
    assert failed.error and "Rome" in failed.error


def test_averages_are_per_fact_then_over_facts():
    L = 2
    def fact(i, scores):  # <bos> S1 S2 S3 is of: prefix, first, middle, last subject, first subsequent, last
        return FactTrace(i, "", "", ["<bos>", "a", "b", "c", "is", "of"], (1, 4), " x", 0.9, 0.1,
                         {"mlp": np.asarray(scores, dtype=float)})
    f0 = fact(0, [[0.1] * L, [0.2] * L, [0.3] * L, [0.5, 0.7], [0.1] * L, [0.2] * L])
    f1 = fact(1, [[0.1] * L, [0.1] * L, [0.1] * L, [0.3, 0.1], [0.1] * L, [0.6] * L])
    table = pa.concat_tables([results.fact_table(f0, "m"), results.fact_table(f1, "m")])
    assert table.num_rows == 2 * 6 * L
    ie, counts = results.averages(table)
    np.testing.assert_allclose(ie["mlp"]["last_subject"], [(0.4 + 0.2) / 2, (0.6 + 0.0) / 2])
    np.testing.assert_allclose(ie["mlp"]["last"], [(0.1 + 0.5) / 2] * L)
    assert "prefix" not in ie["mlp"] and counts["middle_subject"] == 2


def tiny_facts_file(lm, tmp_path):
    """Known facts for the tiny model: its own answers, plus one fact it gets wrong."""
    rows = []
    for i, (prompt, subject) in enumerate(TINY_FACTS):
        answer = trace_fact(lm, prompt, subject, 0.0, TraceParams(kinds=("hidden",), samples=1)).answer.strip()
        rows.append({"known_id": 10 + i, "subject": subject, "attribute": answer, "prompt": prompt})
    rows.append({"known_id": 99, "subject": "Eiffel Tower", "attribute": "Goa",
                 "prompt": "The Eiffel Tower is located in the city of"})
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(rows))
    return path


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_trace_command_writes_results_summary_and_heatmaps(tiny_lm, tmp_path, capsys):
    model = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model)
    tiny_lm.tok.save_pretrained(model)
    data, out = tiny_facts_file(tiny_lm, tmp_path), tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--samples", "3", "--window", "3",
            "--suggest-layer"]
    assert run_command(argv) == 0
    table = ds.dataset(str(out / "results")).to_table()
    assert set(table.column_names) >= {"fact", "kind", "role", "token", "layer", "ie"}
    assert sorted(set(table["fact"].to_pylist())) == [10, 11, 12, 13]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["traced"] == 4 and summary["skipped"] == 1 and summary["facts"] == 5
    assert summary["te_mean"] > 0
    assert set(summary["ie"]) == {"hidden", "mlp", "attn"} and len(summary["ie"]["mlp"]["last_subject"]) == 4
    assert summary["peak_mlp_layer_last_subject"] == int(np.argmax(summary["ie"]["mlp"]["last_subject"]))
    assert f"suggested layer: {summary['peak_mlp_layer_last_subject']}" in capsys.readouterr().out
    plots = out / "plots"
    for kind in ("hidden", "mlp", "attn"):
        assert (plots / f"average-{kind}.png").read_bytes()[:4] == b"\x89PNG"
        assert (plots / f"fact-10-{kind}.png").exists()
    assert (plots / "by-layer.png").exists()
    # a rerun resumes: nothing is traced twice, the skipped fact is remembered
    parts = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert run_command(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == parts
    assert json.loads((out / "summary.json").read_text())["te_mean"] == summary["te_mean"]
    # another configuration in the same OUT is refused
    with pytest.raises(ConfigMismatch, match=r"seed: 1 there, 2 now"):
        run_command(argv[:-1] + ["--seed", "2"])


@pytest.mark.slow
def test_trace_command_on_ray_matches_in_process(tiny_lm, tmp_path):
    model = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model)
    tiny_lm.tok.save_pretrained(model)
    data = tiny_facts_file(tiny_lm, tmp_path)
    common = ["--model", str(model), "--data", str(data), "--samples", "2", "--window", "3", "--no-fact-plots"]
    assert run_command(common + ["--out", str(tmp_path / "local")]) == 0
    assert run_command(common + ["--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    local, ray = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "ray"))
    assert ray["traced"] == local["traced"] == 4
    np.testing.assert_allclose(ray["ie"]["mlp"]["last_subject"], local["ie"]["mlp"]["last_subject"], atol=1e-6)


def known_to_gemma(gemma, n: int, tmp_path):
    """The first n facts of known_1000.json that gemma-3-270m answers correctly, as a facts file."""
    from kedit_ray.datasets import load_known
    from kedit_ray.tracing.trace import first_token, subject_tokens

    rows = json.loads(data_file("known_1000.json").read_text())
    kept = []
    for fact, row in zip(load_known(data_file("known_1000.json")), rows):
        ids, _ = subject_tokens(gemma, fact.prompt, fact.subject)
        with torch.no_grad():
            logits = gemma.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) == first_token(gemma, fact.attribute):
            kept.append(row)
        if len(kept) == n:
            break
    path = tmp_path / "known.json"
    path.write_text(json.dumps(kept))
    return path


def check_gemma_trace(out, n: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["traced"] == n and summary["skipped"] == 0
    assert summary["te_mean"] > 0
    for kind in ("hidden", "mlp", "attn"):
        assert (out / "plots" / f"average-{kind}.png").stat().st_size > 1000
        assert len(summary["ie"][kind]["last_subject"]) == 18
    return summary


def test_gemma_three_facts(gemma, tmp_path):
    data, out = known_to_gemma(gemma, 3, tmp_path), tmp_path / "out"
    assert run_command(["--data", str(data), "--out", str(out), "--samples", "1", "--no-fact-plots"]) == 0
    check_gemma_trace(out, 3)


@pytest.mark.slow
def test_gemma_twenty_facts_on_two_workers(gemma, tmp_path):
    data, out = known_to_gemma(gemma, 20, tmp_path), tmp_path / "out"
    assert run_command(["--data", str(data), "--out", str(out), "--samples", "3", "--workers", "2"]) == 0
    summary = check_gemma_trace(out, 20)
    assert (out / "plots" / "by-layer.png").exists()
    assert 0 <= summary["peak_mlp_layer_last_subject"] < 18

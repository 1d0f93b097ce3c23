"""Errors a user can act on: one line `kedit CMD: error: ...`, a non-zero exit, no traceback (--debug shows it),
and nothing started or written before the input is known to be good."""
from __future__ import annotations

import json
import time

import pytest

from kedit_ray.cli import main, split_held_out
from kedit_ray.options import UsageError
from kedit_ray.requests import EditRequest

GOOD = {"case_id": 0, "subject": "Space Needle", "prompt": "The {} is located in the city of", "target_new": "Goa",
        "target_true": "Seattle"}


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `kedit ARGV`."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_error(err: str, command: str, *words: str) -> None:
    """stderr is one error line for `command` holding `words`, with no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"kedit {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def eval_argv(tiny_dir, data, out, *more: str) -> list[str]:
    return ["eval", "--model", tiny_dir, "--data", data, "--out", str(out), "--no-cov", "--layer", "1",
            "--v-steps", "2", *more]


def test_loader_errors_are_one_line(tmp_path, tiny_dir, capsys):
    bad = write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "case_id": 1, "target_new": 42}])
    code, err = run(capsys, *eval_argv(tiny_dir, bad, tmp_path / "o"))
    assert code == 2
    one_error(err, "eval", "bad.jsonl", "record 1", "'target_new'", "expected a string, got int 42")
    assert not (tmp_path / "o").exists()                                  # nothing written
    code, err = run(capsys, *eval_argv(tiny_dir, bad, tmp_path / "o", "--debug"))   # --debug: the traceback too
    assert code == 2 and "Traceback" in err and "InvalidRecord" in err
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(GOOD, indent=2))
    code, err = run(capsys, *eval_argv(tiny_dir, str(pretty), tmp_path / "o"))
    one_error(err, "eval", "one JSON object spread over several lines", "JSON array")
    parquet = tmp_path / "junk.parquet"
    parquet.write_bytes(b"PAR1 not really")
    code, err = run(capsys, *eval_argv(tiny_dir, str(parquet), tmp_path / "o"))
    assert code == 2
    one_error(err, "eval", "junk.parquet", "not a readable Parquet file")
    code, err = run(capsys, *eval_argv(tiny_dir, str(tmp_path / "absent.json"), tmp_path / "o"))
    assert code == 2
    one_error(err, "eval", "absent.json")


@pytest.mark.parametrize("flag, value, says", [("--limit", "-1", "≥ 0"), ("--workers", "0", "≥ 1"),
                                               ("--batch-size", "x", "an integer")])
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "d.json", "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err and "Traceback" not in err


def test_unwritable_out_is_found_before_any_model_loads(tmp_path, tiny_dir, capsys):
    data = write(tmp_path / "d.jsonl", [GOOD])
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run(capsys, *eval_argv(tiny_dir, data, blocker / "out"))
    assert code == 2
    one_error(err, "eval", "--out", "cannot write there")


def test_a_missing_model_fails_in_seconds_before_ray(tmp_path, capsys):
    import ray

    data = write(tmp_path / "d.jsonl", [GOOD])
    t0 = time.perf_counter()
    code, err = run(capsys, "eval", "--model", "no-such-org/no-such-model", "--data", data, "--out",
                    str(tmp_path / "o"))
    assert code == 2 and time.perf_counter() - t0 < 30
    one_error(err, "eval", "no-such-org/no-such-model")
    assert not ray.is_initialized() and not (tmp_path / "o").exists()
    code, err = run(capsys, "stats", "--model", str(tmp_path / "nowhere"), "--layers", "1")
    one_error(err, "stats", "no such directory")
    code, err = run(capsys, "trace", "--model", str(tmp_path / "nowhere"), "--data", data, "--out", str(tmp_path / "t"))
    one_error(err, "trace", "no such directory")


def test_empty_is_not_success(tmp_path, tiny_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run(capsys, *eval_argv(tiny_dir, str(empty), tmp_path / "o"))
    assert code == 2
    one_error(err, "eval", "empty.jsonl", "no valid records")
    bad = write(tmp_path / "bad.jsonl", [{**GOOD, "target_new": ""}])
    code, err = run(capsys, *eval_argv(tiny_dir, bad, tmp_path / "o", "--skip-invalid"))
    one_error(err, "eval", "no valid records", "skipped 1")
    good = write(tmp_path / "good.jsonl", [GOOD])                       # the corrected command is not refused
    assert not (tmp_path / "o" / "config.json").exists()
    assert main(eval_argv(tiny_dir, good, tmp_path / "o", "--workers", "1")) == 0


def test_prompts_longer_than_the_context_are_invalid_records(tmp_path, tiny_dir, capsys):
    long = {**GOOD, "case_id": 1, "prompt": "The {} is located in " + "the city of " * 60}   # 128-token context
    data = write(tmp_path / "long.jsonl", [GOOD, long])
    code, err = run(capsys, *eval_argv(tiny_dir, data, tmp_path / "o"))
    one_error(err, "eval", "long.jsonl", "record 1", "'prompt'", "more than the model's context of 128")
    paraphrase = {**GOOD, "case_id": 2, "paraphrase_prompts": ["city " * 200]}
    data = write(tmp_path / "para.jsonl", [paraphrase])
    code, err = run(capsys, *eval_argv(tiny_dir, data, tmp_path / "o"))
    one_error(err, "eval", "record 0", "'paraphrase_prompts'")
    portability = {**GOOD, "case_id": 3, "portability_prompts": ["Where is it?"], "portability_answers": ["Goa " * 200]}
    data = write(tmp_path / "port.jsonl", [portability])              # counted with its own, long, answer
    code, err = run(capsys, *eval_argv(tiny_dir, data, tmp_path / "o"))
    one_error(err, "eval", "record 0", "'portability_prompts'")


def test_a_setting_error_names_the_flag_before_any_model_loads(tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [GOOD])
    code, err = run(capsys, "eval", "--method", "grace", "--model", "no-such-org/no-such-model", "--data", data,
                    "--out", str(tmp_path / "o"))
    assert code == 2                                     # refused on the setting, not on the (missing) model
    one_error(err, "eval", "--eps-init", "no measured ε_init")
    code, err = run(capsys, "eval", "--method", "rome", "--eps-init", "3", "--data", data, "--out", str(tmp_path / "o"))
    one_error(err, "eval", "--eps-init does not apply to --method rome")


def test_a_run_whose_every_case_fails_exits_non_zero(tmp_path, tiny_dir, capsys):
    """CounterFact scores need o; a user record without target_true fails in every case."""
    data = write(tmp_path / "d.jsonl", [{k: v for k, v in GOOD.items() if k != "target_true"},
                                        {**{k: v for k, v in GOOD.items() if k != "target_true"}, "case_id": 1}])
    code, err = run(capsys, *eval_argv(tiny_dir, data, tmp_path / "o", "--workers", "1"))
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("kedit eval: error:")]
    assert len(line) == 1 and "every case failed (2 of 2)" in line[0] and "target_true" in line[0]


def test_held_out_default_is_a_fifth_at_most_100():
    reqs = [EditRequest(i, "S", "{} is", "a", "b") for i in range(30)]
    edited, held = split_held_out(reqs, None, None)
    assert (len(edited), len(held)) == (24, 6) and held[0].case_id == 24
    edited, held = split_held_out(reqs, 10, None)            # the next 6 after the first 10
    assert [r.case_id for r in held] == list(range(10, 16)) and len(edited) == 10
    edited, held = split_held_out(reqs, 30, None)            # asks for all: a fifth is still held out
    assert (len(edited), len(held)) == (24, 6)
    many = [EditRequest(i, "S", "{} is", "a", "b") for i in range(1000)]
    assert len(split_held_out(many, None, None)[1]) == 100
    assert split_held_out(reqs, None, 0) == (reqs, [])
    with pytest.raises(UsageError, match="leaves no case"):
        split_held_out(reqs[:2], None, 5)


def test_every_help_screen_renders(capsys):
    """`kedit --help`, the first command a newcomer types, and `kedit CMD --help` for every command print their
    help and exit 0 (a stray "%" in a help text once made the top level a traceback)."""
    from kedit_ray.cli import build_parser, main

    for argv in [[], *[[name] for name in build_parser()._subparsers._group_actions[0].choices]]:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0, argv
        assert "usage: kedit" in capsys.readouterr().out, argv


def test_every_option_has_help_and_shows_its_default():
    from kedit_ray.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        text = parser.format_help()
        for action in parser._actions:
            assert action.help, (name, action.option_strings)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") \
                    and action.dest != "help":
                assert "default" in parser._get_formatter()._get_help_string(action), (name, action.dest)
        workers = [a for a in parser._actions if "--workers" in a.option_strings]
        assert not workers or workers[0].default == 1 and "(default: 1)" in " ".join(text.split()), name

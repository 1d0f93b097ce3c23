"""Property-based fuzzing of the request and fact loaders: whatever a JSON, JSON Lines or Parquet file holds, the
result is valid requests or an error naming the file (for a bad record: the file, the record and the field), never
another exception, and `kedit eval` writes nothing under --out for a file it refuses."""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from kedit_ray.datasets import load_known, load_requests
from kedit_ray.requests import EditRequest, InvalidRecord

KEYS = ["case_id", "prompt", "subject", "target_new", "target_true", "ground_truth", "requested_rewrite", "str",
        "paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "rephrase_prompt", "locality_prompt",
        "locality_ground_truth", "src", "alt", "pred", "answers", "rephrase", "loc", "loc_ans", "known_id",
        "attribute", "portability", "New Question", "New Answer", "portability_prompts", "portability_answers"]
TEXT = st.one_of(st.sampled_from(["The {} is in", "{}", "Paris", "Space Needle", "", " ", "{} {}", "x"]),
                 st.text(max_size=12))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(allow_nan=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.sampled_from(KEYS + ["x"]), inner, max_size=4)),
                     max_leaves=8)


def good_record(i: int) -> dict:
    return {"case_id": i, "requested_rewrite": {"prompt": "The {} is in", "subject": "Space Needle",
                                                "target_new": {"str": "Goa"}, "target_true": {"str": "Seattle"}},
            "paraphrase_prompts": ["Where is the Space Needle?"], "neighborhood_prompts": ["Paris is in"]}


def good_zsre() -> dict:
    return {"subject": "Space Needle", "src": "Where is the Space Needle?", "alt": "Goa",
            "portability": {"New Question": "What is the capital of Goa's country?", "New Answer": "New Delhi"}}


RECORD = st.one_of(
    st.builds(good_record, st.integers(0, 5)),
    st.builds(good_zsre),
    st.builds(lambda v: {**good_zsre(), "portability": v}, VALUE),
    st.builds(lambda k, v: {**good_zsre(), "portability": {**good_zsre()["portability"], k: v}},
              st.sampled_from(["New Question", "New Answer", "x"]), VALUE),
    st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=9),
    st.builds(lambda i, k, v: {**good_record(i), k: v}, st.integers(0, 3), st.sampled_from(KEYS), VALUE),
    st.builds(lambda i, k, v: {**good_record(i), "requested_rewrite": {**good_record(i)["requested_rewrite"], k: v}},
              st.integers(0, 3), st.sampled_from(["prompt", "subject", "target_new", "target_true"]), VALUE),
    VALUE)


@st.composite
def files(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a request file, sometimes cut or with a byte changed."""
    records = draw(st.lists(RECORD, max_size=5))
    kind = draw(st.sampled_from(["array", "jsonl", "pretty", "parquet"]))
    if kind == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        dicts = [r for r in records if isinstance(r, dict)]
        sink = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(dicts), sink)
        except (pa.ArrowException, TypeError, OverflowError):   # records Parquet cannot hold
            assume(False)
        data, suffix = sink.getvalue(), ".parquet"
    elif kind == "jsonl":
        data, suffix = "".join(json.dumps(r) + "\n" for r in records).encode(), draw(st.sampled_from([".jsonl", ".json"]))
    else:
        data, suffix = json.dumps(records, indent=2 if kind == "pretty" else None).encode(), ".json"
    if data and draw(st.booleans()):
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([draw(st.integers(0, 255))]) + data[cut + 1:]
    return suffix, data


@contextlib.contextmanager
def written(file: tuple[str, bytes], stem: str) -> Iterator[Path]:
    """The drawn file on disk, in a folder of its own (deleted after)."""
    suffix, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}{suffix}"
        path.write_bytes(data)
        yield path


def check_error(e: BaseException, path: Path) -> None:
    """An expected loader error: a ValueError naming the file; a bad record also by its index and field."""
    assert isinstance(e, ValueError), f"{type(e).__name__}: {e}"
    assert str(e).startswith(str(path)), str(e)
    if isinstance(e, InvalidRecord):
        assert e.source == str(path) and isinstance(e.index, int) and e.index >= 0 and e.field
        assert f"record {e.index}: field {e.field!r}" in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files(), st.sampled_from(["auto", "counterfact", "zsre", "user"]), st.booleans())
def test_request_files_give_requests_or_a_named_error(file, dataset, skip_invalid):
    with written(file, "requests") as path:
        try:
            requests, problems = load_requests(path, dataset, skip_invalid=skip_invalid)
        except Exception as e:  # noqa: BLE001 - the property: only named ValueErrors
            check_error(e, path)
            event(f"refused: {type(e).__name__}")
            return
        event("valid requests" if requests else "no requests")
        assert all(isinstance(r, EditRequest) and r.validate() is r for r in requests)
        assert len({r.case_id for r in requests}) == len(requests)
        for p in problems:
            check_error(p, path)


@settings(max_examples=150, deadline=None)
@given(files())
def test_fact_files_give_facts_or_a_named_error(file):
    with written(file, "facts") as path:
        try:
            load_known(path)
        except Exception as e:  # noqa: BLE001
            check_error(e, path)


@settings(max_examples=40, deadline=None)
@given(files())
def test_eval_writes_nothing_for_a_file_it_refuses(file):
    from kedit_ray.cli import main

    with written(file, "requests") as path:
        out = path.parent / "out"
        try:
            load_requests(path)
        except ValueError:
            pass
        else:
            return                      # a valid file: nothing to refuse (and no model to load here)
        with pytest.raises((ValueError, SystemExit)):
            code = main(["eval", "--data", str(path), "--out", str(out), "--model", "no-such-model"])
            assert code != 0
            raise SystemExit(code)
        assert not out.exists()

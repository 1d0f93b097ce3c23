"""Dataset loaders: the real shared files, user JSONL/Parquet round trips, and every validation error."""
from __future__ import annotations

import json

import pytest

from conftest import data_file
from kedit_ray.datasets import KnownFact, load_known, load_requests
from kedit_ray.requests import EditRequest, InvalidRecord

GOOD = {"case_id": 7, "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is",
        "target_new": "English", "target_true": "French",
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of"], "neighborhood_answers": ["French"]}


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def raises(path, index: int, field: str, **kw) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        load_requests(path, **kw)
    e = info.value
    assert (e.source, e.index, e.field) == (str(path), index, field)
    assert str(path) in str(e) and f"record {index}" in str(e) and repr(field) in str(e)
    cls, args = e.__reduce__()                              # how Ray rebuilds it from a worker
    copy = cls(*args)
    assert (type(copy), str(copy), copy.field) == (InvalidRecord, str(e), field)
    return e


# ---------------------------------------------------------------- the shared files

def test_counterfact_flat_first_100():
    path = data_file("counterfact-edit.json")
    requests, problems = load_requests(path, limit=100)
    assert len(requests) == 100 and problems == []
    r = requests[0]
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.paraphrase_prompts == ["Where Danielle Darrieux is from, people speak the language of"]
    assert r.neighborhood_prompts == ["Michel Rocard is a native speaker of"]
    assert r.neighborhood_answers == ["French"]
    assert len({r.case_id for r in requests}) == 100
    assert all(r.prompt.count("{}") == 1 and r.subject in r.text for r in requests)


def test_counterfact_original_sample():
    path = data_file("counterfact_sample.json")
    requests, _ = load_requests(path, dataset="counterfact")
    assert [r.case_id for r in requests] == [0, 1, 2, 3, 4]
    r = requests[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
    assert r.neighborhood_answers == ["French"] * 10


def test_zsre_real_file_skips_the_two_empty_targets():
    path = data_file("zsre_mend_train-1k.json")
    requests, problems = load_requests(path, skip_invalid=True)
    assert len(requests) == 998
    assert [(p.index, p.field) for p in problems] == [(534, "alt"), (723, "alt")]
    r = requests[0]
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        0, "UniFirst", "What is the product made by {}?", "unmanned aircraft", "uniform")
    assert r.paraphrase_prompts == ["What will be the product of UniFirst?"]
    assert r.neighborhood_prompts == ["nq question: john goodman's character in the big lebowski"]
    assert r.neighborhood_answers == ["Walter Sobchak"]
    assert requests[534].case_id == 535          # the case id is the record index, not the position kept
    raises(path, 534, "alt")


def test_zsre_sample_uses_pred_as_true_target():
    requests, _ = load_requests(data_file("zsre_sample.json"), dataset="zsre")
    assert requests[0].target_true == "Trinity College"   # pred, although answers[0] differs
    assert requests[0].prompt == "What university did {} attend?"


def test_known_facts():
    facts = load_known(data_file("known_1000.json"))
    assert len(facts) == 1209
    assert facts[0] == KnownFact(0, "Vinson Massif", "Vinson Massif is located in the continent of", "Antarctica")
    assert load_known(data_file("counterfact_sample.json"), limit=1) == [
        KnownFact(0, "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French")]


def test_known_file_is_not_a_requests_file():
    with pytest.raises(ValueError, match=r"match no supported layout.*counterfact.*zsre.*user"):
        load_requests(data_file("known_1000.json"))


# ---------------------------------------------------------------- user files

def test_user_jsonl_round_trip(tmp_path):
    requests = [EditRequest(**GOOD), EditRequest(8, "Eiffel Tower", "{} is located in", "Rome")]
    path = write_jsonl(tmp_path / "r.jsonl", [r.to_dict() for r in requests])
    assert load_requests(path) == (requests, [])
    assert load_requests(path, dataset="user", limit=1) == (requests[:1], [])


def test_user_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    requests = [EditRequest(**GOOD), EditRequest(8, "Eiffel Tower", "{} is located in", "Rome", "Paris")]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([r.to_dict() for r in requests]), path)
    assert load_requests(path) == (requests, [])


def test_user_filled_in_prompt_and_defaults(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "The Space Needle is in", "subject": "space needle", "target_new": "Goa"},
        {"case_id": None, "prompt": "{} is in", "subject": "Rome", "target_new": "Paris", "paraphrase_prompts": None},
    ])
    a, b = load_requests(path)[0]
    assert (a.case_id, a.subject, a.prompt, a.target_true, a.paraphrase_prompts) == (
        0, "Space Needle", "The {} is in", "", [])      # matched case-insensitively, the text's spelling kept
    assert (b.case_id, b.paraphrase_prompts, b.neighborhood_answers) == (1, [], [])


def test_unsupported_suffix_and_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_requests(tmp_path / "r.csv")
    with pytest.raises(ValueError, match="unknown dataset 'cf'"):
        load_requests(tmp_path / "r.jsonl", dataset="cf")


def test_unrecognised_layout_lists_the_layouts(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(ValueError, match=r"record 0 has keys \['answer', 'question'\].*counterfact \(requested"):
        load_requests(path, skip_invalid=True)
    with pytest.raises(ValueError, match="zsre \\(subject, src, alt\\)$"):
        load_requests(path, dataset="zsre")


# ---------------------------------------------------------------- validation errors

@pytest.mark.parametrize("change, field, reason", [
    ({"prompt": "The mother tongue of Michel Rocard is", "subject": "Danielle Darrieux"}, "subject", "is not in"),
    ({"prompt": "The mother tongue of {} {} is"}, "prompt", "found 2"),
    ({"target_new": "  "}, "target_new", "empty string"),
    ({"target_new": 42}, "target_new", "expected a string, got int 42"),
    ({"target_new": "French"}, "target_new", "equals the true one"),
    ({"subject": ""}, "subject", "empty string"),
    ({"case_id": "7"}, "case_id", "expected an integer"),
    ({"neighborhood_answers": []}, "neighborhood_answers", "0 answers for 1"),
    ({"paraphrase_prompts": "Danielle Darrieux spoke"}, "paraphrase_prompts", "expected a list of strings, got str"),
    ({"paraphrase_prompts": ["ok", ""]}, "paraphrase_prompts", "item 1: expected a non-empty string"),
])
def test_user_record_errors(tmp_path, change, field, reason):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, {**GOOD, "case_id": 8, **change}])
    assert reason in str(raises(path, 1, field))


def test_template_without_braces_is_rejected(tmp_path):
    record = json.loads((data_file("counterfact_sample.json")).read_text())[0]
    record["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    assert "found 0" in str(raises(path, 0, "requested_rewrite.prompt"))


def test_zsre_errors_name_the_files_fields(tmp_path):
    good = {"subject": "UniFirst", "src": "What does unifirst make?", "alt": "drones", "pred": "uniforms",
            "rephrase": "What is made by UniFirst?", "loc": "nq question: who?", "loc_ans": "Walter"}
    path = write_jsonl(tmp_path / "z.jsonl", [good, {**good, "alt": ""}, {**good, "subject": "Acme"},
                                              {k: v for k, v in good.items() if k != "src"}, {**good, "loc_ans": None}])
    requests, problems = load_requests(path, skip_invalid=True)
    assert requests[0].subject == "unifirst" and requests[0].prompt == "What does {} make?"
    assert [(p.index, p.field) for p in problems] == [(1, "alt"), (2, "subject"), (3, "src"), (4, "loc_ans")]
    assert "missing required key" in str(problems[2])


ZSRE_GOOD = {"subject": "Shakira", "src": "What was Shakira's gender?", "alt": "male", "pred": "female",
             "rephrase": "Was Shakira male or female?", "loc": "nq question: who?", "loc_ans": "Walter",
             "portability": {"Recalled Relation": "(Shakira, known for, Hips Don't Lie)",
                             "New Question": "What is a famous song by the male artist Shakira?",
                             "New Answer": "Hips Don't Lie"}}


def test_zsre_portability_block(tmp_path):
    plain = {k: v for k, v in ZSRE_GOOD.items() if k != "portability"}
    path = write_jsonl(tmp_path / "p.jsonl", [ZSRE_GOOD, plain, {**plain, "portability": None}])
    with_block, without, null = load_requests(path, dataset="zsre")[0]
    assert with_block.portability_prompts == ["What is a famous song by the male artist Shakira?"]
    assert with_block.portability_answers == ["Hips Don't Lie"]
    assert without.portability_prompts == without.portability_answers == null.portability_prompts == []
    real, problems = load_requests(data_file("zsre_portability.json"), dataset="zsre")
    assert len(real) == 517 and problems == [] and all(len(r.portability_answers) == 1 for r in real)


@pytest.mark.parametrize("block, field, reason", [
    (["What?", "Hips"], "portability", "expected an object with 'New Question' and 'New Answer', got list"),
    ("Hips Don't Lie", "portability", "got str"),
    ({"New Answer": "Hips Don't Lie"}, "portability.New Question", "missing required key"),
    ({"New Question": "What song?", "New Answer": None}, "portability.New Answer", "null"),
    ({"New Question": "What song?", "New Answer": 42}, "portability.New Answer", "expected a non-empty string, got 42"),
    ({"New Question": "What song?", "New Answer": " "}, "portability.New Answer", "expected a non-empty string"),
    ({"New Question": "", "New Answer": "Hips"}, "portability.New Question", "expected a non-empty string, got ''"),
])
def test_zsre_malformed_portability_names_the_field(tmp_path, block, field, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [ZSRE_GOOD, {**ZSRE_GOOD, "portability": block}, ZSRE_GOOD])
    assert reason in str(raises(path, 1, field, dataset="zsre"))
    requests, problems = load_requests(path, dataset="zsre", skip_invalid=True)
    assert [r.case_id for r in requests] == [0, 2] and [(p.index, p.field) for p in problems] == [(1, field)]


def test_user_portability_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    requests = [EditRequest(**GOOD, portability_prompts=["Danielle Darrieux's language is spoken in"],
                            portability_answers=["England"]), EditRequest(8, "Eiffel Tower", "{} is in", "Rome")]
    path = write_jsonl(tmp_path / "r.jsonl", [r.to_dict() for r in requests])
    assert load_requests(path) == (requests, [])
    pq.write_table(pa.Table.from_pylist([r.to_dict() for r in requests]), tmp_path / "r.parquet")
    assert load_requests(tmp_path / "r.parquet") == (requests, [])
    bad = write_jsonl(tmp_path / "b.jsonl", [{**requests[0].to_dict(), "portability_answers": []}])
    assert "0 answers for 1 portability prompts" in str(raises(bad, 0, "portability_answers"))


def test_flat_counterfact_missing_key(tmp_path):
    good = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, {k: v for k, v in good.items() if k != "ground_truth"} | {"case_id": 1}]))
    assert "missing required key" in str(raises(path, 1, "ground_truth"))


def test_malformed_json_line_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, '{"subject": "x",', "", '["not", "an", "object"]',
                                              {**GOOD, "case_id": 9}])
    assert "line 2" in str(raises(path, 1, "(json)"))
    requests, problems = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == [7, 9]
    assert [(p.index, p.field) for p in problems] == [(1, "(json)"), (2, "(record)")]
    assert "got list" in str(problems[1])


def test_malformed_json_array_stops_the_read(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([GOOD, GOOD])[:-30] + ", }]")
    assert "cannot be read" in str(raises(path, 1, "(json)", skip_invalid=True))
    path.write_text("[" + json.dumps(GOOD) + " 3]")
    raises(path, 1, "(json)")


def test_non_object_json_array_element(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([GOOD, 3]))
    raises(path, 1, "(record)")


def test_duplicate_case_ids(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD])
    assert "also record 0" in str(raises(path, 1, "case_id"))


def test_skip_invalid_keeps_good_records_and_limit_counts_valid_ones(tmp_path):
    records = [GOOD, {**GOOD, "case_id": 8, "target_new": ""}, {**GOOD, "case_id": 9, "prompt": "x"},
               {**GOOD, "case_id": 10}, {**GOOD, "case_id": 11}]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    requests, problems = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == [7, 10, 11]
    assert [(p.index, p.field) for p in problems] == [(1, "target_new"), (2, "subject")]
    requests, problems = load_requests(path, skip_invalid=True, limit=2)
    assert [r.case_id for r in requests] == [7, 10] and len(problems) == 2
    assert load_requests(path, limit=0) == ([], [])


def test_dataset_of_resolves_auto_by_the_first_object_record(tmp_path):
    """--dataset auto is scored as the layout load_requests reads: a zsRE file as zsRE, not as CounterFact."""
    from kedit_ray.datasets.load import dataset_of

    zsre = {"subject": "Space Needle", "src": "Where is the Space Needle?", "alt": "Rome", "pred": "Seattle",
            "rephrase": "Where is the Space Needle located?", "loc": "nq question: who wrote hamlet",
            "loc_ans": "Shakespeare"}
    flat = {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome", "ground_truth": "Paris"}
    cases = [([zsre], "zsre"), (['{"broken', zsre], "zsre"), ([flat], "counterfact"), ([GOOD], "user")]
    for i, (records, want) in enumerate(cases):
        path = write_jsonl(tmp_path / f"{i}.jsonl", records)
        assert dataset_of(path) == want
        assert dataset_of(path, "counterfact") == "counterfact"   # an explicit --dataset stands

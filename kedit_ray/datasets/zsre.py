"""zsRE (as prepared for MEND/ROME): a question about the subject, its rephrase, and an unrelated NQ question; in
the portability file (EasyEdit's) also a one-hop question whose answer follows from the edited fact."""
from __future__ import annotations

from ..requests import EditRequest, InvalidRecord
from .records import Layout, need, optional, single


def portability(record: dict, source: str, index: int) -> tuple[list, list]:
    """([New Question], [New Answer]) of the record's `portability` block; ([], []) when it has none."""
    block = record.get("portability")
    if block is None:
        return [], []
    if not isinstance(block, dict):
        raise InvalidRecord(source, index, "portability", "expected an object with 'New Question' and 'New Answer', "
                                                          f"got {type(block).__name__} {block!r}")
    return ([need(block, "New Question", source, index, "portability.")],
            [need(block, "New Answer", source, index, "portability.")])


def from_zsre(record: dict, source: str, index: int) -> EditRequest:
    """prompt = src with the subject as {}; o* = alt; o = pred (else answers[0]); neighbour = loc -> loc_ans;
    portability = portability.New Question -> New Answer. The case id is the record's index in the file."""
    answers = optional(record, "answers", [])
    target_true = record.get("pred") or (answers[0] if isinstance(answers, list) and answers else "")
    questions, new_answers = portability(record, source, index)
    return EditRequest.from_text(
        index, need(record, "src", source, index), need(record, "subject", source, index),
        need(record, "alt", source, index), source, index,
        target_true=target_true,
        paraphrase_prompts=single(record, "rephrase"),
        neighborhood_prompts=single(record, "loc"),
        neighborhood_answers=single(record, "loc_ans"),
        portability_prompts=questions,
        portability_answers=new_answers,
    ).validate(source, index)


ZSRE = Layout("zsre", ("subject", "src", "alt"), from_zsre, {
    "prompt": "src", "target_new": "alt", "target_true": "pred", "paraphrase_prompts": "rephrase",
    "neighborhood_prompts": "loc", "neighborhood_answers": "loc_ans",
    "portability_prompts": "portability.New Question", "portability_answers": "portability.New Answer"})

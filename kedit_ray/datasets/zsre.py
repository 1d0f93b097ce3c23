"""zsRE (as prepared for MEND/ROME): a question about the subject, its rephrase, and an unrelated NQ question."""
from __future__ import annotations

from ..requests import EditRequest
from .records import Layout, need, optional, single


def from_zsre(record: dict, source: str, index: int) -> EditRequest:
    """prompt = src with the subject as {}; o* = alt; o = pred (else answers[0]); neighbour = loc -> loc_ans.
    The case id is the record's index in the file."""
    answers = optional(record, "answers", [])
    target_true = record.get("pred") or (answers[0] if isinstance(answers, list) and answers else "")
    return EditRequest.from_text(
        index, need(record, "src", source, index), need(record, "subject", source, index),
        need(record, "alt", source, index), source, index,
        target_true=target_true,
        paraphrase_prompts=single(record, "rephrase"),
        neighborhood_prompts=single(record, "loc"),
        neighborhood_answers=single(record, "loc_ans"),
    ).validate(source, index)


ZSRE = Layout("zsre", ("subject", "src", "alt"), from_zsre, {
    "prompt": "src", "target_new": "alt", "target_true": "pred", "paraphrase_prompts": "rephrase",
    "neighborhood_prompts": "loc", "neighborhood_answers": "loc_ans"})

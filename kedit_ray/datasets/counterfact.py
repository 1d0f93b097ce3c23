"""CounterFact in its two layouts: the original (ROME) one and the flat one (EasyEdit)."""
from __future__ import annotations

from ..requests import EditRequest, InvalidRecord
from .records import Layout, need, optional, single


def _target(rewrite: dict, key: str, source: str, index: int) -> str:
    value = need(rewrite, key, source, index, "requested_rewrite.")
    if not isinstance(value, dict):
        raise InvalidRecord(source, index, f"requested_rewrite.{key}", f"expected an object with 'str', got {value!r}")
    return need(value, "str", source, index, f"requested_rewrite.{key}.")


def from_original(record: dict, source: str, index: int) -> EditRequest:
    """`requested_rewrite` {prompt with "{}", subject, target_new.str, target_true.str}; the neighbours'
    answers are all target_true (they share the relation and the true object)."""
    rewrite = need(record, "requested_rewrite", source, index)
    if not isinstance(rewrite, dict):
        raise InvalidRecord(source, index, "requested_rewrite", f"expected an object, got {type(rewrite).__name__}")
    target_true = _target(rewrite, "target_true", source, index)
    neighbours = optional(record, "neighborhood_prompts", [])
    return EditRequest(
        case_id=optional(record, "case_id", index),
        subject=need(rewrite, "subject", source, index, "requested_rewrite."),
        prompt=need(rewrite, "prompt", source, index, "requested_rewrite."),
        target_new=_target(rewrite, "target_new", source, index),
        target_true=target_true,
        paraphrase_prompts=optional(record, "paraphrase_prompts", []),
        neighborhood_prompts=neighbours,
        neighborhood_answers=[target_true] * len(neighbours) if isinstance(neighbours, list) else [],
    ).validate(source, index)


def from_flat(record: dict, source: str, index: int) -> EditRequest:
    """`prompt` (subject filled in), `subject`, `target_new`, `ground_truth`, one rephrase and one locality prompt."""
    return EditRequest.from_text(
        optional(record, "case_id", index), need(record, "prompt", source, index),
        need(record, "subject", source, index), need(record, "target_new", source, index), source, index,
        target_true=need(record, "ground_truth", source, index),
        paraphrase_prompts=single(record, "rephrase_prompt"),
        neighborhood_prompts=single(record, "locality_prompt"),
        neighborhood_answers=single(record, "locality_ground_truth"),
    ).validate(source, index)


ORIGINAL = Layout("counterfact", ("requested_rewrite",), from_original, {
    "subject": "requested_rewrite.subject", "prompt": "requested_rewrite.prompt",
    "target_new": "requested_rewrite.target_new.str", "target_true": "requested_rewrite.target_true.str",
    "neighborhood_answers": "requested_rewrite.target_true.str"})
FLAT = Layout("counterfact-flat", ("prompt", "subject", "target_new", "ground_truth"), from_flat, {
    "target_true": "ground_truth", "paraphrase_prompts": "rephrase_prompt",
    "neighborhood_prompts": "locality_prompt", "neighborhood_answers": "locality_ground_truth"})

"""User request files (JSONL or Parquet) with EditRequest's own field names."""
from __future__ import annotations

from ..requests import EditRequest
from .records import Layout, need, optional


def from_user(record: dict, source: str, index: int) -> EditRequest:
    """`prompt` is a template with one {} or, without {}, a prompt holding the subject. Optional fields
    default (case_id: the record's index; target_true: unknown; prompt lists: empty)."""
    prompt = need(record, "prompt", source, index)
    subject = need(record, "subject", source, index)
    target_new = need(record, "target_new", source, index)
    case_id = optional(record, "case_id", index)
    kw = {key: optional(record, key, []) for key in ("paraphrase_prompts", "neighborhood_prompts",
                                                     "neighborhood_answers", "portability_prompts",
                                                     "portability_answers")}
    kw["target_true"] = optional(record, "target_true", "")
    if isinstance(prompt, str) and "{}" not in prompt:
        return EditRequest.from_text(case_id, prompt, subject, target_new, source, index, **kw).validate(source, index)
    return EditRequest(case_id, subject, prompt, target_new, **kw).validate(source, index)


USER = Layout("user", ("prompt", "subject", "target_new"), from_user, {})

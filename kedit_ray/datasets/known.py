"""Known facts for causal tracing: known_1000.json, or any requests file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..requests import EditRequest, InvalidRecord
from .records import Layout, collect, need
from .registry import layouts


@dataclass
class KnownFact:
    """A prompt holding `subject` whose expected continuation is `attribute` ("" when unknown)."""

    id: int
    subject: str
    prompt: str
    attribute: str

    @classmethod
    def from_request(cls, request: EditRequest) -> KnownFact:
        return cls(request.case_id, request.subject, request.text, request.target_true)


def from_known(record: dict, source: str, index: int) -> KnownFact:
    fact = KnownFact(need(record, "known_id", source, index), need(record, "subject", source, index),
                     need(record, "prompt", source, index), need(record, "attribute", source, index))
    if not isinstance(fact.id, int) or isinstance(fact.id, bool):
        raise InvalidRecord(source, index, "known_id", f"expected an integer, got {fact.id!r}")
    for name in ("subject", "prompt", "attribute"):
        value = getattr(fact, name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRecord(source, index, name, f"expected a non-empty string, got {value!r}")
    if fact.subject not in fact.prompt:
        raise InvalidRecord(source, index, "subject", f"subject {fact.subject!r} is not in the prompt {fact.prompt!r}")
    return fact


KNOWN = Layout("known", ("known_id", "subject", "prompt", "attribute"), from_known, {}, id_field="known_id")


def _as_known(layout: Layout) -> Layout:
    def convert(record: dict, source: str, index: int) -> KnownFact:
        return KnownFact.from_request(layout.convert(record, source, index))

    return Layout(layout.name, layout.keys, convert, layout.fields, layout.id_field)


def load_known(path: str | Path, limit: int | None = None) -> list[KnownFact]:
    """Facts from known_1000.json (its filled-in `prompt` and `attribute`) or from any requests file
    (prompt = the request's text, attribute = its target_true). The first bad record raises InvalidRecord."""
    return collect(path, (KNOWN, *map(_as_known, layouts())), limit)[0]

"""EditRequest, the one edit every editor takes, and its validation."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field


class InvalidRecord(ValueError):
    """A record that cannot become an EditRequest; names the file, the record index and the field."""

    def __init__(self, source: str, index: int, field_name: str, reason: str):
        self.source, self.index, self.field, self.reason = source, index, field_name, reason
        super().__init__(f"{source}: record {index}: field {field_name!r}: {reason}")

    def __reduce__(self):   # rebuilt from its four fields when it crosses processes (Ray workers)
        return type(self), (self.source, self.index, self.field, self.reason)


@dataclass
class EditRequest:
    """⟨s, r, o⟩ → ⟨s, r, o*⟩. `prompt` is a template with one `{}` where the subject goes."""

    case_id: int
    subject: str
    prompt: str
    target_new: str                     # o*
    target_true: str = ""               # o (may be unknown, e.g. for user requests)
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    portability_prompts: list[str] = field(default_factory=list)   # one-hop questions whose answer follows from o*
    portability_answers: list[str] = field(default_factory=list)   # their answers (zsRE's portability block)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, source: str = "<request>", index: int = 0) -> EditRequest:
        def bad(field_name: str, reason: str):
            raise InvalidRecord(source, index, field_name, reason)

        if not isinstance(self.case_id, int) or isinstance(self.case_id, bool):
            bad("case_id", f"expected an integer, got {self.case_id!r}")
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                bad(name, f"expected a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                bad(name, "empty string")
        if self.prompt.count("{}") != 1:
            bad("prompt", f"the template must hold exactly one '{{}}' for the subject, found {self.prompt.count('{}')}: "
                          f"{self.prompt!r}")
        if not isinstance(self.target_true, str):
            bad("target_true", f"expected a string, got {type(self.target_true).__name__} {self.target_true!r}")
        if self.target_true.strip() == self.target_new.strip():
            bad("target_new", f"the new target equals the true one ({self.target_new!r})")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "portability_prompts",
                     "portability_answers"):
            value = getattr(self, name)
            if not isinstance(value, list):
                bad(name, f"expected a list of strings, got {type(value).__name__} {value!r}")
            for i, x in enumerate(value):
                if not isinstance(x, str) or not x.strip():
                    bad(name, f"item {i}: expected a non-empty string, got {x!r}")
        for kind, what in (("neighborhood", "neighbourhood"), ("portability", "portability")):
            prompts, answers = getattr(self, f"{kind}_prompts"), getattr(self, f"{kind}_answers")
            if len(answers) != len(prompts):
                bad(f"{kind}_answers", f"{len(answers)} answers for {len(prompts)} {what} prompts")
        return self

    @classmethod
    def from_text(cls, case_id: int, text: str, subject: str, target_new: str, source: str = "<request>",
                  index: int = 0, **kw) -> EditRequest:
        """Build from a prompt with the subject already filled in (the flat layouts). The subject is
        matched exactly, else case-insensitively; the request keeps the prompt's own spelling of it."""
        if not isinstance(subject, str) or not subject.strip():
            raise InvalidRecord(source, index, "subject", f"empty subject: {subject!r}")
        if not isinstance(text, str):
            raise InvalidRecord(source, index, "prompt", f"expected a string, got {type(text).__name__}")
        if "{}" in text:
            raise InvalidRecord(source, index, "prompt", f"a filled-in prompt must not hold '{{}}': {text!r}")
        pattern = re.escape(subject)
        found = re.search(pattern, text) or re.search(pattern, text, re.IGNORECASE)
        if not found:
            raise InvalidRecord(source, index, "subject", f"subject {subject!r} is not in the prompt {text!r}")
        return cls(case_id, found.group(0), text[:found.start()] + "{}" + text[found.end():], target_new, **kw)

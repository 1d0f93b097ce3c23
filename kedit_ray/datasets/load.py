"""load_requests: one entry point for every request layout."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..requests import EditRequest, InvalidRecord
from .records import collect, detect, iter_records
from .registry import DATASETS, layouts, lookup


def load_requests(path: str | Path, dataset: str = "auto", limit: int | None = None, skip_invalid: bool = False,
                  check: Callable[[EditRequest], None] | None = None) -> tuple[list[EditRequest], list[InvalidRecord]]:
    """Validated EditRequests from a file (JSON, JSONL, Parquet) of a registered dataset (registry.DATASETS).

    The layout comes from the keys of the first record, among `dataset`'s layouts (for "auto": every dataset's). `limit` keeps the first N valid records.
    Without `skip_invalid` the first bad record raises InvalidRecord (file, record index, field);
    with it, every skipped record is returned in the problems list. `check` may refuse a request (see
    `fits_context`).
    """
    return collect(path, layouts() if dataset == "auto" else lookup(dataset).layouts, limit, skip_invalid, check)


def dataset_of(path: str | Path, dataset: str = "auto") -> str:
    """`dataset`, or for "auto" the dataset whose layout the file's first record has (the one `load_requests`
    reads it with): so a zsRE file is scored as zsRE without --dataset zsre."""
    if dataset != "auto":
        return lookup(dataset).name
    for index, record in iter_records(path):
        if isinstance(record, dict):
            layout = detect(record, layouts(), str(path), index)
            return next(name for name, known in DATASETS.items() if layout in known.layouts)
    return "counterfact"


def fits_context(tok, context: int) -> Callable[[EditRequest], None]:
    """A check that refuses a request whose prompts (each with the answer scored after it) are longer than
    `context` tokens. Only texts with as many bytes as that are tokenised: a token covers at least one byte."""
    def check(req: EditRequest) -> None:
        scored = [("prompt", req.text, req.target_new)]
        scored += [("paraphrase_prompts", p, req.target_new) for p in req.paraphrase_prompts]
        scored += [("neighborhood_prompts", p, req.target_new) for p in req.neighborhood_prompts]
        scored += [("portability_prompts", p, a) for p, a in zip(req.portability_prompts, req.portability_answers)]
        for name, p, target in scored:
            if len(p.encode()) + len(target.encode()) + 4 <= context:
                continue
            n = len(tok(p).input_ids) + len(tok(" " + target, add_special_tokens=False).input_ids)
            if n > context:
                raise InvalidRecord("", 0, name, f"{n:,} tokens with the target, more than the model's context "
                                                 f"of {context:,}")
    return check

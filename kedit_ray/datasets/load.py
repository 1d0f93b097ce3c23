"""load_requests: one entry point for every request layout."""
from __future__ import annotations

from pathlib import Path

from ..requests import EditRequest, InvalidRecord
from .counterfact import FLAT, ORIGINAL
from .records import Layout, collect
from .user import USER
from .zsre import ZSRE

DATASETS: dict[str, tuple[Layout, ...]] = {"counterfact": (ORIGINAL, FLAT), "zsre": (ZSRE,), "user": (USER,)}
REQUEST_LAYOUTS: tuple[Layout, ...] = (ORIGINAL, FLAT, ZSRE, USER)   # order matters: flat CounterFact ⊃ user keys


def load_requests(path: str | Path, dataset: str = "auto", limit: int | None = None,
                  skip_invalid: bool = False) -> tuple[list[EditRequest], list[InvalidRecord]]:
    """Validated EditRequests from a CounterFact (either layout), zsRE or user file (JSON, JSONL, Parquet).

    The layout comes from the keys of the first record. `limit` keeps the first N valid records.
    Without `skip_invalid` the first bad record raises InvalidRecord (file, record index, field);
    with it, every skipped record is returned in the problems list.
    """
    if dataset != "auto" and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of: auto, {', '.join(DATASETS)}")
    layouts = REQUEST_LAYOUTS if dataset == "auto" else DATASETS[dataset]
    return collect(path, layouts, limit, skip_invalid)

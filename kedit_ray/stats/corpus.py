"""Text corpora for layer statistics: documents in file order, a content fingerprint, shards.

SOURCE is a file or a directory of files (read in sorted order of their relative paths):
- raw text (`.txt`, `.raw`, any other suffix when named directly): a document is a run of non-blank
  lines; a WikiText heading line (` = Title = `, ` = = Section = = `) also starts a new document;
  each document is stripped of surrounding whitespace;
- JSONL (`.jsonl`): one object per non-blank line, its `text` field is the document;
- Parquet (`.parquet`): the `text` column, one document per row.
Raw text and JSONL may be gzip-compressed (`.txt.gz`, `.raw.gz`, `.jsonl.gz`).
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet")
# the default statistics corpus, shipped with the package (WikiText-2's test split; licence in its README)
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-test.raw.gz"


def kind(path: Path) -> str:
    """The format's suffix, looking through a `.gz`: "a.jsonl.gz" → ".jsonl"."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
HEADING = re.compile(r"\s*(= )+.*( =)+\s*")


class CorpusError(ValueError):
    pass


def corpus_files(source: str | Path) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and kind(p) in SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise CorpusError(f"corpus directory {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    raise CorpusError(f"corpus {str(source)!r} is not a file or directory "
                      "(hub dataset names need network access and are not supported; download the text first)")


def _raw_documents(path: Path) -> Iterator[str]:
    lines: list[str] = []
    try:
        with _open_text(path) as f:
            for line in f:
                blank, heading = not line.strip(), HEADING.fullmatch(line) is not None
                if (blank or heading) and lines:
                    yield "\n".join(lines).strip()
                    lines = []
                if not blank:
                    lines.append(line.rstrip("\n"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None
    if lines:
        yield "\n".join(lines).strip()


def _jsonl_documents(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: invalid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{n}: field 'text' is missing or not a string")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if "text" not in f.schema_arrow.names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
    row = 0
    for batch in f.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise CorpusError(f"{path}: row {row}: column 'text' is {text!r}, not a string")
            row += 1
            yield text


def documents(source: str | Path) -> Iterator[str]:
    """Every document of the corpus, in file order."""
    for path in corpus_files(source):
        read = {".jsonl": _jsonl_documents, ".parquet": _parquet_documents}.get(kind(path), _raw_documents)
        yield from read(path)


def count(source: str | Path, samples: int) -> int:
    """How many documents the first `samples` are: `samples`, or fewer when the corpus is smaller."""
    return sum(1 for _ in itertools.islice(documents(source), samples))


def shards(source: str | Path, samples: int, shard_docs: int) -> Iterator[tuple[int, list[str]]]:
    """The first `samples` documents as (shard id, documents) with shard i = documents [i·S, (i+1)·S)."""
    shard, index = [], 0
    for doc in itertools.islice(documents(source), samples):
        shard.append(doc)
        if len(shard) == shard_docs:
            yield index, shard
            shard, index = [], index + 1
    if shard:
        yield index, shard


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(source: str | Path) -> str:
    """sha256 over the corpus bytes (and a directory's relative file names); memoised per process by size and mtime."""
    root = Path(source).expanduser().resolve()
    files = corpus_files(root)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            if root.is_dir():
                h.update(p.relative_to(root).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            h.update(b"\0")
        _FINGERPRINTS[stamp] = h.hexdigest()
    return _FINGERPRINTS[stamp]


def slug(source: str | Path) -> str:
    """A short readable name for the corpus: its file stem or directory name."""
    path = Path(source).expanduser().resolve()
    name = Path(path.name.removesuffix(".gz")).stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "corpus"

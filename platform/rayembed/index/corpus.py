"""Corpora to index: JSONL, Parquet, BEIR ``corpus.jsonl`` and SMART (Cranfield), with a column mapping.

Every reader yields raw records; :func:`normalize` maps them onto the id-map columns
``doc_id, text, title, metadata`` and drops empty documents (they are counted, not indexed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ColumnMapping:
    """Which raw columns hold the id, text, title and metadata of a document."""

    id_field: str | None = None
    text_field: str = "text"
    title_field: str | None = "title"
    metadata_fields: list[str] = field(default_factory=list)
    include_title: bool = True

    @classmethod
    def from_config(cls, index_cfg: Any) -> ColumnMapping:
        return cls(
            id_field=index_cfg.id_field,
            text_field=index_cfg.text_field,
            title_field=index_cfg.title_field,
            metadata_fields=list(index_cfg.metadata_fields),
            include_title=index_cfg.include_title,
        )


def encode_text(text: str, title: str | None, include_title: bool) -> str:
    """What the encoder sees for a document: 'title text' (BEIR convention) or the text alone.

    Runs of whitespace become one space, and a body that already opens with its title (Cranfield's
    .W field repeats .T) does not get it twice. Evaluation formats documents with this same
    function, so an index built here can stand in for evaluation's own encoding of the corpus.
    """
    text = " ".join((text or "").split())
    title = " ".join((title or "").split()) if include_title else ""
    if not title or text.startswith(title):
        return text
    return f"{title} {text}".rstrip()


def normalize(rows: Iterable[dict[str, Any]], mapping: ColumnMapping, *, start_row: int = 0,
              stats: dict[str, int] | None = None, source: str = "corpus") -> Iterator[dict[str, Any]]:
    """Map raw records onto ``doc_id, text, title, metadata``; skip (and count) empty texts."""
    stats = stats if stats is not None else {}
    stats.setdefault("read", 0)
    stats.setdefault("empty", 0)
    for i, row in enumerate(rows, start_row):
        stats["read"] += 1
        if not isinstance(row, dict):
            raise ValueError(f"{source}: record {i} is a {type(row).__name__}, not an object.")
        if mapping.text_field not in row and not (mapping.title_field and row.get(mapping.title_field)):
            raise ValueError(
                f"{source}: record {i} has no '{mapping.text_field}' column (it has {sorted(row)[:8]}). "
                "Set index.text_field to the column holding the text."
            )
        text = row.get(mapping.text_field)
        text = "" if text is None else str(text)
        title = row.get(mapping.title_field) if mapping.title_field else None
        title = "" if title is None else str(title)
        if not text.strip() and not (mapping.include_title and title.strip()):
            stats["empty"] += 1
            continue
        if mapping.id_field:
            if mapping.id_field not in row:
                raise ValueError(
                    f"{source}: record {i} has no id column '{mapping.id_field}'. Fix index.id_field "
                    "or leave it empty to use '_id', 'id' or the row number."
                )
            doc_id = row[mapping.id_field]
        else:
            doc_id = row.get("_id", row.get("id", i))
        meta = {k: row.get(k) for k in mapping.metadata_fields if k in row}
        yield {
            "doc_id": str(doc_id),
            "text": text,
            "title": title,
            "metadata": json.dumps(meta, ensure_ascii=False, default=str) if meta else None,
        }


def resolve_corpus(corpus: str | os.PathLike, fmt: str = "auto", data_dir: str | os.PathLike | None = None
                   ) -> tuple[Path, str]:
    """The corpus file and its format. Relative paths resolve against ``data_dir``, then the cwd."""
    p = Path(corpus)
    if not p.is_absolute():
        candidates = []
        if data_dir is not None:
            candidates.append(Path(data_dir) / p)
        else:
            try:
                from rayembed.runtime import resolve_data_dir

                candidates.append(resolve_data_dir() / p)
            except FileNotFoundError:
                pass
        candidates.append(Path.cwd() / p)
        p = next((c for c in candidates if c.exists()), candidates[-1])
    if not p.exists():
        raise FileNotFoundError(
            f"Corpus '{corpus}' not found (looked for {p}). Set index.corpus to an existing file or a "
            "BEIR folder, relative to data_dir or absolute."
        )
    if p.is_dir():
        if (p / "corpus.jsonl").is_file():
            return (p / "corpus.jsonl").resolve(), "beir" if fmt == "auto" else fmt
        if (p / "cran.all.1400").is_file():
            return (p / "cran.all.1400").resolve(), "smart"
        raise FileNotFoundError(f"Corpus folder {p} holds neither corpus.jsonl (BEIR) nor cran.all.1400 (SMART).")
    if fmt == "auto":
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            fmt = "beir" if p.name == "corpus.jsonl" else "jsonl"
        elif suffix == ".parquet":
            fmt = "parquet"
        elif p.name.startswith("cran.all") or suffix in (".all", ".smart"):
            fmt = "smart"
        else:
            raise ValueError(f"Cannot tell the format of corpus {p}; set index.format (jsonl, parquet, beir, smart).")
    return p.resolve(), fmt


def read_smart(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Documents of a SMART collection (Cranfield ``cran.all.1400``): ``.I`` id, ``.T`` title, ``.W`` text.

    Uses ``rayembed.data.formats`` where it provides a SMART document reader, else parses here.
    """
    try:
        from rayembed.data import formats  # type: ignore[attr-defined]

        reader = getattr(formats, "read_smart_docs", None) or getattr(formats, "read_smart_documents", None)
    except ImportError:
        reader = None
    if reader is not None:
        return [dict(r) for r in reader(path)]
    docs: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    fld = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(".I"):
                if cur is not None:
                    docs.append(cur)
                cur = {"_id": line[2:].strip(), "title": "", "text": "", "author": "", "bib": ""}
                fld = None
                continue
            tag = line[:2]
            if line.startswith(".") and tag in (".T", ".A", ".B", ".W"):
                fld = {".T": "title", ".A": "author", ".B": "bib", ".W": "text"}[tag]
                continue
            if cur is not None and fld is not None:
                cur[fld] = (cur[fld] + " " + line.strip()).strip()
    if cur is not None:
        docs.append(cur)
    if not docs:
        raise ValueError(f"{path} holds no '.I' records; is it a SMART collection?")
    return docs


def jsonl_records(lines: Iterable[str], where: str) -> Iterator[dict[str, Any]]:
    """Records of JSON lines (blank lines skipped); a bad line is an error naming ``where:line``."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno} is not valid JSON ({e.msg}); fix or remove that line.") from e


def iter_records(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """Raw records of a corpus file, read in this process (no Ray)."""
    if fmt in ("jsonl", "beir"):
        with open(path, encoding="utf-8") as f:
            yield from jsonl_records(f, str(path))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=8192):
            yield from batch.to_pylist()
    elif fmt == "smart":
        yield from read_smart(path)
    else:
        raise ValueError(f"Unknown corpus format {fmt!r}; use jsonl, parquet, beir or smart.")


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a corpus file for resuming a build: path, size and modification time."""
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

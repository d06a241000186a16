"""Turn one configured source (``data.sources[]``) into unified-schema rows.

Registered public sets go through :mod:`rayembed.data.registry`; the local formats through
:mod:`rayembed.data.formats`. Every row is validated: a bad one is counted with its reason and
skipped (:class:`~rayembed.data.formats.BadRows`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayembed.config.data import SourceConfig
from rayembed.data import formats
from rayembed.data.formats import BadRows
from rayembed.data.schema import COLUMNS, make_row, validate_row

logger = logging.getLogger(__name__)

STS_INSTRUCTION = "Retrieve semantically similar text"


def resolve_path(src: SourceConfig, data_dir: Path | None) -> Path | None:
    if src.path is None:
        return data_dir / src.name if data_dir is not None else None
    p = Path(src.path).expanduser()
    if not p.is_absolute() and not p.exists() and data_dir is not None:
        p = data_dir / p
    return p


def _corpus_docs(path: Path) -> Iterator[dict[str, Any]]:
    """Documents of a BEIR folder, a SMART folder or a JSONL/Parquet file of {id, title, text}."""
    if path.is_dir() and (path / "corpus.jsonl").exists():
        for r in formats.read_jsonl(path / "corpus.jsonl"):
            yield {"id": r.get("_id"), "title": r.get("title") or "", "text": r.get("text") or ""}
    elif path.is_dir():
        corpus, _, _ = formats.load_smart_collection(path)
        for k, v in corpus.items():
            yield {"id": k, **v}
    else:
        for i, r in enumerate(formats.iter_records(path)):
            yield {"id": r.get("id", r.get("_id", i)), "title": r.get("title") or "", "text": r.get("text") or ""}


def iter_source(src: SourceConfig, *, data_dir: Path | None, bad: BadRows, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Validated schema rows of one source (before its sampling ratio)."""
    rows = _raw_rows(src, data_dir, bad, seed)
    n = 0
    for i, r in enumerate(rows):
        if src.max_rows is not None and n >= src.max_rows:
            break
        reason = validate_row(r)
        if reason:
            bad.reject(f"{src.name} row {i}", reason)
            continue
        n += 1
        yield {c: r.get(c) for c in COLUMNS}


def _raw_rows(src: SourceConfig, data_dir: Path | None, bad: BadRows, seed: int) -> Iterator[dict[str, Any]]:
    path = resolve_path(src, data_dir)
    if src.format == "registry":
        from rayembed.data import registry

        ds = registry.get(src.name)
        it = ds.load(path, online=src.online, bad=bad, split=src.split)
        for r in it:
            if src.instruction:
                r = {**r, "instruction": src.instruction}
            yield r
        return
    if path is None or not path.exists():
        raise FileNotFoundError(f"data.sources[{src.name}]: path '{path}' does not exist; set its path.")
    meta = dict(task_type=src.task_type, source=src.name, language=src.language, symmetric=src.symmetric)
    if src.format == "schema":
        # Bookkeeping beside the shards (a synth run's _rejects/, _brainstorm/, .tmp files) is
        # not data: skip every path with a part starting with "_" or ".", as pyarrow does.
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix in (".parquet", ".jsonl")
            and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
        ) if path.is_dir() else [path]
        for f in files:
            for r in formats.iter_records(f, None, bad):
                r.setdefault("negatives", [])
                for k, v in meta.items():
                    r.setdefault(k, v)
                if not r.get("id"):
                    r.pop("id", None)
                    r = make_row(**{k: r[k] for k in COLUMNS if k in r and k != "id"})
                yield r
    elif src.format in ("jsonl", "parquet", "tsv", "csv"):
        for r in formats.iter_records(path, src.columns, bad, fmt=src.format):
            negs = r.get("negatives")
            if isinstance(negs, str):
                negs = [negs]
            if r.get("negative") and not negs:
                negs = [r["negative"]]
            yield {**meta, "instruction": r.get("instruction") or src.instruction, "query": r.get("query"),
                   "positive": r.get("positive"), "negatives": negs or [],
                   "id": None} | _id_fill(r, src)
    elif src.format == "beir":
        from rayembed.data.registry import beir_texts

        corpus, queries, qrels = formats.load_beir(path, split=src.split)
        texts = beir_texts(corpus)
        instruction = src.instruction or "Given a web search query, retrieve relevant passages that answer the query"
        for qid, docs in qrels.items():
            for did, grade in docs.items():
                if grade <= 0:
                    continue
                if qid not in queries or did not in texts:
                    bad.skip(f"{src.name} {qid}/{did}", "judged query or document missing")
                    continue
                bad.ok()
                yield make_row(instruction=instruction, query=queries[qid], positive=texts[did], **meta)
    elif src.format == "smart":
        corpus, queries, qrels = formats.load_smart_collection(path)
        instruction = src.instruction or "Given a question, retrieve relevant documents that answer the question"
        for qid, docs in qrels.items():
            for did, grade in docs.items():
                text = corpus.get(did, {}).get("text", "")
                if grade <= 0:
                    continue
                if not text:
                    bad.skip(f"{src.name} {qid}/{did}", "empty document text")
                    continue
                bad.ok()
                yield make_row(instruction=instruction, query=queries[qid], positive=text, **meta)
    elif src.format == "stsb":
        files = sorted(path.glob("*train*")) if path.is_dir() else [path]
        for f in files:
            s1, s2, scores = formats.load_stsb(f, bad)
            for a, b, s in zip(s1, s2, scores):
                if s >= src.min_score:
                    yield make_row(instruction=src.instruction or STS_INSTRUCTION, query=a, positive=b,
                                   **{**meta, "task_type": "sts", "symmetric": True})
    elif src.format == "weak":
        from rayembed.data.weak import weak_pairs

        docs = _corpus_docs(path)
        for r in weak_pairs(docs, source=src.name, mode=src.weak_mode, seed=seed, language=src.language):
            bad.ok()
            yield r


def _id_fill(r: dict[str, Any], src: SourceConfig) -> dict[str, Any]:
    return {"id": r["id"]} if isinstance(r.get("id"), str) and r["id"] and "id" in src.columns else {}

"""The one training-example schema shared by synthetic and public data.

One row per example::

    id           str        stable hash-based id (see make_id)
    instruction  str        one-sentence task definition; becomes the query instruction
    query        str        the query text (without instruction)
    positive     str        a relevant document
    negatives    list[str]  hard negatives (possibly empty)
    task_type    str        short-long, long-short, short-short, long-long, sts, bitext,
                            retrieval, classification, ...
    source       str        dataset name, or 'synth:<model>'
    language     str        ISO-ish language name or code ('en', 'English')
    symmetric    bool       documents get the instruction too (Quora, NLI split 2, STS)
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("query", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negatives", pa.list_(pa.string())),
        pa.field("task_type", pa.string()),
        pa.field("source", pa.string()),
        pa.field("language", pa.string()),
        pa.field("symmetric", pa.bool_()),
    ]
)
COLUMNS = [f.name for f in SCHEMA]
REQUIRED_TEXT = ("instruction", "query", "positive")


def make_id(*parts: str) -> str:
    """A stable 16-hex id from the example's content (dedup and resume key)."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return h[:16]


def make_row(
    *,
    instruction: str,
    query: str,
    positive: str,
    negatives: list[str] | None = None,
    task_type: str,
    source: str,
    language: str = "en",
    symmetric: bool = False,
    id: str | None = None,
) -> dict[str, Any]:
    negatives = list(negatives or [])
    return {
        "id": id or make_id(source, instruction, query, positive, *negatives),
        "instruction": instruction,
        "query": query,
        "positive": positive,
        "negatives": negatives,
        "task_type": task_type,
        "source": source,
        "language": language,
        "symmetric": bool(symmetric),
    }


def validate_row(row: dict[str, Any]) -> str | None:
    """Return the reason a row is unusable, or None when it is fine."""
    for key in REQUIRED_TEXT:
        v = row.get(key)
        if not isinstance(v, str):
            return f"missing or non-string '{key}'"
        if not v.strip():
            return f"empty '{key}'"
    negs = row.get("negatives")
    if negs is not None and (not isinstance(negs, list) or not all(isinstance(n, str) for n in negs)):
        return "'negatives' is not a list of strings"
    return None


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows in the unified schema as an Arrow table (missing optional fields filled)."""
    filled = []
    for r in rows:
        r = dict(r)
        r.setdefault("negatives", [])
        r.setdefault("language", "en")
        r.setdefault("symmetric", False)
        r.setdefault("task_type", "retrieval")
        r.setdefault("source", "custom")
        if not r.get("id"):
            r["id"] = make_id(r["source"], r["instruction"], r["query"], r["positive"], *r["negatives"])
        filled.append({c: r.get(c) for c in COLUMNS})
    return pa.Table.from_pylist(filled, schema=SCHEMA)

"""The dataset registry: public training sets by name, plus datasets a user registers in config.

Each public set is a small module in :mod:`rayembed.data.public` that registers a
:class:`PublicDataset`: its instruction from the paper (Table 14, kept verbatim), its default
sampling ratio, a Hugging Face hub id for users who are online, and an offline reader for its
published file layout. Loaders yield rows in the unified schema (:mod:`rayembed.data.schema`).

Example::

    from rayembed.data import registry
    ds = registry.get("msmarco-passage")
    rows = ds.load(path="/data/msmarco")          # offline: collection.tsv, queries.train.tsv, qrels...
    rows = ds.load(online=True)                   # online: datasets.load_dataset(ds.hub_id)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayembed.data.formats import BadRows
from rayembed.data.schema import make_row

logger = logging.getLogger(__name__)

# The paper's sampling ratio for sets it gives none for.
DEFAULT_RATIO = 1.0

PUBLIC_MODULES = [
    "eli5", "hotpotqa", "fever", "miracl", "msmarco_passage", "msmarco_document", "nq", "nli",
    "squad", "triviaqa", "quora", "mrtydi", "dureader", "t2ranking",
]


@dataclass
class PublicDataset:
    """One public training set.

    ``read_offline(path, bad, **options)`` yields schema rows from local files in the set's
    published layout; ``hub_columns`` maps schema fields to the hub dataset's columns for the
    online path (``query``, ``positive``, optional ``negative``/``negatives``).
    """

    name: str
    instruction: str
    ratio: float
    read_offline: Callable[..., Iterator[dict[str, Any]]]
    layout: str  # one line: which files the offline reader expects
    hub_id: str | None = None
    hub_config: str | None = None
    hub_columns: dict[str, str] = field(default_factory=lambda: {"query": "anchor", "positive": "positive"})
    task_type: str = "retrieval"
    language: str = "en"
    symmetric: bool = False
    # Second-split instruction (NLI, Quora): (instruction, symmetric).
    split2: tuple[str, bool] | None = None

    def load(self, path: str | Path | None = None, *, online: bool = False, bad: BadRows | None = None,
             split: str = "train", **options: Any) -> Iterator[dict[str, Any]]:
        """Rows of this set, from ``path`` (offline) or the hub (``online=True``)."""
        bad = bad if bad is not None else BadRows(self.name)
        if online:
            return self._load_online(split, bad)
        if path is None:
            raise ValueError(
                f"Dataset '{self.name}' needs a local path offline ({self.layout}); set its path in "
                "data.sources, or online: true to fetch it from the hub."
            )
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"Dataset '{self.name}': '{p}' does not exist. Expected {self.layout}.")
        return self.read_offline(p, bad, **options)

    def row(self, query: str, positive: str, negatives: Iterable[str] = (), *, split2: bool = False,
            language: str | None = None) -> dict[str, Any]:
        instruction, symmetric = (self.split2 if split2 and self.split2 else (self.instruction, self.symmetric))
        return make_row(
            instruction=instruction, query=query, positive=positive, negatives=list(negatives),
            task_type=self.task_type, source=self.name, language=language or self.language,
            symmetric=symmetric,
        )

    def _load_online(self, split: str, bad: BadRows) -> Iterator[dict[str, Any]]:
        if not self.hub_id:
            raise ValueError(
                f"Dataset '{self.name}' has no online source in its own layout; download {self.layout} "
                "and give their folder as the source's path (online: false)."
            )
        try:
            import datasets  # optional: only online users need it
        except ImportError as e:
            raise ImportError(
                f"Loading '{self.name}' from the hub needs the `datasets` package: pip install datasets. "
                "Offline, give a local path instead."
            ) from e
        hub = datasets.load_dataset(self.hub_id, self.hub_config, split=split, streaming=True)
        yield from self.read_hub_records(hub, bad)

    def read_hub_records(self, records: Iterable[dict[str, Any]], bad: BadRows) -> Iterator[dict[str, Any]]:
        """Schema rows from the hub dataset's records (what ``load(online=True)`` streams).

        A positive or negative column may hold a string, a list of strings, or a list of
        passages ``{docid, title, text}`` (Tevatron's layout: MIRACL, Mr. TyDi, DuReader);
        passages become ``title\ntext``.
        """
        cols = self.hub_columns
        where = self.hub_id or self.name
        language = _lang_from_config(self.hub_config) if self.language == "multi" else None
        for i, rec in enumerate(records):
            q = rec.get(cols["query"])
            pos = _texts(rec.get(cols["positive"]))
            negs = _texts(rec.get(cols["negatives"])) if cols.get("negatives") else []
            if cols.get("negative"):
                negs = _texts(rec.get(cols["negative"])) or negs
            if not (isinstance(q, str) and q.strip() and pos):
                bad.skip(f"{where}[{i}]", "missing query or positive")
                continue
            bad.ok()
            yield self.row(q, pos[0], negs, split2=bool(self.split2 and i % 2), language=language)


def _texts(value: Any) -> list[str]:
    """Non-empty texts from a hub column: a string, a list of strings or of passage dicts."""
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        text = _ctx_text(v) if isinstance(v, dict) else v
        if isinstance(text, str) and text.strip():
            out.append(text)
    return out


def _lang_from_config(config: str | None) -> str | None:
    key = (config or "").lower()
    return key if key in _LANGS else _LANG_NAMES.get(key)


_REGISTRY: dict[str, PublicDataset] = {}
_loaded = False


def register(ds: PublicDataset) -> PublicDataset:
    _REGISTRY[ds.name] = ds
    return ds


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in PUBLIC_MODULES:
            importlib.import_module(f"rayembed.data.public.{mod}")
        _loaded = True


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> PublicDataset:
    """A registered dataset by name; an unknown name lists the known ones."""
    _load_all()
    key = name.strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown dataset '{name}'. Known datasets: {', '.join(sorted(_REGISTRY))}. "
            "For your own data, give the source a path, a format and an instruction in data.sources."
        )
    return _REGISTRY[key]


# ----------------------------------------------------------------------------- shared layout readers


def split_two(row_id: str) -> bool:
    """Stable half of the rows for a set's second split (NLI, Quora)."""
    return int(row_id[-1], 16) % 2 == 1


def rows_from_qrels(ds: PublicDataset, corpus: dict[str, str], queries: dict[str, str],
                    qrels: dict[str, dict[str, int]], bad: BadRows, min_grade: int = 1,
                    language: str | None = None) -> Iterator[dict[str, Any]]:
    """One row per (query, relevant document) judgement; judged-irrelevant documents become negatives."""
    for qid, docs in qrels.items():
        q = queries.get(qid)
        if not q or not q.strip():
            bad.skip(f"query {qid}", "judged query missing or empty")
            continue
        negs = [corpus[d] for d, g in docs.items() if g < min_grade and corpus.get(d, "").strip()]
        for did, grade in docs.items():
            if grade < min_grade:
                continue
            doc = corpus.get(did)
            if not doc or not doc.strip():
                bad.skip(f"query {qid} doc {did}", "judged document missing or empty")
                continue
            bad.ok()
            yield ds.row(q, doc, negs, language=language)


def beir_texts(corpus: dict[str, dict[str, str]]) -> dict[str, str]:
    """BEIR documents as single strings: ``title`` then ``text`` (title omitted when empty)."""
    return {k: (f"{v['title']}\n{v['text']}" if v.get("title") else v.get("text", "")).strip() for k, v in corpus.items()}


def read_beir_train(ds: PublicDataset, path: Path, bad: BadRows, split: str = "train", **_: Any):
    from rayembed.data.formats import load_beir

    corpus, queries, qrels = load_beir(path, split=split)
    yield from rows_from_qrels(ds, beir_texts(corpus), queries, qrels, bad)


def _ctx_text(c: dict[str, Any]) -> str:
    title, text = (c.get("title") or "").strip(), (c.get("text") or "").strip()
    return f"{title}\n{text}" if title and text else text


def read_dpr_json(ds: PublicDataset, path: Path, bad: BadRows, max_negatives: int = 30, **_: Any):
    """DPR's ``biencoder-*-train.json``: a JSON list of {question, positive_ctxs, hard_negative_ctxs, ...}."""
    import json

    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f} is not a DPR JSON file ({e}); expected a JSON list of questions.") from e
        for i, rec in enumerate(data):
            pos = [_ctx_text(c) for c in rec.get("positive_ctxs") or []]
            pos = [p for p in pos if p]
            q = rec.get("question") or ""
            if not q.strip() or not pos:
                bad.skip(f"{f.name}[{i}]", "no question or no positive context")
                continue
            negs = [_ctx_text(c) for c in (rec.get("hard_negative_ctxs") or rec.get("negative_ctxs") or [])]
            bad.ok()
            yield ds.row(q, pos[0], [n for n in negs if n][:max_negatives])


def read_tevatron_jsonl(ds: PublicDataset, path: Path, bad: BadRows, language: str | None = None, **_: Any):
    """Tevatron-style JSONL (MIRACL, Mr. TyDi): {query, positive_passages:[{title,text}], negative_passages}."""
    from rayembed.data.formats import read_jsonl

    files = sorted([*path.rglob("*.jsonl"), *path.rglob("*.jsonl.gz")]) if path.is_dir() else [path]
    for f in files:
        lang = language or _lang_from_path(f) or ds.language
        for i, rec in enumerate(read_jsonl(f, bad) if f.suffix != ".gz" else _gz_jsonl(f, bad)):
            pos = [_ctx_text(c) for c in rec.get("positive_passages") or []]
            pos = [p for p in pos if p]
            q = rec.get("query") or ""
            if not q.strip() or not pos:
                bad.reject(f"{f.name}:{i + 1}", "no query or no positive passage")
                continue
            negs = [_ctx_text(c) for c in rec.get("negative_passages") or []]
            yield ds.row(q, pos[0], [n for n in negs if n], language=lang)


def _gz_jsonl(f: Path, bad: BadRows):
    import gzip
    import json

    with gzip.open(f, "rt", encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                    bad.ok()
                except json.JSONDecodeError:
                    bad.skip(f"{f.name}:{lineno}", "invalid JSON")


_LANGS = {"ar", "bn", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th", "zh", "de", "yo", "yor"}
_LANG_NAMES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id", "japanese": "ja",
               "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te", "thai": "th"}


def _lang_from_path(f: Path) -> str | None:
    for part in reversed(f.parts):
        for tok in part.lower().replace(".", "-").replace("_", "-").split("-"):
            if tok in _LANGS:
                return tok
            if tok in _LANG_NAMES:
                return _LANG_NAMES[tok]
    return None


def read_tsv_rows(path: Path, bad: BadRows, min_fields: int, header: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Tab-separated lines as field lists (``where`` for messages); short lines are skipped."""
    from rayembed.data.formats import _read_lines

    for lineno, line in _read_lines(path, bad):
        if not line.strip() or (header and lineno == 1):
            continue
        parts = line.split("\t")
        if len(parts) < min_fields:
            bad.skip(f"{path.name}:{lineno}", f"{len(parts)} fields, expected {min_fields}")
            continue
        bad.ok()
        yield f"{path.name}:{lineno}", parts


def find_file(folder: Path, *candidates: str) -> Path:
    for c in candidates:
        hits = sorted(folder.glob(c))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"'{folder}' holds none of {', '.join(candidates)}.")

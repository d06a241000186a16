"""Evaluation datasets: BEIR folders, SMART/TREC collections and STS files, loaded into one shape.

A :class:`~rayembed.config.eval.DatasetSpec` names the data; :func:`load_dataset` reads it and
returns a :class:`RetrievalData` or an :class:`STSData` carrying the query instruction to use.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from rayembed.config.eval import DatasetSpec
from rayembed.data import formats as _formats
from rayembed.evaluate.instructions import instruction_for

logger = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """A retrieval collection: corpus ``{id: {"title", "text"}}``, queries, graded qrels."""

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    instruction: str
    symmetric: bool = False
    ignore_identical_ids: bool = False
    kind: str = field(default="retrieval", init=False)

    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        return [doc_text(d) for d in self.corpus.values()]

    def judged_query_ids(self) -> list[str]:
        """Queries with at least one relevant document: the ones the metrics average over."""
        return [q for q in self.queries if any(g > 0 for g in self.qrels.get(q, {}).values())]

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "num_docs": len(self.corpus),
            "num_queries": len(self.judged_query_ids()),
            "instruction": self.instruction,
            "symmetric": self.symmetric,
        }


@dataclass
class STSData:
    """Sentence pairs with gold similarity scores (0-5 for STS-B)."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]
    instruction: str
    kind: str = field(default="sts", init=False)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_pairs": len(self.scores), "instruction": self.instruction}


def doc_text(doc: dict[str, str]) -> str:
    """BEIR's document text: title, a space, body (the index's own rule, :func:`encode_text`)."""
    from rayembed.index.corpus import encode_text

    return encode_text(doc.get("text") or "", doc.get("title") or "", True)


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix in (".csv", ".tsv", ".txt"):
            return "sts"
    elif path.is_dir():
        if (path / "corpus.jsonl").exists():
            return "beir"
        if any(path.glob("*.all.*")):
            return "smart"
        if any(path.glob("sts-*.csv")):
            return "sts"
    else:
        raise FileNotFoundError(
            f"Evaluation data '{path}' does not exist; set the dataset's path (relative paths are "
            f"under data_dir) or pass --data-dir."
        )
    raise ValueError(
        f"Cannot tell the format of '{path}': expected a BEIR folder (corpus.jsonl), a SMART "
        f"collection (*.all.*, *.qry, *qrel*) or an STS .csv/.tsv file; set format: beir|smart|sts."
    )


def _subsample(data: RetrievalData, max_queries: int, max_docs: int, seed: int = 0) -> RetrievalData:
    """Keep the first ``max_queries`` judged queries and at most ``max_docs`` documents.

    Documents judged relevant for the kept queries are kept first, taken in turn from each
    query (best grade first) so every query keeps its share, then the other judged ones; the
    rest are a seeded random sample of the remaining corpus (distractors). When ``max_docs``
    cannot hold every relevant document a warning says how many were dropped: their queries
    can no longer reach full recall, so raise ``max_docs`` or lower ``max_queries``.
    """
    if max_queries:
        keep_q = data.judged_query_ids()[:max_queries]
        data.queries = {q: data.queries[q] for q in keep_q}
        data.qrels = {q: data.qrels[q] for q in keep_q if q in data.qrels}
    if max_docs and max_docs < len(data.corpus):
        per_query = [
            [d for d, _ in sorted(((d, g) for d, g in rel.items() if g > 0 and d in data.corpus),
                                  key=lambda x: -x[1])]
            for rel in data.qrels.values()
        ]
        relevant = [lst[i] for i in range(max(map(len, per_query), default=0)) for lst in per_query if i < len(lst)]
        judged = [d for rel in data.qrels.values() for d, g in rel.items() if g <= 0 and d in data.corpus]
        ordered = list(dict.fromkeys(relevant + judged))
        keep = ordered[:max_docs]
        n_relevant = len(dict.fromkeys(relevant))
        if n_relevant > max_docs:
            logger.warning(
                "%s: max_docs=%d keeps %d of the %d documents judged relevant for the %d kept queries; "
                "recall is capped. Raise max_docs or lower max_queries.",
                data.name, max_docs, max_docs, n_relevant, len(data.qrels),
            )
        kept = set(keep)
        rest = [d for d in data.corpus if d not in kept]
        random.Random(seed).shuffle(rest)
        kept |= set(rest[: max_docs - len(keep)])
        data.corpus = {d: v for d, v in data.corpus.items() if d in kept}
    return data


def load_dataset(
    spec: DatasetSpec,
    data_dir: str | Path | None = None,
    instructions: dict[str, str] | None = None,
) -> RetrievalData | STSData:
    """Read the dataset ``spec`` names; relative paths resolve under ``data_dir``.

    Without ``data_dir``, a relative path that does not exist from the working directory
    resolves under the default data directory ($RAYEMBED_DATA_DIR, then ../shared/data).
    """
    path = Path(spec.path)
    if not path.is_absolute():
        if data_dir is None and not path.exists():
            from rayembed.runtime import resolve_data_dir

            data_dir = resolve_data_dir()
        if data_dir is not None:
            path = Path(data_dir) / path
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    overrides = dict(instructions or {})
    if spec.instruction:
        overrides[spec.name] = spec.instruction
    if fmt == "sts":
        file = path
        if path.is_dir():
            file = path / f"sts-{spec.split}.csv"
        if not file.exists():
            raise FileNotFoundError(f"STS file '{file}' does not exist; set the dataset's path or split.")
        s1, s2, scores = _formats.load_stsb(file)
        n = spec.max_queries or len(scores)
        return STSData(
            spec.name, list(s1)[:n], list(s2)[:n], [float(s) for s in scores][:n],
            instruction_for(spec.name, overrides, kind="sts"),
        )
    if fmt == "beir":
        corpus, queries, qrels = _beir(path, spec.split)
    elif fmt == "smart":
        if not path.is_dir():
            raise FileNotFoundError(f"SMART collection folder '{path}' does not exist.")
        corpus, queries, qrels = _formats.load_smart_collection(path)
    else:  # pragma: no cover - the config restricts the values
        raise ValueError(f"Unknown dataset format {fmt!r}; use beir, smart or sts.")
    data = RetrievalData(
        spec.name,
        {str(k): v for k, v in corpus.items()},
        {str(k): v for k, v in queries.items()},
        {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in qrels.items()},
        instruction_for(spec.name, overrides),
        symmetric=spec.symmetric,
        ignore_identical_ids=spec.ignore_identical_ids,
    )
    if not data.judged_query_ids():
        raise ValueError(
            f"Dataset '{spec.name}' ({path}) has no query with a relevant judgement; check its qrels."
        )
    return _subsample(data, spec.max_queries, spec.max_docs)


def _beir(path: Path, split: str):
    return _formats.load_beir(path, split=split)

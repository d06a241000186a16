"""Readers for the local file formats: BEIR, SMART/TREC (Cranfield, CISI), STS-B, JSONL/Parquet/TSV.

Training (public-dataset loaders, ``rayembed data build``) and evaluation share these, so a
collection reads the same way wherever it is used. Shapes::

    load_beir(dir)              -> corpus {id: {"title", "text"}}, queries {id: text},
                                   qrels {qid: {docid: grade}}
    load_smart_collection(dir)  -> the same three, from cran.all.1400 / cran.qry / cranqrel
                                   (or CISI.ALL / CISI.QRY / CISI.REL)
    load_stsb(path)             -> (sentence1s, sentence2s, scores), three equal-length lists
    iter_records(path, columns) -> dicts with the columns renamed, bad rows counted and skipped

Bad input: a row that cannot be decoded (non-UTF-8, broken JSON) or lacks a field is counted in
a :class:`BadRows` with its reason and skipped; :meth:`BadRows.check` fails the job once more
than ``max_bad_fraction`` of a file is bad, naming the file and its first bad rows.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- bad rows


@dataclass
class BadRows:
    """Counts skipped rows by reason and keeps the first few for the error message."""

    source: str
    total: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def ok(self) -> None:
        self.total += 1

    def skip(self, where: str, reason: str) -> None:
        self.total += 1
        self.bad += 1
        self.reasons[reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")

    def reject(self, where: str, reason: str) -> None:
        """A row the reader already counted as read turns out unusable (missing field, empty text)."""
        self.bad += 1
        self.reasons[reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")

    @property
    def fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def check(self, max_bad_fraction: float) -> None:
        """Log what was skipped; raise ValueError when too much of the input is bad."""
        if not self.bad:
            return
        summary = ", ".join(f"{r} x{n}" for r, n in self.reasons.most_common())
        if self.fraction > max_bad_fraction:
            raise ValueError(
                f"{self.source}: {self.bad} of {self.total} rows are bad ({self.fraction:.1%} > "
                f"data.max_bad_fraction={max_bad_fraction}); first bad rows: {'; '.join(self.examples)}. "
                "Fix the file, or raise data.max_bad_fraction to skip them."
            )
        logger.warning("%s: skipped %d of %d rows (%s)", self.source, self.bad, self.total, summary)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "bad": self.bad, "reasons": dict(self.reasons), "first": self.examples}


def _read_lines(path: Path, bad: BadRows | None) -> Iterator[tuple[int, str]]:
    """Lines of a text file; a line that is not UTF-8 is reported and skipped, not fatal."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if bad is None:
                    raise ValueError(f"{path}:{lineno} is not UTF-8; re-encode the file as UTF-8.") from None
                bad.skip(f"{path.name}:{lineno}", "not UTF-8")
                continue
            yield lineno, line.rstrip("\r\n")


def read_jsonl(path: str | Path, bad: BadRows | None = None) -> Iterator[dict[str, Any]]:
    """JSON objects, one a line. Without ``bad``, the first broken line raises."""
    p = Path(path)
    for lineno, line in _read_lines(p, bad):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if bad is None:
                raise ValueError(f"{p}:{lineno} is not valid JSON ({e.msg}); fix or remove that line.") from e
            bad.skip(f"{p.name}:{lineno}", "invalid JSON")
            continue
        if not isinstance(obj, dict):
            if bad is None:
                raise ValueError(f"{p}:{lineno} is a JSON {type(obj).__name__}, not an object.")
            bad.skip(f"{p.name}:{lineno}", "not a JSON object")
            continue
        if bad is not None:
            bad.ok()
        yield obj


def iter_records(
    path: str | Path,
    columns: dict[str, str] | None = None,
    bad: BadRows | None = None,
    fmt: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL, Parquet or TSV/CSV file, with ``columns`` renaming {ours: theirs}.

    ``fmt`` is ``jsonl``, ``parquet``, ``tsv`` or ``csv``; empty: from the file suffix. A TSV or
    CSV file needs a header row. Dotted names (``"positive": "pos.0"``) reach into nested
    objects and lists.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Data file '{p}' does not exist; check the path in the data config.")
    fmt = (fmt or _guess_format(p)).lower()
    if fmt in ("jsonl", "json", "ndjson"):
        rows: Iterator[dict[str, Any]] = read_jsonl(p, bad)
    elif fmt == "parquet":
        rows = _iter_parquet(p, bad)
    elif fmt in ("tsv", "csv"):
        rows = _iter_delimited(p, "\t" if fmt == "tsv" else ",", bad)
    else:
        raise ValueError(f"Unknown file format '{fmt}' for '{p}'; use jsonl, parquet, tsv or csv.")
    if not columns:
        yield from rows
        return
    for r in rows:
        out = dict(r)
        for ours, theirs in columns.items():
            out[ours] = _dig(r, theirs)
        yield out


def _guess_format(p: Path) -> str:
    suffixes = [s.lower() for s in p.suffixes]
    for s in reversed(suffixes):
        if s in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if s in (".parquet", ".pq"):
            return "parquet"
        if s in (".tsv", ".csv"):
            return s[1:]
    raise ValueError(f"Cannot tell the format of '{p}' from its name; set the source's format (jsonl, parquet, tsv).")


def _dig(obj: Any, dotted: str) -> Any:
    if isinstance(obj, dict) and dotted in obj:
        return obj[dotted]
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit():
            i = int(part)
            cur = cur[i] if i < len(cur) else None
        else:
            return None
    return cur


def _iter_parquet(p: Path, bad: BadRows | None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            if bad is not None:
                bad.ok()
            yield row


def _iter_delimited(p: Path, delim: str, bad: BadRows | None) -> Iterator[dict[str, Any]]:
    header: list[str] | None = None
    for lineno, line in _read_lines(p, bad):
        if not line.strip():
            continue
        parts = next(csv.reader([line], delimiter=delim))
        if header is None:
            header = parts
            continue
        if len(parts) != len(header):
            if bad is None:
                raise ValueError(f"{p}:{lineno} has {len(parts)} fields, the header has {len(header)}.")
            bad.skip(f"{p.name}:{lineno}", f"{len(parts)} fields, expected {len(header)}")
            continue
        if bad is not None:
            bad.ok()
        yield dict(zip(header, parts))


# ----------------------------------------------------------------------------- BEIR


def load_beir(folder: str | Path, split: str = "test"):
    """A BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

    The qrels file may or may not start with the ``query-id corpus-id score`` header.
    Returns ``(corpus, queries, qrels)`` with string ids and integer grades.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.exists():
            have = sorted(x.name for x in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
            raise FileNotFoundError(
                f"BEIR folder '{folder}' lacks {p.relative_to(folder)}; a BEIR dataset holds corpus.jsonl, "
                f"queries.jsonl and qrels/<split>.tsv (qrels here: {have or 'none'})."
            )
    corpus = {
        str(r["_id"]): {"title": r.get("title") or "", "text": r.get("text") or ""}
        for r in read_jsonl(folder / "corpus.jsonl")
    }
    queries = {str(r["_id"]): r.get("text") or "" for r in read_jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _read_lines(qrels_path, None):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or not parts[0].strip():
            continue
        if lineno == 1 and not _is_number(parts[-1]):
            continue  # header
        if len(parts) == 4:  # TREC style: qid 0 docid grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise ValueError(f"{qrels_path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'.")
        qrels.setdefault(parts[0], {})[parts[1]] = int(float(parts[2]))
    return corpus, queries, qrels


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- SMART (Cranfield, CISI)


def read_smart(path: str | Path) -> list[dict[str, str]]:
    """Records of a SMART file: ``.I id`` starts one, ``.T/.A/.B/.W/.X`` open its fields.

    Values are whitespace-normalised; ``I`` holds the id as written (``001`` stays ``001``).
    """
    records: list[dict[str, str]] = []
    tag = None
    buf: list[str] = []

    def flush():
        if records and tag:
            records[-1][tag] = " ".join(" ".join(buf).split())

    for _, line in _read_lines(Path(path), None):
        m = re.match(r"^\.([A-Z])(?:\s+(.*))?$", line)
        if m:
            flush()
            buf = []
            t, rest = m.group(1), (m.group(2) or "").strip()
            if t == "I":
                records.append({"I": rest})
                tag = None
            else:
                tag = t
                if rest:
                    buf.append(rest)
            continue
        if tag:
            buf.append(line)
    flush()
    return records


def _find(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        for f in sorted(folder.iterdir()):
            if f.is_file() and re.fullmatch(pat, f.name, flags=re.IGNORECASE):
                return f
    return None


def load_smart_collection(folder: str | Path, qrels_numbering: str = "auto"):
    """A SMART collection folder (Cranfield: cran.all.1400, cran.qry, cranqrel; CISI: CISI.ALL, CISI.QRY, CISI.REL).

    Query ids are the ``.I`` ids of the queries file, as integers in text (``"1"``, ``"2"``,
    ``"4"``...). Cranfield's ``cranqrel`` numbers queries 1..225 in file order instead of by
    those ids; ``qrels_numbering="auto"`` detects that (the judgement ids run 1..n while the
    ``.I`` ids skip numbers) and maps position k to the k-th query's id. ``"sequential"`` and
    ``"id"`` force either reading.

    Grades: Cranfield's 1 (most relevant) to 4 become gains ``5 - grade``; its ``-1`` (not
    relevant) becomes 0 and is kept, so the count matches the file. CISI's four-column
    judgements (``qid docid 0 0.0``) are binary, gain 1. Documents with empty text stay (with
    empty text) so document ids line up with the judgements.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"SMART collection folder '{folder}' does not exist.")
    docs_file = _find(folder, (r".*\.all(\.\d+)?", r".*\.docs?"))
    qry_file = _find(folder, (r".*\.qry", r".*queries.*"))
    rel_file = _find(folder, (r".*qrels?", r".*\.rel", r".*rel.*"))
    if not (docs_file and qry_file and rel_file):
        raise FileNotFoundError(
            f"SMART folder '{folder}' needs a documents file (*.all.*), a queries file (*.qry) and a "
            "judgements file (*qrel* or *.rel), e.g. cran.all.1400, cran.qry, cranqrel."
        )
    corpus: dict[str, dict[str, str]] = {}
    for r in read_smart(docs_file):
        text = r.get("W", "")
        title = r.get("T", "")
        corpus[str(int(r["I"])) if r["I"].isdigit() else r["I"]] = {"title": title, "text": text}
    q_records = read_smart(qry_file)
    q_ids = [str(int(r["I"])) if r["I"].isdigit() else r["I"] for r in q_records]
    queries = {qid: r.get("W", "") for qid, r in zip(q_ids, q_records)}

    raw: list[tuple[str, str, int]] = []
    for lineno, line in _read_lines(rel_file, None):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise ValueError(f"{rel_file}:{lineno}: expected 'query doc grade'.")
        if len(parts) >= 4:  # CISI: qid docid 0 0.000000 -> binary relevance
            gain = 1
        else:
            grade = int(parts[2])
            gain = 5 - grade if 1 <= grade <= 4 else 0
        raw.append((str(int(parts[0])), str(int(parts[1])), gain))

    rel_ids = {q for q, _, _ in raw}
    if qrels_numbering == "auto":
        sequential_ids = q_ids == [str(i) for i in range(1, len(q_ids) + 1)]
        fits_positions = all(1 <= int(q) <= len(q_ids) for q in rel_ids)
        unknown = rel_ids - set(q_ids)
        qrels_numbering = "sequential" if (not sequential_ids and fits_positions and (unknown or len(rel_ids) == len(q_ids))) else "id"
    if qrels_numbering == "sequential":
        mapping = {str(i): qid for i, qid in enumerate(q_ids, 1)}
    elif qrels_numbering == "id":
        mapping = {q: q for q in q_ids}
    else:
        raise ValueError(f"qrels_numbering must be auto, sequential or id, not '{qrels_numbering}'.")
    qrels: dict[str, dict[str, int]] = {}
    for q, d, gain in raw:
        if q not in mapping:
            raise ValueError(f"{rel_file}: judgement for query {q}, which {qry_file.name} does not hold.")
        qrels.setdefault(mapping[q], {})[d] = gain
    return corpus, queries, qrels


# ----------------------------------------------------------------------------- STS-B


def load_stsb(path: str | Path, bad: BadRows | None = None):
    """An STS-B file (``sts-train.csv`` etc.): tab-separated genre, file, year, id, score, s1, s2.

    Some lines carry extra trailing fields (sources); they are ignored. Returns
    ``(sentence1s, sentence2s, scores)``: three lists of equal length, scores in 0..5.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"'{p}' is a folder; pass one STS-B file such as {p}/sts-train.csv.")
    if not p.exists():
        raise FileNotFoundError(f"STS-B file '{p}' does not exist.")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, line in _read_lines(p, bad):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 7 or not _is_number(parts[4]):
            if bad is None:
                raise ValueError(f"{p}:{lineno}: expected 7 tab-separated fields with the score 5th (STS-B format).")
            bad.skip(f"{p.name}:{lineno}", "not an STS-B line")
            continue
        if bad is not None:
            bad.ok()
        scores.append(float(parts[4]))
        s1.append(parts[5])
        s2.append(parts[6])
    return s1, s2, scores

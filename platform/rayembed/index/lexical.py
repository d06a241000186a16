"""Index parts beside the FAISS shards: ``bm25``, ``sparse`` (learned lexical weights) and ``multivector``.

Each part lives in its own folder of the index directory and every file of it is recorded,
with its size and sha256, in ``plan.json`` while it is built and in ``manifest.json`` once the
build is complete (``manifest["parts"][name]``)::

    bm25/                         # bm25s's own save format (numpy arrays + JSON, no pickle)
      data.csc.index.npy  indices.csc.index.npy  indptr.csc.index.npy
      vocab.index.json    params.index.json
    sparse/sparse-00000.npz       # per shard: scipy CSR (rows, vocab_size) float32 of Embedder.encode_sparse
    multivector/mv-00000.vectors.npy   # per shard: float16 (tokens, dim), every document's token vectors
    multivector/mv-00000.offsets.npy   # per shard: int64 (rows + 1,), document i is vectors[o[i]:o[i+1]]

Row ``i`` of the BM25 index is global id ``i``; row ``j`` of a sparse or multivector shard is
global id ``id_start + j`` of that shard, so every part is read by the ids of the id map.

A BM25-only index (``manifest["kind"] == "lexical"``) holds the id map and the ``bm25`` part
and no FAISS shards: it needs no model, neither to build nor to search.

BM25 tokenisation (stopwords, Snowball stemmer) is defined here once, in :class:`BM25Params`
and :func:`bm25_tokenize`; evaluation's ``BM25Retriever`` uses the same code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.manifest import (
    IndexIntegrityError,
    file_record,
    is_valid,
    part_files,
    read_docs_part,
    verify_file,
)
from rayembed.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

PARTS = ("dense", "bm25", "sparse", "multivector")
EXTRA_PARTS = ("bm25", "sparse", "multivector")
#: Parts that need the embedder (and therefore the dense part's model) to build and to query.
MODEL_PARTS = ("sparse", "multivector")
BM25_DIR = "bm25"
SPARSE_DIR = "sparse"
MULTIVECTOR_DIR = "multivector"
PLAN_FILE = "plan.json"

#: ``encode(texts) -> csr_matrix (n, vocab)`` / ``encode(texts) -> list of (tokens_i, dim) arrays``.
SparseEncodeFn = Callable[[list[str]], Any]
MultivectorEncodeFn = Callable[[list[str]], list[np.ndarray]]


def check_parts(parts: Sequence[str], *, where: str = "parts") -> tuple[str, ...]:
    """Validate a list of part names; returns them deduplicated in canonical order."""
    if isinstance(parts, str):
        parts = [parts]
    parts = list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"{where}: unknown index part(s) {unknown}; choose from {list(PARTS)}.")
    if not parts:
        raise ValueError(f"{where} is empty; name at least one of {list(PARTS)} (dense is the usual one).")
    model = [p for p in parts if p in MODEL_PARTS]
    if model and "dense" not in parts:
        raise ValueError(
            f"{where}: the {model} part(s) are encoded by the embedder and need the dense part beside them; "
            f"add dense, e.g. {where}=[dense, {', '.join(model)}]. Only bm25 can stand alone."
        )
    return tuple(p for p in PARTS if p in parts)


# ----------------------------------------------------------------------------- BM25


@dataclass(frozen=True)
class BM25Params:
    """BM25 scoring (bm25s, Lucene variant) and tokenisation: English stopwords, Snowball stemming."""

    k1: float = 1.5
    b: float = 0.75
    stopwords: str | None = "en"
    stemmer: str | None = "english"

    @classmethod
    def from_config(cls, cfg: Any | None) -> BM25Params:
        """From any object with ``k1, b, stopwords, stemmer`` (``index.bm25``, ``eval.bm25``); None: defaults."""
        if cfg is None:
            return cls()
        if isinstance(cfg, BM25Params):
            return cfg
        if isinstance(cfg, dict):
            return cls(**{k: cfg[k] for k in ("k1", "b", "stopwords", "stemmer") if k in cfg})._norm()
        return cls(k1=cfg.k1, b=cfg.b, stopwords=cfg.stopwords, stemmer=cfg.stemmer)._norm()

    def _norm(self) -> BM25Params:
        none = ("none", "")
        return BM25Params(float(self.k1), float(self.b),
                          None if self.stopwords in none else self.stopwords,
                          None if self.stemmer in none else self.stemmer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self._norm())


_STEMMERS: dict[str, Any] = {}


def make_stemmer(name: str | None):
    """A PyStemmer stemmer (cached), or None for 'none' or when PyStemmer is missing (with a warning)."""
    if name in (None, "", "none"):
        return None
    if name not in _STEMMERS:
        try:
            import Stemmer

            _STEMMERS[name] = Stemmer.Stemmer(name)
        except ImportError:
            logger.warning("PyStemmer is not installed; BM25 runs unstemmed (pip install PyStemmer).")
            _STEMMERS[name] = None
    return _STEMMERS[name]


def bm25_tokenize(texts: Sequence[str], params: BM25Params) -> list[list[str]]:
    """Token strings of each text, as BM25 indexes and queries them (lowercased, stopwords, stemmed)."""
    import bm25s

    params = params._norm()
    if not texts:
        return []
    return bm25s.tokenize(list(texts), stopwords=params.stopwords, stemmer=make_stemmer(params.stemmer),
                          return_ids=False, show_progress=False)


class BM25Index:
    """A bm25s index whose row ``i`` is document ``i``; built in memory, saved and loaded without pickle."""

    FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab.index.json",
             "params.index.json")

    def __init__(self, retriever: Any, params: BM25Params):
        self.retriever = retriever
        self.params = params._norm()

    @property
    def num_docs(self) -> int:
        return int(self.retriever.scores["num_docs"])

    @classmethod
    def build(cls, texts: Sequence[str], params: BM25Params | None = None) -> BM25Index:
        import bm25s

        params = (params or BM25Params())._norm()
        retriever = bm25s.BM25(k1=params.k1, b=params.b)
        retriever.index(bm25_tokenize(texts, params), show_progress=False)
        return cls(retriever, params)

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write the index into ``folder`` (replacing it) via a temporary sibling folder."""
        final = Path(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            self.retriever.save(str(tmp), allow_pickle=False, show_progress=False)
            for f in tmp.iterdir():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return sorted(p for p in final.iterdir() if p.is_file())

    @classmethod
    def load(cls, folder: str | os.PathLike, params: BM25Params) -> BM25Index:
        import bm25s

        try:
            retriever = bm25s.BM25.load(str(folder), load_corpus=False, mmap=False, allow_pickle=False,
                                        show_progress=False)
        except Exception as e:  # numpy, json and bm25s raise several types for damaged files
            raise IndexIntegrityError(
                f"bm25 part {folder} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is corrupt. "
                "Delete it and rerun `rayembed index` to rebuild it."
            ) from e
        return cls(retriever, params)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: scores (nq, k) float32 and row ids (nq, k) int64.

        Documents sharing no term with a query score 0 and are not retrieved (id -1, score 0),
        like a query whose every term is a stopword or unknown.
        """
        n = len(queries)
        k = max(0, min(int(k), self.num_docs))
        idx = np.full((n, k), -1, dtype=np.int64)
        scores = np.zeros((n, k), dtype=np.float32)
        if n == 0 or k == 0:
            return scores, idx
        vocab = self.retriever.vocab_dict
        tokens = [[t for t in q if t in vocab] for q in bm25_tokenize(queries, self.params)]
        nonempty = [i for i, t in enumerate(tokens) if t]  # bm25s rejects a query with no tokens left
        if nonempty:
            res, sc = self.retriever.retrieve([tokens[i] for i in nonempty], k=k, show_progress=False)
            idx[nonempty], scores[nonempty] = res, sc
        idx[scores <= 0] = -1
        scores[idx < 0] = 0.0
        return scores, idx


# ----------------------------------------------------------------------------- building the parts


def _rel(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _save_plan(build: Any) -> None:
    atomic_write_json(build.root / PLAN_FILE, build.plan)


def _shard_texts(build: Any, shard: dict[str, Any], include_title: bool) -> list[str]:
    from rayembed.index.corpus import encode_text

    table = read_docs_part(build.root, shard, ["text", "title"])
    return [encode_text(t, ti, include_title)
            for t, ti in zip(table.column("text").to_pylist(), table.column("title").to_pylist())]


def part_done(root: Path, plan: dict[str, Any], name: str, settings: dict[str, Any] | None = None) -> bool:
    """Whether part ``name`` is complete in ``plan`` (every file present with its recorded sha256)."""
    rec = (plan.get("parts") or {}).get(name)
    if not rec or not rec.get("complete"):
        return False
    if settings is not None and rec.get("settings") != settings:
        return False
    return all(is_valid(root, f) for f in part_files(rec))


def _start_part(build: Any, name: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The plan record of part ``name``: kept when its settings match, else replaced (overwrite) or refused."""
    parts = build.plan.setdefault("parts", {})
    rec = parts.get(name)
    if rec is not None and rec.get("settings") != settings:
        if not overwrite:
            diff = sorted(k for k in set(settings) | set(rec.get("settings", {}))
                          if settings.get(k) != rec.get("settings", {}).get(k))
            raise IndexIntegrityError(
                f"{build.root} holds a {name} part built with different {', '.join(diff)} "
                f"({rec.get('settings')} vs {settings}). Choose another index.output_dir, or set "
                "index.overwrite=true to rebuild the part."
            )
        logger.warning("Rebuilding the %s part of %s (different settings)", name, build.root)
        rec = None
    if rec is None:
        rec = {"settings": settings, "complete": False}
        parts[name] = rec
    return rec


def build_bm25_part(build: Any, params: BM25Params, *, include_title: bool, overwrite: bool = False) -> None:
    """Index every document's text with bm25s into ``bm25/`` (rows = global ids)."""
    settings = {**params.to_dict(), "include_title": include_title}
    if part_done(build.root, build.plan, "bm25", settings):
        return
    rec = _start_part(build, "bm25", settings, overwrite)
    texts: list[str] = []
    for shard in build.plan["shards"]:
        texts.extend(_shard_texts(build, shard, include_title))
    index = BM25Index.build(texts, params)
    files = index.save(build.root / BM25_DIR)
    rec.update(files=[file_record(build.root, f) for f in files], rows=len(texts),
               vocab_size=len(index.retriever.vocab_dict), complete=True)
    _save_plan(build)
    logger.info("Wrote the bm25 part of %s (%d documents, %d terms)", build.root, len(texts), rec["vocab_size"])


def _shard_record_ok(build: Any, rec: dict[str, Any], shard: dict[str, Any], keys: tuple[str, ...]) -> bool:
    got = next((s for s in rec.get("shards", []) if s["index"] == shard["index"]), None)
    if got is None or any(got.get(k) != shard[k] for k in ("rows", "id_start", "id_end")):
        return False
    return all(is_valid(build.root, got[k]) for k in keys)


def _put_shard(rec: dict[str, Any], entry: dict[str, Any]) -> None:
    rec["shards"] = sorted([s for s in rec.get("shards", []) if s["index"] != entry["index"]] + [entry],
                           key=lambda s: s["index"])


def _batches(texts: list[str], size: int):
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


def write_sparse_shard(encode: SparseEncodeFn, texts: list[str], path: Path, *, batch_size: int = 256,
                       vocab_size: int | None = None):
    """Encode ``texts`` with ``encode`` and write their CSR matrix (rows, vocab) to ``path`` atomically."""
    import scipy.sparse as sp

    blocks = [sp.csr_matrix(encode(b), dtype=np.float32) for b in _batches(texts, batch_size)]
    mat = sp.vstack(blocks, format="csr").astype(np.float32)  # (rows, vocab)
    if mat.shape[0] != len(texts):
        raise RuntimeError(f"encode_sparse returned {mat.shape[0]} rows for {len(texts)} documents.")
    if vocab_size not in (None, mat.shape[1]):
        raise RuntimeError(f"encode_sparse returned {mat.shape[1]} columns, earlier shards {vocab_size}.")
    if mat.nnz and not np.isfinite(mat.data).all():
        raise ValueError("encode_sparse returned NaN or infinite weights; refusing to index them.")
    mat.sum_duplicates()
    mat.sort_indices()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            sp.save_npz(f, mat, compressed=False)
    return mat


def write_multivector_shard(encode: MultivectorEncodeFn, texts: list[str], stem: Path, *, batch_size: int = 256,
                            dim: int | None = None) -> tuple[Path, Path, int, np.ndarray]:
    """Encode ``texts``' token vectors and write ``<stem>.vectors.npy`` (float16) and ``.offsets.npy``.

    Returns ``(vectors path, offsets path, dim, offsets)``.
    """
    mats: list[np.ndarray] = []
    for b in _batches(texts, batch_size):
        mats.extend(np.asarray(m, dtype=np.float32) for m in encode(b))
    if len(mats) != len(texts):
        raise RuntimeError(f"encode_multivector returned {len(mats)} items for {len(texts)} documents.")
    dims = {m.shape[1] for m in mats if m.ndim == 2 and len(m)}
    if len(dims) > 1 or any(m.ndim != 2 for m in mats) or dim not in (None, *dims):
        raise RuntimeError(f"encode_multivector returned token vectors of mixed dimensions {sorted(dims)}.")
    dim = dims.pop() if dims else int(dim or 0)
    lengths = np.array([len(m) for m in mats], dtype=np.int64)
    offsets = np.zeros(len(mats) + 1, dtype=np.int64)  # (rows + 1,)
    np.cumsum(lengths, out=offsets[1:])
    vectors = (np.concatenate([m for m in mats if len(m)], axis=0) if offsets[-1]
               else np.zeros((0, dim), np.float32)).astype(np.float16)  # (tokens, dim)
    if not np.isfinite(vectors).all():
        raise ValueError("encode_multivector returned NaN or infinite values; refusing to index them.")
    vpath, opath = stem.with_suffix(".vectors.npy"), stem.with_suffix(".offsets.npy")
    for path, arr in ((vpath, vectors), (opath, offsets)):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
    return vpath, opath, int(dim), offsets


def build_sparse_part(build: Any, encode: SparseEncodeFn, *, include_title: bool, overwrite: bool = False,
                      batch_size: int = 256) -> None:
    """Encode every shard's documents with ``encode`` (learned sparse weights) into ``sparse/*.npz``."""
    settings = {"include_title": include_title}
    if part_done(build.root, build.plan, "sparse", settings):
        return
    rec = _start_part(build, "sparse", settings, overwrite)
    rec["complete"] = False
    for shard in build.plan["shards"]:
        if _shard_record_ok(build, rec, shard, ("file",)):
            continue
        texts = _shard_texts(build, shard, include_title)
        path = build.root / SPARSE_DIR / f"sparse-{shard['index']:05d}.npz"
        mat = write_sparse_shard(encode, texts, path, batch_size=batch_size, vocab_size=rec.get("vocab_size"))
        rec["vocab_size"] = int(mat.shape[1])
        _put_shard(rec, {"index": shard["index"], "rows": shard["rows"], "id_start": shard["id_start"],
                         "id_end": shard["id_end"], "nnz": int(mat.nnz), "file": file_record(build.root, path)})
        _save_plan(build)
        logger.info("Wrote %s (%d documents, %.1f terms each)", _rel(build.root, path), shard["rows"],
                    mat.nnz / max(shard["rows"], 1))
    rec["complete"] = True
    _save_plan(build)


def build_multivector_part(build: Any, encode: MultivectorEncodeFn, *, include_title: bool,
                           overwrite: bool = False, batch_size: int = 256) -> None:
    """Encode every shard's token vectors with ``encode`` into ``multivector/`` (float16 + offsets)."""
    settings = {"include_title": include_title, "dtype": "float16"}
    if part_done(build.root, build.plan, "multivector", settings):
        return
    rec = _start_part(build, "multivector", settings, overwrite)
    rec["complete"] = False
    for shard in build.plan["shards"]:
        if _shard_record_ok(build, rec, shard, ("vectors", "offsets")):
            continue
        texts = _shard_texts(build, shard, include_title)
        stem = build.root / MULTIVECTOR_DIR / f"mv-{shard['index']:05d}"
        vpath, opath, dim, offsets = write_multivector_shard(encode, texts, stem, batch_size=batch_size,
                                                             dim=rec.get("dim"))
        rec["dim"] = int(dim)
        _put_shard(rec, {"index": shard["index"], "rows": shard["rows"], "id_start": shard["id_start"],
                         "id_end": shard["id_end"], "tokens": int(offsets[-1]),
                         "vectors": file_record(build.root, vpath), "offsets": file_record(build.root, opath)})
        _save_plan(build)
        logger.info("Wrote %s (%d documents, %d token vectors)", _rel(build.root, vpath), shard["rows"],
                    int(offsets[-1]))
    rec["complete"] = True
    _save_plan(build)


def build_parts(build: Any, parts: Sequence[str], *, include_title: bool, bm25: BM25Params | None = None,
                sparse_encode: SparseEncodeFn | None = None,
                multivector_encode: MultivectorEncodeFn | None = None, overwrite: bool = False,
                batch_size: int = 256) -> None:
    """Build (or resume) every extra part named in ``parts`` for the planned documents of ``build``."""
    if "bm25" in parts:
        build_bm25_part(build, BM25Params.from_config(bm25), include_title=include_title, overwrite=overwrite)
    if "sparse" in parts:
        if sparse_encode is None:
            raise ValueError("The sparse part needs an embedder with a sparse head to encode documents.")
        build_sparse_part(build, sparse_encode, include_title=include_title, overwrite=overwrite,
                          batch_size=batch_size)
    if "multivector" in parts:
        if multivector_encode is None:
            raise ValueError("The multivector part needs an embedder with a multivector head to encode documents.")
        build_multivector_part(build, multivector_encode, include_title=include_title, overwrite=overwrite,
                               batch_size=batch_size)


def complete_parts(root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``parts``: every complete, verified part of the plan."""
    return {name: rec for name, rec in (plan.get("parts") or {}).items() if part_done(root, plan, name)}


def clear_parts(root: Path) -> None:
    for sub in (BM25_DIR, SPARSE_DIR, MULTIVECTOR_DIR):
        shutil.rmtree(root / sub, ignore_errors=True)


# ----------------------------------------------------------------------------- reading the parts


def _verify_all(root: Path, rec: dict[str, Any], name: str, verify: bool) -> None:
    for f in part_files(rec):
        verify_file(root, f, what=f"{name} part file", check_hash=verify)


def open_bm25(root: Path, rec: dict[str, Any], *, verify: bool = True) -> BM25Index:
    """The bm25 part, each file checked against its recorded size and sha256."""
    _verify_all(root, rec, "bm25", verify)
    folders = {Path(f["file"]).parent.as_posix() for f in rec["files"]}
    if len(folders) != 1:
        raise IndexIntegrityError(f"The bm25 part of {root} spans several folders {sorted(folders)}; rebuild it.")
    from rayembed.index.manifest import safe_resolve

    folder = safe_resolve(root, folders.pop(), what="bm25 part folder")
    index = BM25Index.load(folder, BM25Params.from_config(rec["settings"]))
    if index.num_docs != rec.get("rows"):
        raise IndexIntegrityError(
            f"bm25 part {folder} indexes {index.num_docs} documents but the manifest records {rec.get('rows')}; "
            "rebuild it with `rayembed index`."
        )
    return index


class SparsePart:
    """Learned sparse document weights, one CSR matrix per shard; search is ``q @ D.T``."""

    def __init__(self, root: Path, rec: dict[str, Any], *, verify: bool = True):
        import scipy.sparse as sp

        _verify_all(root, rec, "sparse", verify)
        self.vocab_size = int(rec["vocab_size"])
        self.shards: list[tuple[int, Any]] = []
        for s in rec["shards"]:
            path = verify_file(root, s["file"], what="sparse part file", check_hash=False)
            try:
                mat = sp.load_npz(path).tocsr()
            except Exception as e:
                raise IndexIntegrityError(
                    f"sparse part file {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is corrupt. "
                    "Delete it and rerun `rayembed index` to rebuild it."
                ) from e
            if mat.shape != (s["rows"], self.vocab_size):
                raise IndexIntegrityError(
                    f"sparse part file {path} holds a {mat.shape} matrix but the manifest records "
                    f"({s['rows']}, {self.vocab_size}); rebuild it with `rayembed index`."
                )
            self.shards.append((int(s["id_start"]), mat))

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` global ids per query row of ``q`` (CSR (nq, vocab)); scores (nq, k), ids -1 where none."""
        from rayembed.modeling.heads import sparse_scores

        if q.shape[1] != self.vocab_size:
            raise ValueError(
                f"Query weights have {q.shape[1]} columns but the sparse part has a vocabulary of "
                f"{self.vocab_size}; encode queries with the embedder the index was built with."
            )
        nq = q.shape[0]
        all_s, all_i = [], []
        for start, mat in self.shards:
            s = np.asarray(sparse_scores(q, mat), dtype=np.float32).reshape(nq, mat.shape[0])  # (nq, rows)
            kk = min(k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.tile(
                np.arange(s.shape[1]), (nq, 1))
            all_s.append(np.take_along_axis(s, top, axis=1))
            all_i.append(top.astype(np.int64) + start)
        return _top(np.concatenate(all_s, axis=1), np.concatenate(all_i, axis=1), k)


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each row (score desc, id asc); scores <= 0 (no shared term) become id -1."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if scores.size else np.zeros((len(scores), 0), np.int64)
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    ids = np.where(scores > 0, ids, -1)
    return np.where(ids >= 0, scores, 0.0).astype(np.float32), ids


class MultivectorPart:
    """Stored token vectors per document (float16), read by global id for MaxSim reranking."""

    def __init__(self, root: Path, rec: dict[str, Any], *, verify: bool = True):
        _verify_all(root, rec, "multivector", verify)
        self.dim = int(rec.get("dim") or 0)
        self.shards: list[tuple[int, np.ndarray, np.ndarray]] = []
        for s in rec["shards"]:
            vpath = verify_file(root, s["vectors"], what="multivector part file", check_hash=False)
            opath = verify_file(root, s["offsets"], what="multivector part file", check_hash=False)
            try:
                vectors = np.load(vpath, mmap_mode="r", allow_pickle=False)
                offsets = np.load(opath, allow_pickle=False)
            except Exception as e:
                raise IndexIntegrityError(
                    f"multivector part file {vpath} or {opath} cannot be read ({type(e).__name__}: "
                    f"{str(e)[:200]}); it is corrupt. Delete it and rerun `rayembed index` to rebuild it."
                ) from e
            if (offsets.shape != (s["rows"] + 1,) or offsets.dtype != np.int64 or vectors.ndim != 2
                    or int(offsets[-1]) != len(vectors) or (len(vectors) and vectors.shape[1] != self.dim)
                    or np.any(np.diff(offsets) < 0)):
                raise IndexIntegrityError(
                    f"multivector part files {vpath} and {opath} do not match each other or the manifest "
                    f"({s['rows']} documents, dim {self.dim}); rebuild them with `rayembed index`."
                )
            self.shards.append((int(s["id_start"]), vectors, offsets))
        self._starts = np.array([s[0] for s in self.shards], dtype=np.int64)

    def get(self, ids: Sequence[int]) -> list[np.ndarray]:
        """Token vectors (tokens_i, dim) float32 of each global id."""
        out = []
        for gid in ids:
            si = int(np.searchsorted(self._starts, gid, side="right") - 1)
            start, vectors, offsets = self.shards[si]
            j = int(gid) - start
            if si < 0 or not 0 <= j < len(offsets) - 1:
                raise KeyError(f"id {gid} is not in the multivector part.")
            out.append(np.asarray(vectors[offsets[j] : offsets[j + 1]], dtype=np.float32))
        return out

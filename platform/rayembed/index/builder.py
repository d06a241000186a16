"""Building an index directory in four resumable steps, shared by the in-process and Ray Data paths.

1. **Plan**: read the corpus once, in order, and write the id map in Parquet parts, one per shard,
   with consecutive global ids (empty documents are counted and skipped). ``plan.json`` records the
   parts, their id ranges and checksums, and a key (corpus fingerprint, columns, index spec,
   embedder identity) that a resumed build must match.
2. **Train** (IVF, PQ, SQ8, binary only): encode a random sample, train once, save the empty
   ``trained.index`` (binary: its mean is the centre of the sign bits, kept in the plan and then
   the manifest as ``center``, the same for every shard).
3. **Shards**: encode the documents of every shard whose verified file is missing, add them
   under their global ids to a copy of the trained index, write the shard (sq8 and binary with
   rescoring: and its float32 vectors, ``shards/shard-NNNNN.npy``) and then its sidecar.
   A killed build loses at most the shards in flight. With ``dims`` the vectors are cut to their
   first ``dims`` coordinates and re-normalised before anything is stored.
4. **Parts** (optional, ``parts=``): the ``bm25``, ``sparse`` and ``multivector`` parts beside
   the shards (:mod:`rayembed.index.lexical`), each file recorded with its sha256; resumed per
   part (BM25) or per shard (sparse, multivector) like the shards.
5. **Manifest**: written last, so its presence means the build is complete.

A BM25-only index (``parts=("bm25",)``) skips steps 2 and 3 and needs no model:
:func:`build_lexical_index`.

Only *how documents are encoded* differs between the paths: :func:`build_index_in_process`
encodes in this process, :func:`rayembed.index.ray_build.build_index` on a Ray Data actor pool.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.corpus import (
    ColumnMapping,
    encode_text,
    fingerprint,
    iter_records,
    normalize,
    resolve_corpus,
)
from rayembed.index.faiss_util import (
    METRIC,
    IndexSpec,
    add_vectors,
    center_of,
    corpus_center,
    new_index,
    prepare_vectors,
    train_index,
    write_floats_verified,
    write_index_verified,
)
from rayembed.index.lexical import (
    BM25Params,
    MultivectorEncodeFn,
    SparseEncodeFn,
    build_parts,
    check_parts,
    clear_parts,
    complete_parts,
    part_done,
)
from rayembed.index.manifest import (
    FORMAT,
    FORMAT_VERSION,
    KIND_DENSE,
    KIND_LEXICAL,
    MANIFEST,
    PLAN,
    TRAINED,
    IndexIntegrityError,
    file_record,
    is_valid,
    read_docs_part,
    read_json,
    verify_file,
)
from rayembed.io import atomic_path, atomic_write_json, atomic_write_parquet

logger = logging.getLogger(__name__)

DOCS_DIR = "docs"
SHARDS_DIR = "shards"

#: ``encode(ids, texts) -> (n, dim) float32``; ids are the global ids of the texts.
EncodeFn = Callable[[np.ndarray, list[str]], np.ndarray]


# ----------------------------------------------------------------------------- document sources


class DocSource:
    """Normalised documents (``doc_id, text, title, metadata``) in corpus order, in batches."""

    def __init__(self, batches: Callable[[], Iterator[list[dict[str, Any]]]], fp: dict[str, Any],
                 stats: dict[str, int], limit: int | None = None):
        self._batches = batches
        self.fingerprint = fp
        self.stats = stats
        self.limit = limit

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        self.stats.clear()
        left = self.limit
        for batch in self._batches():
            if left is not None:
                batch = batch[:left]
                left -= len(batch)
            if batch:
                yield batch
            if left is not None and left <= 0:
                return

    def count(self) -> int:
        return sum(len(b) for b in self.batches())


def docs_source(docs: Sequence[dict[str, Any]], mapping: ColumnMapping, limit: int | None = None) -> DocSource:
    """A source over an in-memory list of ``{id, text, title?}`` dicts."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    stats: dict[str, int] = {}

    def batches() -> Iterator[list[dict[str, Any]]]:
        rows = list(normalize(docs, mapping, stats=stats, source="docs"))
        for i in range(0, len(rows), 8192):
            yield rows[i : i + 8192]

    return DocSource(batches, {"in_memory_sha256": h.hexdigest(), "rows": len(docs)}, stats, limit)


def file_source(path: Path, fmt: str, mapping: ColumnMapping, limit: int | None = None) -> DocSource:
    """A source reading a corpus file in this process."""
    stats: dict[str, int] = {}

    def batches() -> Iterator[list[dict[str, Any]]]:
        buf: list[dict[str, Any]] = []
        for row in normalize(iter_records(path, fmt), mapping, stats=stats, source=str(path)):
            buf.append(row)
            if len(buf) >= 8192:
                yield buf
                buf = []
        if buf:
            yield buf

    return DocSource(batches, {**fingerprint(path), "format": fmt}, stats, limit)


# ----------------------------------------------------------------------------- the build


def _shard_name(i: int) -> str:
    return f"{SHARDS_DIR}/shard-{i:05d}.faiss"


def _docs_name(i: int) -> str:
    return f"{DOCS_DIR}/docs-{i:05d}.parquet"


def floats_name(shard_file: str) -> str:
    """The float32 rescoring copy beside a shard file: ``shards/shard-00000.faiss`` -> ``.npy``."""
    return str(Path(shard_file).with_suffix(".npy").as_posix())


def _docs_table(rows: list[dict[str, Any]], id_start: int):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(np.arange(id_start, id_start + len(rows), dtype=np.int64)),
            "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "title": pa.array([r["title"] for r in rows], pa.string()),
            "metadata": pa.array([r["metadata"] for r in rows], pa.string()),
        }
    )


def _write_faiss(index, path: Path) -> None:
    """Write, verify (size and a re-read), then rename into place: a truncated file never gets a name."""
    with atomic_path(path) as tmp:
        write_index_verified(index, tmp)


def write_floats(vectors: np.ndarray, path: Path) -> None:
    """Write the float32 rescoring copy, verify it, then rename it into place (like :func:`_write_faiss`)."""
    with atomic_path(path) as tmp:
        write_floats_verified(vectors, tmp)


def read_faiss(path: Path, *, what: str, binary: bool = False):
    """``faiss.read_index`` (``read_index_binary`` when ``binary``) with a clear error naming the
    file when it is damaged."""
    import faiss

    try:
        return (faiss.read_index_binary if binary else faiss.read_index)(str(path))
    except RuntimeError as e:
        raise IndexIntegrityError(
            f"{what} {path} cannot be read by faiss ({str(e).splitlines()[0][:200]}); it is corrupt or "
            "truncated. Delete it and rerun `rayembed index`."
        ) from e


class IndexBuild:
    """One build of ``out_dir``; see the module docstring for the steps."""

    def __init__(self, out_dir: str | os.PathLike, *, spec: IndexSpec, identity: dict[str, Any], dim: int,
                 shard_size: int = 100_000, num_shards: int = 0, config: dict[str, Any] | None = None,
                 extra_key: dict[str, Any] | None = None, overwrite: bool = False, use_gpu: str = "auto",
                 seed: int = 0, on_shard: Callable[[dict[str, Any]], None] | None = None, dense: bool = True):
        self.root = Path(out_dir).resolve()
        self.dense = dense
        self.spec = spec
        self.identity = identity
        self.dim = int(dim)
        self.shard_size = shard_size
        self.num_shards = num_shards
        self.config = config or {}
        self.extra_key = extra_key or {}
        self.overwrite = overwrite
        self.use_gpu = use_gpu
        self.seed = seed
        self.on_shard = on_shard
        self.plan: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    # ---- step 1: plan

    def _key(self, source: DocSource) -> dict[str, Any]:
        if not self.dense:
            return {"kind": KIND_LEXICAL, "corpus": source.fingerprint, "limit": source.limit,
                    "shard_size": self.shard_size, "num_shards": self.num_shards, **self.extra_key}
        ident = {k: v for k, v in self.identity.items() if k != "path"}
        return {
            "corpus": source.fingerprint,
            "limit": source.limit,
            "spec": self.spec.to_dict(),
            "embedder": ident,
            "dim": self.dim,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            **self.extra_key,
        }

    def _clear(self) -> None:
        """Remove the files a build owns (never anything else in the folder)."""
        for name in (MANIFEST, PLAN, TRAINED):
            (self.root / name).unlink(missing_ok=True)
        for sub in (DOCS_DIR, SHARDS_DIR):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        clear_parts(self.root)

    def prepare(self, source: DocSource) -> dict[str, Any]:
        """Reuse a matching plan whose id-map parts verify, or write a new one."""
        self.root.mkdir(parents=True, exist_ok=True)
        key = self._key(source)
        plan_path = self.root / PLAN
        if plan_path.exists():
            old = read_json(plan_path, what="build plan")
            if old.get("key") != key:
                diff = sorted(k for k in set(key) | set(old.get("key", {})) if key.get(k) != old.get("key", {}).get(k))
                if not self.overwrite:
                    raise IndexIntegrityError(
                        f"{self.root} holds a build with a different {', '.join(diff)} ({plan_path}). "
                        "Choose another index.output_dir, or set index.overwrite=true to replace it."
                    )
                logger.warning("Replacing the build in %s (different %s)", self.root, ", ".join(diff))
                self._clear()
            elif all(is_valid(self.root, s["docs"]) for s in old["shards"]):
                logger.info("Resuming the build in %s (%d shards planned)", self.root, len(old["shards"]))
                self.plan = old
                if old.get("spec_resolved"):
                    self.spec = IndexSpec(**old["spec_resolved"])
                return old
            else:
                logger.warning("Id-map parts in %s are damaged or missing; re-planning", self.root)
                self._clear()
        elif (self.root / MANIFEST).exists() or (self.root / SHARDS_DIR).exists():
            if not self.overwrite:
                raise IndexIntegrityError(
                    f"{self.root} holds index files but no {PLAN}; choose another index.output_dir or set "
                    "index.overwrite=true."
                )
            self._clear()
        self.plan = self._write_plan(source, key)
        return self.plan

    def _write_plan(self, source: DocSource, key: dict[str, Any]) -> dict[str, Any]:
        shard_size = self.shard_size
        if self.num_shards > 0:
            total = source.count()
            shard_size = max(1, math.ceil(total / self.num_shards))
        shards: list[dict[str, Any]] = []
        buf: list[dict[str, Any]] = []
        next_id = 0

        def flush(rows: list[dict[str, Any]]) -> None:
            nonlocal next_id
            i = len(shards)
            path = self.root / _docs_name(i)
            atomic_write_parquet(path, _docs_table(rows, next_id))
            shards.append({
                "index": i, "file": _shard_name(i), "rows": len(rows),
                "id_start": next_id, "id_end": next_id + len(rows), "docs": file_record(self.root, path),
            })
            next_id += len(rows)

        for batch in source.batches():
            buf.extend(batch)
            while len(buf) >= shard_size:
                flush(buf[:shard_size])
                buf = buf[shard_size:]
        if buf:
            flush(buf)
        if not shards:
            raise ValueError(
                f"The corpus has no non-empty documents ({source.stats.get('read', 0)} read, "
                f"{source.stats.get('empty', 0)} empty). Check index.corpus and index.text_field."
            )
        stats = dict(source.stats)
        if stats.get("empty"):
            logger.warning("Skipped %d empty documents of %d read", stats["empty"], stats["read"])
        if self.dense:
            self.spec = self.spec.resolve(next_id, self.dim)
        plan = {"key": key, "ntotal": next_id, "shards": shards, "stats": stats,
                "spec_resolved": self.spec.to_dict() if self.dense else None, "trained": None, "parts": {},
                "floats": self.dense and self.spec.keeps_floats}
        atomic_write_json(self.root / PLAN, plan)
        logger.info("Planned %d shards for %d documents in %s", len(shards), next_id, self.root)
        return plan

    @property
    def index_dim(self) -> int:
        """The stored dimension: ``spec.dims`` when set, else the embedder's."""
        return self.spec.index_dim(self.dim)

    @property
    def keeps_floats(self) -> bool:
        """Whether shards keep their float32 vectors: decided when the plan is written (a plan from
        before rescoring existed keeps none, so resuming it writes shards like its first ones)."""
        return bool(self.plan.get("floats"))

    @property
    def center(self) -> np.ndarray | None:
        """The binary centre (index_dim,) recorded when training; None for other storages."""
        return center_of(self.plan.get("center"))

    # ---- step 2: train

    def sample_texts(self, include_title: bool = True) -> tuple[np.ndarray, list[str]]:
        """Global ids and texts of ``spec.train_size`` documents drawn uniformly (seeded) from the id map."""
        n = self.plan["ntotal"]
        rng = np.random.default_rng(self.seed)
        ids = np.sort(rng.choice(n, size=min(self.spec.train_size, n), replace=False))
        starts = [s["id_start"] for s in self.plan["shards"]]
        texts: list[str] = []
        for si, shard in enumerate(self.plan["shards"]):
            lo = bisect.bisect_left(ids, shard["id_start"])
            hi = bisect.bisect_left(ids, shard["id_end"])
            if lo == hi:
                continue
            table = read_docs_part(self.root, shard, ["text", "title"])
            local = ids[lo:hi] - starts[si]
            t = table.column("text").take(local).to_pylist()
            ti = table.column("title").take(local).to_pylist()
            texts.extend(encode_text(a, b, include_title) for a, b in zip(t, ti))
        return ids, texts

    def needs_training(self) -> bool:
        return self.dense and self.spec.trained and not is_valid(self.root, self.plan.get("trained"))

    def train(self, vectors: np.ndarray) -> None:
        """Train the empty index on ``vectors`` (n, dim) and save it as ``trained.index``."""
        self._check_vectors(vectors)
        vectors = prepare_vectors(vectors, self.spec)
        center = corpus_center(vectors) if self.spec.binary else None
        index = new_index(self.spec, self.index_dim)
        t = time.perf_counter()
        train_index(index, vectors, self.use_gpu, center)
        path = self.root / TRAINED
        _write_faiss(index, path)
        self.plan["trained"] = file_record(self.root, path)
        self.plan["center"] = center.tolist() if center is not None else None
        atomic_write_json(self.root / PLAN, self.plan)
        logger.info("Trained %s on %d vectors in %.1fs", self.spec.factory_string(), len(vectors), time.perf_counter() - t)

    def empty_index(self):
        """A fresh copy of the empty (trained) index that shards add to."""
        if self.spec.trained:
            path = verify_file(self.root, self.plan["trained"], what="trained index")
            return read_faiss(path, what="trained index", binary=self.spec.binary)
        return new_index(self.spec, self.index_dim)

    # ---- step 3: shards

    def _sidecar(self, shard: dict[str, Any]) -> Path:
        return (self.root / shard["file"]).with_suffix(".json")

    def shard_done(self, shard: dict[str, Any]) -> bool:
        """A shard is done when its sidecar matches the plan and its file matches the sidecar."""
        side = self._sidecar(shard)
        if not side.is_file():
            return False
        try:
            rec = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        same = all(rec.get(k) == shard[k] for k in ("file", "rows", "id_start", "id_end"))
        floats = not self.keeps_floats or is_valid(self.root, rec.get("vectors"))
        return (same and floats and rec.get("docs", {}).get("sha256") == shard["docs"]["sha256"]
                and is_valid(self.root, rec))

    def missing_shards(self) -> list[dict[str, Any]]:
        if not self.dense:
            return []
        return [s for s in self.plan["shards"] if not self.shard_done(s)]

    def is_complete(self, parts: Sequence[str] = ("dense",)) -> bool:
        """The manifest exists, every shard is done and every requested extra part is complete."""
        if not (self.root / MANIFEST).exists() or self.missing_shards():
            return False
        extra = [p for p in parts if p != "dense"]
        if not extra:
            return True
        try:
            listed = read_json(self.root / MANIFEST, what="index manifest").get("parts") or {}
        except IndexIntegrityError:
            return False
        return all(p in listed and part_done(self.root, self.plan, p) for p in extra)

    def _check_vectors(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"Encoder returned vectors of shape {vectors.shape}; expected (n, {self.dim}).")
        if not np.isfinite(vectors).all():
            raise ValueError("Encoder returned NaN or infinite values; refusing to index them.")

    def writer(self) -> ShardWriter:
        return ShardWriter(self)

    def write_shard(self, shard: dict[str, Any], ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (rows, dim) under global ``ids`` to a trained copy; write shard, then sidecar."""
        order = np.argsort(ids, kind="stable")
        ids = np.ascontiguousarray(ids[order], dtype=np.int64)  # (rows,)
        vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)  # (rows, dim)
        expect = np.arange(shard["id_start"], shard["id_end"], dtype=np.int64)
        if len(ids) != len(expect) or not np.array_equal(ids, expect):
            raise RuntimeError(
                f"Shard {shard['file']} got {len(ids)} rows but needs ids [{shard['id_start']}, {shard['id_end']}); "
                "the encoder lost or duplicated rows."
            )
        self._check_vectors(vectors)
        vectors = prepare_vectors(vectors, self.spec)  # (rows, index_dim)
        index = self.empty_index()
        add_vectors(index, vectors, ids, self.center)
        path = self.root / shard["file"]
        _write_faiss(index, path)
        side = {k: shard[k] for k in ("file", "rows", "id_start", "id_end", "docs")}
        side.update(file_record(self.root, path))
        if self.keeps_floats:
            fpath = self.root / floats_name(shard["file"])
            write_floats(vectors, fpath)
            side["vectors"] = file_record(self.root, fpath)
        atomic_write_json(self._sidecar(shard), side)
        logger.info("Wrote %s (%d vectors, ids %d..%d)", shard["file"], shard["rows"], shard["id_start"], shard["id_end"] - 1)
        if self.on_shard is not None:
            self.on_shard(side)

    # ---- step 4: manifest

    def finish(self, corpus_info: dict[str, Any] | None = None) -> Path:
        """Verify every shard and write ``manifest.json`` (last)."""
        missing = self.missing_shards()
        if missing:
            raise IndexIntegrityError(
                f"{len(missing)} shards of {self.root} are still missing or invalid (first: {missing[0]['file']}); "
                "rerun the build to finish them."
            )
        parts = complete_parts(self.root, self.plan)
        if not self.dense:
            return self._finish_lexical(parts, corpus_info)
        shards = []
        for s in self.plan["shards"]:
            side = json.loads(self._sidecar(s).read_text())
            shards.append({k: side[k] for k in ("file", "rows", "id_start", "id_end", "bytes", "sha256", "docs",
                                                "vectors") if k in side})
        manifest = {
            "kind": KIND_DENSE,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.index_dim,
            "embedder_dim": self.dim,
            "center": self.plan.get("center"),
            "metric": METRIC,
            "index_type": self.spec.index_type,
            "storage": self.spec.storage,
            "factory": self.spec.factory_string(),
            "spec": self.spec.to_dict(),
            "ntotal": self.plan["ntotal"],
            "num_shards": len(shards),
            "shards": shards,
            "trained": self.plan.get("trained"),
            "parts": parts,
            "embedder": self.identity,
            # What to load to query this index: a registered name, a hub id or a saved folder.
            "embedder_name": (corpus_info or {}).pop("embedder_name", None)
            or self.identity.get("path") or self.identity.get("base_model"),
            "corpus": {**(corpus_info or {}), **self.plan["key"]["corpus"], "stats": self.plan["stats"]},
            "config": self.config,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = atomic_write_json(self.root / MANIFEST, manifest)
        logger.info("Index complete: %d vectors in %d shards%s, %s (%.1fs)", manifest["ntotal"], len(shards),
                    f" + {', '.join(parts)}" if parts else "", path, time.perf_counter() - self._t0)
        return path

    def _finish_lexical(self, parts: dict[str, Any], corpus_info: dict[str, Any] | None) -> Path:
        if "bm25" not in parts:
            raise IndexIntegrityError(f"The bm25 part of {self.root} is missing or invalid; rerun the build.")
        info = dict(corpus_info or {})
        info.pop("embedder_name", None)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": KIND_LEXICAL,
            "ntotal": self.plan["ntotal"],
            "num_shards": len(self.plan["shards"]),
            "shards": [{k: s[k] for k in ("rows", "id_start", "id_end", "docs")} for s in self.plan["shards"]],
            "parts": parts,
            "embedder": None,
            "embedder_name": None,
            "corpus": {**info, **self.plan["key"]["corpus"], "stats": self.plan["stats"]},
            "config": self.config,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = atomic_write_json(self.root / MANIFEST, manifest)
        logger.info("BM25 index complete: %d documents, %s (%.1fs)", manifest["ntotal"], path,
                    time.perf_counter() - self._t0)
        return path


class ShardWriter:
    """Collects ``(ids, vectors)`` batches in any order and writes each shard once it is complete."""

    def __init__(self, build: IndexBuild):
        self.build = build
        self.pending = {s["index"]: s for s in build.missing_shards()}
        self.starts = [s["id_start"] for s in build.plan["shards"]]
        self.buf: dict[int, tuple[list[np.ndarray], list[np.ndarray], int]] = {}
        self.rows = 0
        self.t0 = time.perf_counter()
        self.last_log = self.t0

    def add(self, ids: np.ndarray, vectors: np.ndarray, log_every_s: float = 10.0) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for si in np.unique(shard_of):
            if si not in self.pending:
                raise RuntimeError(f"Got vectors for shard {si}, which is not being built; ids {ids[:3]}...")
            sel = shard_of == si
            id_list, vec_list, n = self.buf.get(si, ([], [], 0))
            id_list.append(ids[sel])
            vec_list.append(vectors[sel])
            n += int(sel.sum())
            self.buf[si] = (id_list, vec_list, n)
            shard = self.pending[si]
            if n >= shard["rows"]:
                self.build.write_shard(shard, np.concatenate(id_list), np.concatenate(vec_list))
                del self.buf[si]
                del self.pending[si]
        self.rows += len(ids)
        now = time.perf_counter()
        if now - self.last_log >= log_every_s:
            logger.info("Encoded %d documents, %.1f docs/s; %d shards left", self.rows,
                        self.rows / (now - self.t0), len(self.pending))
            self.last_log = now

    def close(self) -> None:
        if self.pending:
            first = next(iter(self.pending.values()))
            got = self.buf.get(first["index"], ([], [], 0))[2]
            raise RuntimeError(
                f"Encoding ended with {len(self.pending)} shards incomplete (e.g. {first['file']}: {got} of "
                f"{first['rows']} rows). Rerun the build to resume."
            )


# ----------------------------------------------------------------------------- in-process path


def _embedder(embedder_or_path: Any, **load_kwargs: Any):
    if isinstance(embedder_or_path, (str, os.PathLike)):
        from rayembed.modeling.embedder import Embedder

        return Embedder.from_pretrained(embedder_or_path, **load_kwargs)
    return embedder_or_path


def build_index_in_process(
    embedder_or_path: Any,
    docs: Sequence[dict[str, Any]] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    index_type: str = "flat",
    num_shards: int = 1,
    shard_size: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    doc_instruction: str | None = None,
    format: str = "auto",
    mapping: ColumnMapping | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    use_gpu: str = "auto",
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    parts: Sequence[str] = ("dense",),
    bm25: Any = None,
    **index_opts: Any,
) -> Path:
    """Encode ``docs`` with one Embedder in this process (no Ray) and write a sharded index.

    ``docs`` is a list of ``{"id", "text", "title"?}`` dicts or a corpus path (JSONL, Parquet, BEIR,
    SMART). ``index_opts`` are :class:`IndexSpec` fields (storage, nlist, nprobe, pq_m, hnsw_m, ...).
    ``parts``: any of ``dense`` (FAISS shards), ``bm25``, ``sparse``, ``multivector`` (see
    :mod:`rayembed.index.lexical`); sparse and multivector need the embedder's heads. Without
    ``dense`` only ``bm25`` may be asked for, and ``embedder_or_path`` may be None (no model).
    ``bm25``: :class:`~rayembed.index.lexical.BM25Params` or a config with k1, b, stopwords, stemmer.
    Returns the path of ``manifest.json``. Same protocol and resumability as :func:`build_index`:
    a rerun builds only the missing shards and parts, so parts can be added to a built index.
    """
    parts = check_parts(parts)
    mapping = mapping or ColumnMapping()
    if "dense" not in parts:
        return build_lexical_index(docs, out_dir, bm25=bm25, num_shards=num_shards, shard_size=shard_size,
                                   format=format, mapping=mapping, limit=limit, overwrite=overwrite)
    if embedder_or_path is None:
        raise ValueError(f"parts={list(parts)} need an embedder; only a BM25-only index (parts=['bm25']) needs none.")
    emb = _embedder(embedder_or_path)

    def encode(ids: np.ndarray, texts: list[str]) -> np.ndarray:
        return emb.encode(texts, instruction=doc_instruction, batch_size=batch_size, max_length=max_length,
                          show_progress=False)

    part_encoders = embedder_part_encoders(emb, parts, doc_instruction=doc_instruction, batch_size=batch_size,
                                           max_length=max_length)
    return build_with_encoder(
        encode, emb.identity(), emb.dim, docs, out_dir, index_type=index_type, num_shards=num_shards,
        shard_size=shard_size, format=format, mapping=mapping, limit=limit, overwrite=overwrite,
        use_gpu=use_gpu, on_shard=on_shard, batch_size=max(batch_size, 256),
        embedder_name=str(embedder_or_path) if isinstance(embedder_or_path, (str, os.PathLike))
        else (getattr(emb, "source", None) or emb.config.base_model),
        extra_key={"doc_instruction": doc_instruction, "include_title": mapping.include_title,
                   "max_length": max_length},
        parts=parts, bm25=bm25, **part_encoders,
        **index_opts,
    )


def embedder_part_encoders(emb: Any, parts: Sequence[str], *, doc_instruction: str | None = None,
                           batch_size: int = 32, max_length: int | None = None) -> dict[str, Any]:
    """``sparse_encode`` / ``multivector_encode`` functions of ``emb`` for the requested parts.

    Checks up front that the embedder has the heads, so a build does not fail after its shards.
    """
    out: dict[str, Any] = {}
    for part, flag, key in (("sparse", "has_sparse", "sparse_encode"),
                            ("multivector", "has_multivector", "multivector_encode")):
        if part not in parts:
            continue
        if not getattr(emb, flag, False):
            raise ValueError(
                f"index part '{part}' needs an embedder with a {part} head, and {getattr(emb, 'source', None) or 'this embedder'} "
                f"has none. Train one with model.heads.{part}=true, or drop '{part}' from index.parts."
            )
        method = getattr(emb, f"encode_{part}")

        def fn(texts: list[str], _m=method) -> Any:
            return _m(texts, instruction=doc_instruction, batch_size=batch_size, max_length=max_length)

        out[key] = fn
    return out


def build_lexical_index(
    docs: Sequence[dict[str, Any]] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    bm25: Any = None,
    num_shards: int = 1,
    shard_size: int | None = None,
    format: str = "auto",
    mapping: ColumnMapping | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    source: DocSource | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A BM25-only index (``manifest["kind"] == "lexical"``): the id map and the ``bm25`` part, no model.

    Search it with :class:`rayembed.search.HybridSearcher` (``methods={"bm25": 1}``).
    """
    mapping = mapping or ColumnMapping()
    if source is None:
        if isinstance(docs, (str, os.PathLike)):
            path, fmt = resolve_corpus(docs, format)
            source = file_source(path, fmt, mapping, limit)
        else:
            source = docs_source(list(docs), mapping, limit)
    params = BM25Params.from_config(bm25)
    build = IndexBuild(out_dir, spec=IndexSpec(), identity={}, dim=0, shard_size=shard_size or 100_000,
                       num_shards=0 if shard_size else num_shards, dense=False, overwrite=overwrite,
                       config=config or {"parts": ["bm25"], "num_shards": num_shards, "bm25": params.to_dict()},
                       extra_key={"include_title": mapping.include_title})
    build.prepare(source)
    if build.is_complete(("bm25",)) and part_done(build.root, build.plan, "bm25",
                                                  {**params.to_dict(), "include_title": mapping.include_title}):
        logger.info("Index in %s is already complete", build.root)
        return build.root / MANIFEST
    build_parts(build, ("bm25",), include_title=mapping.include_title, bm25=params, overwrite=overwrite)
    return build.finish({"mapping": mapping.__dict__})


def build_with_encoder(
    encode: EncodeFn,
    identity: dict[str, Any],
    dim: int,
    docs: Sequence[dict[str, Any]] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    index_type: str = "flat",
    num_shards: int = 1,
    shard_size: int | None = None,
    format: str = "auto",
    mapping: ColumnMapping | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    use_gpu: str = "auto",
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    batch_size: int = 1024,
    extra_key: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    embedder_name: str | None = None,
    parts: Sequence[str] = ("dense",),
    bm25: Any = None,
    sparse_encode: SparseEncodeFn | None = None,
    multivector_encode: MultivectorEncodeFn | None = None,
    **index_opts: Any,
) -> Path:
    """The in-process build with any ``encode(texts) -> (n, dim)`` function (e.g. precomputed vectors).

    ``identity`` is recorded in the manifest as the embedder's identity. ``parts`` as for
    :func:`build_index_in_process`; ``sparse_encode(texts) -> csr (n, vocab)`` and
    ``multivector_encode(texts) -> [(tokens_i, dim), ...]`` encode the sparse and multivector parts.
    """
    parts = check_parts(parts)
    if "dense" not in parts:
        raise ValueError("build_with_encoder builds a dense index; use build_lexical_index for parts=['bm25'].")
    mapping = mapping or ColumnMapping()
    if isinstance(docs, (str, os.PathLike)):
        path, fmt = resolve_corpus(docs, format)
        source = file_source(path, fmt, mapping, limit)
    else:
        source = docs_source(list(docs), mapping, limit)
    spec = IndexSpec(index_type=index_type, **index_opts)
    build = IndexBuild(out_dir, spec=spec, identity=identity, dim=dim,
                       shard_size=shard_size or 100_000, num_shards=0 if shard_size else num_shards,
                       config=config or {"index_type": index_type, "num_shards": num_shards, **index_opts},
                       extra_key=extra_key, overwrite=overwrite, use_gpu=use_gpu, on_shard=on_shard)
    build.prepare(source)
    bm25_params = BM25Params.from_config(bm25)
    if build.is_complete(parts) and ("bm25" not in parts or part_done(
            build.root, build.plan, "bm25", {**bm25_params.to_dict(), "include_title": mapping.include_title})):
        logger.info("Index in %s is already complete", build.root)
        return build.root / MANIFEST
    if build.needs_training():
        build.train(encode(*build.sample_texts(mapping.include_title)))
    writer = build.writer()
    for shard in list(writer.pending.values()):
        table = read_docs_part(build.root, shard, ["id", "text", "title"])
        ids = table.column("id").to_numpy()
        texts = [encode_text(t, ti, mapping.include_title)
                 for t, ti in zip(table.column("text").to_pylist(), table.column("title").to_pylist())]
        for i in range(0, len(texts), batch_size):
            writer.add(ids[i : i + batch_size], encode(ids[i : i + batch_size], texts[i : i + batch_size]))
    writer.close()
    build_parts(build, parts, include_title=mapping.include_title, bm25=bm25_params, sparse_encode=sparse_encode,
                multivector_encode=multivector_encode, overwrite=overwrite)
    return build.finish({"mapping": mapping.__dict__, "embedder_name": embedder_name})


def build_index_from_vectors(vectors: np.ndarray, out_dir: str | os.PathLike, *,
                             docs: Sequence[dict[str, Any]] | None = None,
                             identity: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Index precomputed vectors (n, dim); documents default to ``{"id": str(i), "text": "doc i"}``.

    Useful for benchmarks and tests, and for vectors encoded elsewhere. Row i gets global id i,
    so every document must be non-empty.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
    if docs is None:
        docs = [{"id": str(i), "text": f"doc {i}"} for i in range(len(vectors))]
    if len(docs) != len(vectors):
        raise ValueError(f"{len(docs)} documents but {len(vectors)} vectors; pass one document per vector.")
    if any(not str(d.get("text", "")).strip() for d in docs):
        raise ValueError("build_index_from_vectors needs non-empty texts: global ids are row numbers.")

    def encode(ids: np.ndarray, texts: list[str]) -> np.ndarray:
        return vectors[ids]

    ident = identity or {"path": None, "precomputed_sha256": hashlib.sha256(vectors.tobytes()).hexdigest()}
    return build_with_encoder(encode, ident, vectors.shape[1], docs, out_dir, **kwargs)


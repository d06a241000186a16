"""Searching a sharded index: open and verify, search every shard, merge the top-k.

Example::

    idx = ShardedIndex.open("runs/demo/index", expected_embedder=emb)
    scores, ids = idx.search(emb.encode_queries(["what is faiss"], instruction), k=10)  # (1, 10), (1, 10)
    docs = idx.get_documents(ids[0])      # [{"id", "doc_id", "text", "title", ...}, ...]

Compact indexes (``index.storage`` sq8 or binary, see :mod:`rayembed.index.faiss_util`) are
searched for ``rescore_k`` candidates per shard (Hamming distance for binary), which are then
re-scored by exact inner products with the float32 vectors memory-mapped from each shard's
``.npy`` before the usual merge; ``idx.search(q, 10, rescore_k=40)`` sets the depth per query.
An index built with ``index.dims`` takes queries of the embedder's full dimension and cuts them
to the stored one (first ``dims`` coordinates, re-normalised).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.builder import read_faiss
from rayembed.index.faiss_util import (
    IndexSpec,
    bitmap_selector,
    center_of,
    encode_binary,
    gpu_available,
    inner_index,
    new_index,
    selector_params,
    set_search_params,
    to_gpu,
)
from rayembed.index.manifest import (
    KIND_LEXICAL,
    MANIFEST,
    IndexIntegrityError,
    check_manifest,
    identity_of,
    kind_of,
    local_index_dir,
    read_docs_part,
    read_json,
    same_embedder,
    verify_file,
)

logger = logging.getLogger(__name__)

#: Candidate vectors gathered at a time when re-scoring (bounds the memory of large query batches).
RESCORE_BLOCK = 16384


class DocStore:
    """The Parquet id map of an index: documents by global id, one part per shard, read on demand."""

    def __init__(self, root: Path, shards: list[dict[str, Any]], ntotal: int):
        self.root = root
        self._shards = shards
        self.ntotal = int(ntotal)
        self._starts = np.array([s["id_start"] for s in shards], dtype=np.int64)
        self._tables: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _part(self, si: int):
        with self._lock:
            table = self._tables.get(si)
            if table is None:
                table = read_docs_part(self.root, self._shards[si])
                self._tables[si] = table
        return table

    def get(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """Documents of global ``ids`` in order; None for id -1 (see :meth:`ShardedIndex.get_documents`)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        bad = ids[(ids != -1) & ((ids < 0) | (ids >= self.ntotal))]
        if len(bad):
            raise KeyError(f"id {int(bad[0])} is not in this index (0..{self.ntotal - 1}).")
        out: list[dict[str, Any] | None] = [None] * len(ids)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for si in np.unique(shard_of[ids >= 0]):
            pos = np.flatnonzero((shard_of == si) & (ids >= 0))
            rows = self._part(int(si)).take(ids[pos] - self._starts[si]).to_pylist()
            for p, row in zip(pos.tolist(), rows):
                doc = {"id": int(row["id"]), "doc_id": row["doc_id"], "text": row["text"], "title": row["title"] or ""}
                if row.get("metadata"):
                    doc["metadata"] = json.loads(row["metadata"])
                out[p] = doc
        return out


class ShardedIndex:
    """The shards of one index, searched together. Scores are inner products (cosine on unit vectors)."""

    def __init__(self, root: Path, manifest: dict[str, Any], shards: list[Any], version: str, use_gpu: bool,
                 live: np.ndarray | None = None, floats: list[np.ndarray | None] | None = None):
        self.root = root
        self.manifest = manifest
        self._shards = shards
        self.version = version
        self.on_gpu = use_gpu
        self.spec = IndexSpec(**manifest["spec"])
        self.binary = self.spec.binary
        # Binary codes are taken of the vector less this centre (the training sample's mean).
        self.center = center_of(manifest.get("center"))
        # Per shard: its float32 vectors (rows, index_dim), memory-mapped, for rescoring; None: not kept.
        self._floats = list(floats) if floats is not None else [None] * len(shards)
        # IndexBinaryIVF takes no search parameters, hence no IDSelector: filter by over-fetching.
        self._overfetch = self.binary and self.spec.index_type == "ivf_flat"
        self._starts = np.array([s["id_start"] for s in manifest["shards"]], dtype=np.int64)
        self.docs = DocStore(root, manifest["shards"], manifest["ntotal"])
        self._lock = threading.Lock()
        # Tombstoned ids (deleted or replaced by `rayembed index update`) are skipped inside FAISS
        # by a bitmap selector over live ids; None when every id is live.
        self._live = live
        self._live_sel = bitmap_selector(live) if live is not None else None
        self._params = (None, None)
        self._pool = ThreadPoolExecutor(max_workers=min(len(shards), os.cpu_count() or 1)) if len(shards) > 1 else None
        # IVF shards share one trained coarse quantizer: each query is assigned to its nprobe lists
        # once, then every shard scans only its own lists for them (search_preassigned), and the
        # per-shard top-k are merged: the results of one index over all the lists, at about its cost.
        self._ivfs = None
        if len(shards) > 1 and self.spec.index_type in ("ivf_flat", "ivf_pq") and not use_gpu and not self.binary:
            self._ivfs = self._shared_ivf(shards)
        # Few queries on big flat shards: faiss uses one thread per query, so search shards in parallel.
        self._scan_heavy = self.spec.index_type == "flat" and self.ntotal / max(len(shards), 1) >= 50_000
        self.set_search_params(nprobe=self.spec.nprobe, ef_search=self.spec.ef_search)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True, expected_embedder: Any = None,
             use_gpu: str | bool = "auto") -> ShardedIndex:
        """Open an index directory (or its ``manifest.json``), checking files against the manifest.

        With ``verify`` every shard and id-map part must match its recorded sha256; without it
        only sizes are checked. ``expected_embedder`` (an Embedder or identity dict) must match
        the embedder the index was built with.
        """
        p = Path(path) if isinstance(path, Path) else local_index_dir(path)
        manifest_path = p / MANIFEST if p.is_dir() else p
        root = manifest_path.parent.resolve()
        raw = manifest_path.read_bytes() if manifest_path.is_file() else None
        m = read_json(manifest_path, what="index manifest")
        check_manifest(m, manifest_path)
        if kind_of(m) == KIND_LEXICAL:
            raise IndexIntegrityError(
                f"Index {manifest_path} is a BM25-only index (kind 'lexical'): it holds no dense vectors. "
                "Search it with rayembed.search.HybridSearcher (methods={'bm25': 1}), or rebuild it with "
                "the dense part (index.parts=[dense, bm25])."
            )
        if expected_embedder is not None:
            want = identity_of(expected_embedder)
            if not same_embedder(m["embedder"], want):
                raise IndexIntegrityError(
                    f"Index {manifest_path} was built with embedder {m['embedder'].get('path') or m['embedder']} "
                    f"(config {str(m['embedder'].get('config_sha256'))[:12]}, weights "
                    f"{str(m['embedder'].get('weights_sha256'))[:12]}), not with the expected "
                    f"{want.get('path') or want} (config {str(want.get('config_sha256'))[:12]}, weights "
                    f"{str(want.get('weights_sha256'))[:12]}). Its vectors are not comparable: query it with "
                    "the embedder it was built with, or rebuild it with `rayembed index`."
                )
        from rayembed.index.update import live_mask

        live = live_mask(root, m, verify=verify)
        binary = IndexSpec(**m["spec"]).binary
        if binary and (m.get("center") is None or len(m["center"]) != m["dim"]):
            raise IndexIntegrityError(
                f"Binary index {manifest_path} lacks its centre ('center', {m['dim']} floats); the manifest is "
                "damaged. Rebuild the index."
            )
        # FAISS GPU indexes take no IDSelector; binary shards stay on the CPU.
        gpu = gpu_available(use_gpu) and live is None and not binary
        shards, floats = [], []
        for i, rec in enumerate(m["shards"]):
            what = f"shard {i}"
            path_i = verify_file(root, rec, what=what, check_hash=verify)
            verify_file(root, rec["docs"], what=f"id map of shard {i}", check_hash=verify)
            index = read_faiss(path_i, what=what, binary=binary)
            if index.d != m["dim"] or index.ntotal != rec["rows"]:
                raise IndexIntegrityError(
                    f"{what} {path_i} holds {index.ntotal} vectors of dim {index.d}, but the manifest "
                    f"{manifest_path} says {rec['rows']} of dim {m['dim']}. The manifest does not match; rebuild."
                )
            shards.append(to_gpu(index, use_gpu) if gpu else index)
            floats.append(_open_floats(root, rec, int(m["dim"]), what=f"float vectors of shard {i}", verify=verify))
        version = hashlib.sha256(raw or b"").hexdigest()[:16]
        logger.info("Opened index %s: %d vectors, %d shards, %s, version %s", root, m["ntotal"], len(shards),
                    m.get("factory"), version)
        return cls(root, m, shards, version, gpu, live, floats)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """The dimension of the queries :meth:`search` takes: the embedder's (see :attr:`index_dim`)."""
        return int(self.manifest.get("embedder_dim") or self.manifest["dim"])

    @property
    def index_dim(self) -> int:
        """The stored dimension: ``index.dims`` when the index was built with it, else :attr:`dim`."""
        return int(self.manifest["dim"])

    @property
    def has_floats(self) -> bool:
        """Whether every shard keeps its float32 vectors, so that candidates can be re-scored."""
        return bool(self._floats) and all(f is not None for f in self._floats)

    @property
    def ntotal(self) -> int:
        return int(self.manifest["ntotal"])

    @property
    def live_count(self) -> int:
        """Ids a search can return: ntotal less the tombstoned ones."""
        return self.ntotal if self._live is None else int(self._live.sum())

    @property
    def manifest_version(self) -> int:
        """1 for a fresh build, +1 for each update or compaction (``version`` is the manifest hash)."""
        return int(self.manifest.get("version", 1))

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def embedder_identity(self) -> dict[str, Any]:
        return dict(self.manifest["embedder"])

    @property
    def shards(self) -> list[Any]:
        return list(self._shards)

    def __repr__(self) -> str:
        return (f"ShardedIndex({str(self.root)!r}, ntotal={self.ntotal}, dim={self.index_dim}, "
                f"shards={self.num_shards}, type={self.manifest.get('factory')!r}, version={self.version!r})")

    # ------------------------------------------------------------------ search

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the defaults used when :meth:`search` gets no nprobe / ef_search."""
        with self._lock:
            self._apply(nprobe, ef_search)
            self._default = (nprobe if nprobe is not None else self._params[0],
                             ef_search if ef_search is not None else self._params[1])

    def _apply(self, nprobe: int | None, ef_search: int | None) -> None:
        if (nprobe, ef_search) == self._params:
            return
        for s in self._shards:
            set_search_params(s, nprobe=nprobe, ef_search=ef_search)
        if self._ivfs is not None and nprobe is not None:
            # FAISS probes at most nlist lists; the shared assignment is taken that wide.
            for ivf in self._ivfs:
                ivf.nprobe = max(1, min(int(nprobe), int(ivf.nlist)))
        self._params = (nprobe, ef_search)

    def prepare_queries(self, query_vectors: np.ndarray) -> np.ndarray:
        """Queries as the shards hold vectors: (n, index_dim) float32. Queries of the embedder's
        dimension are cut to ``index.dims`` and re-normalised (as the documents were); queries that
        already have the stored dimension are taken as they are."""
        from rayembed.index.quantize import truncate

        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        shapes = f"(n, {self.dim})" + (f" or (n, {self.index_dim})" if self.index_dim != self.dim else "")
        if q.ndim != 2 or q.shape[1] not in (self.dim, self.index_dim):
            raise ValueError(f"query_vectors must have shape {shapes}; got {np.shape(query_vectors)}.")
        if q.shape[1] != self.index_dim:
            q = truncate(q, self.index_dim)
        return np.ascontiguousarray(q)

    def _rescore_depth(self, k: int, rescore_k: int | None) -> int:
        """Candidates to re-score for a top-``k`` search: 0 (none) or at least ``k``."""
        r = self.spec.default_rescore_k(k) if rescore_k is None else int(rescore_k)
        if r < 0:
            raise ValueError(f"rescore_k must be >= 0 (0: no rescoring), got {rescore_k}.")
        if r == 0:
            return 0
        if not self.has_floats:
            if rescore_k is None:  # the default of an index built without float vectors
                return 0
            raise ValueError(
                f"rescore_k={rescore_k} needs the float vectors kept beside the shards, and index {self.root} "
                f"(storage {self.spec.storage}) has none. Rebuild it with index.storage sq8 or binary and "
                "index.rescore_k not 0, or search without rescore_k."
            )
        return max(r, k)

    def search(self, query_vectors: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None, allowed: np.ndarray | None = None,
               filter: dict[str, Any] | None = None, rescore_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over all shards: scores (n, k) float32 and global ids (n, k) int64.

        Where fewer than ``k`` results exist the id is -1 and the score -inf. Tombstoned ids are
        never returned. ``allowed`` ((ntotal,) bool, e.g. from a metadata filter) restricts the
        search to those ids inside FAISS (an IDSelector), so a filter costs no over-fetching
        (except on binary IVF shards: ``IndexBinaryIVF`` takes no search parameters, so there the
        search fetches deeper, doubling until enough allowed ids are found, and drops the others).
        ``filter``: a metadata filter (see :mod:`rayembed.index.filters`), compiled to ``allowed``
        over the index's field index; a bad one raises :class:`~rayembed.index.filters.FilterError`.

        ``query_vectors``: (n, :attr:`dim`), or already cut to (n, :attr:`index_dim`) (see
        :meth:`prepare_queries`). ``rescore_k`` (sq8 and binary indexes with float vectors):
        search that many candidates per shard (at least ``k``; IVF shards sharing one quantizer give
        that many in all, as one index would) and re-score them with exact float32 inner products;
        0 returns the compact scores (SQ8 inner products, or ``index_dim - 2 * hamming`` for binary:
        the inner product of the ±1 sign vectors). None: the index's ``rescore_k``, whose default
        is ``4 * k`` where float vectors are kept.
        """
        q = self.prepare_queries(query_vectors)  # (n, index_dim)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        n = q.shape[0]
        sel = self._live_sel
        mask = self._live  # ids a search may return; None: all
        if filter is not None:
            fmask = self.filter_mask(filter)
            allowed = fmask if allowed is None else (np.asarray(allowed, dtype=bool) & fmask)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != (self.ntotal,):
                raise ValueError(f"allowed must be a bool mask of shape ({self.ntotal},); got {allowed.shape}.")
            if self.on_gpu:
                raise ValueError("Filtered search needs the index on the CPU (FAISS GPU indexes take no IDSelector); "
                                 "open it with use_gpu='false'.")
            if self._live is not None:
                allowed = allowed & self._live
            mask = allowed
            sel = bitmap_selector(allowed)
            kk = min(k, int(allowed.sum()))
        else:
            kk = min(k, self.live_count)
        if kk == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        rk = self._rescore_depth(kk, rescore_k)
        depth = max(kk, rk)
        x = encode_binary(q, self.center) if self.binary else q  # (n, index_dim / 8) uint8 codes for binary
        with self._lock:
            eff = (nprobe if nprobe is not None else self._default[0],
                   ef_search if ef_search is not None else self._default[1])
            self._apply(*eff)
            if sel is not None and self._overfetch:
                def raw(s):
                    return _search_dropping(s, x, depth, mask)
            elif sel is not None:
                def raw(s):
                    return s.search(x, depth, params=selector_params(s, sel[0], nprobe=eff[0], ef_search=eff[1]))
            else:
                def raw(s):
                    return s.search(x, depth)

            def one(s):
                d, i = raw(s)
                if self.binary:  # Hamming distance -> inner product of the ±1 sign vectors
                    d = (self.index_dim - 2 * d.astype(np.int64)).astype(np.float32)
                return d, i

            if self._ivfs is not None:
                parts = [self._search_ivf(x, depth, sel[0] if sel is not None else None)]
            elif self._pool is None or n >= 64 or not self._scan_heavy:
                # Large batches: each shard already uses every core (OpenMP over queries).
                # IVF/HNSW single queries: a shard takes microseconds, less than a thread hop.
                parts = [one(s) for s in self._shards]
            else:
                parts = list(self._pool.map(one, self._shards))
        scores = np.concatenate([p[0] for p in parts], axis=1)  # (n, parts * depth)
        ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)  # (n, parts * depth)
        if rk:
            scores = self._rescore(q, ids)
        if len(parts) > 1 or scores.shape[1] != kk or rk:
            scores = np.where(ids < 0, -np.inf, scores)
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if scores.shape[1] > kk else \
                np.broadcast_to(np.arange(scores.shape[1]), (n, scores.shape[1]))
            scores = np.take_along_axis(scores, top, axis=1)
            ids = np.take_along_axis(ids, top, axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        ids = ids.astype(np.int64)
        if kk < k:
            scores = np.concatenate([scores, np.full((n, k - kk), -np.inf, np.float32)], axis=1)
            ids = np.concatenate([ids, np.full((n, k - kk), -1, np.int64)], axis=1)
        return scores, ids

    def _rescore(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products (n, c) float32 of ``q`` (n, d) with the float vectors of the candidate
        global ``ids`` (n, c); -inf where the id is -1. Per block of queries, each shard's memory map
        is read once, in id order, for the distinct candidates it holds (blocks bound the memory:
        about RESCORE_BLOCK candidate vectors at a time)."""
        exact = np.full(ids.shape, -np.inf, np.float32)
        step = max(1, RESCORE_BLOCK // max(ids.shape[1], 1))
        for r0 in range(0, len(ids), step):
            blk = ids[r0 : r0 + step]
            valid = blk >= 0
            shard_of = np.searchsorted(self._starts, blk, side="right") - 1
            out = exact[r0 : r0 + step]
            for si in np.unique(shard_of[valid]).tolist():
                at = valid & (shard_of == si)
                uniq, inv = np.unique(blk[at], return_inverse=True)
                vecs = np.asarray(self._floats[si][uniq - self._starts[si]], dtype=np.float32)  # (u, d)
                rows = np.nonzero(at)[0] + r0
                out[at] = np.einsum("ij,ij->i", vecs[inv], q[rows])
        return exact

    def field_index(self):
        """The metadata :class:`~rayembed.index.filters.FieldIndex`, built on first use from the id map."""
        with self._lock:
            if getattr(self, "_fields", None) is None:
                from rayembed.index.filters import build_field_index

                self._fields = build_field_index(self)
            return self._fields

    def filter_mask(self, flt: dict[str, Any]) -> np.ndarray:
        """``(ntotal,)`` bool of the ids matching the metadata filter ``flt`` (tombstones not applied)."""
        return self.field_index().mask(flt)

    def _search_ivf(self, x: np.ndarray, depth: int, sel) -> tuple[np.ndarray, np.ndarray]:
        """Top-``depth`` (scores, global ids) (n, depth) over IVF shards sharing one quantizer, as one
        index over all their lists gives them: the coarse assignment of the queries ``x`` (n, d) is
        computed once, each shard scans its own lists for it (with the IDSelector ``sel``, if any),
        and the per-shard results are merged. Scores are sorted descending; id -1 past the last hit.
        Call with the lock held: the shards' nprobe (at most nlist, see :meth:`_apply`) is used."""
        import faiss

        ivfs = self._ivfs
        n, nprobe = len(x), int(ivfs[0].nprobe)
        coarse_d = np.empty((n, nprobe), np.float32)
        coarse_i = np.empty((n, nprobe), np.int64)
        ivfs[0].quantizer.search_c(n, faiss.swig_ptr(x), nprobe, faiss.swig_ptr(coarse_d), faiss.swig_ptr(coarse_i))
        params = None if sel is None else faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        dist = np.empty((len(ivfs), n, depth), np.float32)
        ids = np.empty((len(ivfs), n, depth), np.int64)
        px, pd, pi = faiss.swig_ptr(x), faiss.swig_ptr(coarse_d), faiss.swig_ptr(coarse_i)
        for j, ivf in enumerate(ivfs):
            ivf.search_preassigned_c(n, px, depth, pi, pd, faiss.swig_ptr(dist[j]), faiss.swig_ptr(ids[j]), False,
                                     params)
        return faiss.merge_knn_results(dist, ids, keep_max=True)

    @staticmethod
    def _shared_ivf(shards: list[Any]) -> list[Any] | None:
        """The IVF index of each shard (which stores global ids itself), or None when they are not
        plain IVF indexes or their coarse quantizers differ (then each shard is searched alone)."""
        import faiss

        ivfs = [faiss.downcast_index(sh) for sh in shards]
        if not all(isinstance(ivf, faiss.IndexIVF) for ivf in ivfs):
            return None
        first = ivfs[0].quantizer.reconstruct_n(0, ivfs[0].nlist)  # (nlist, dim)
        for ivf in ivfs[1:]:
            if ivf.nlist != ivfs[0].nlist or not np.array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), first):
                return None
        return ivfs

    # ------------------------------------------------------------------ documents

    def get_documents(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """Documents of global ``ids`` from the Parquet id map, in order; None for id -1.

        Each is ``{"id", "doc_id", "text", "title"}`` plus ``"metadata"`` where the corpus had some.
        """
        return self.docs.get(ids)

    # ------------------------------------------------------------------ merging

    def _cpu_shard(self, i: int):
        if not self.on_gpu:
            return self._shards[i]
        import faiss

        return faiss.index_gpu_to_cpu(self._shards[i])

    def _empty(self):
        trained = self.manifest.get("trained")
        if trained:
            path = verify_file(self.root, trained, what="trained index")
            return read_faiss(path, what="trained index", binary=self.binary)
        return new_index(self.spec, self.index_dim)

    def merged(self):
        """One CPU faiss index holding every shard under its global ids (for serving on one machine).

        IVF and flat shards are merged list by list; HNSW graphs are rebuilt from the stored vectors.
        The float vectors of sq8 and binary indexes are not part of it: it searches the codes alone.
        """
        import faiss

        if self.binary:
            raise ValueError(f"Index {self.root} is binary; merged() joins float-storage shards only. Search it "
                             "with ShardedIndex.search, which re-scores with the float vectors.")
        hnsw = self.spec.index_type == "hnsw"
        # Shards read back from disk share one concrete type, so the first is the merge target.
        out = self._empty() if hnsw else faiss.clone_index(self._cpu_shard(0))
        for i in range(0 if hnsw else 1, self.num_shards):
            shard = faiss.clone_index(self._cpu_shard(i))
            if hnsw:
                idmap = faiss.downcast_index(shard)
                ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
                vecs = inner_index(shard).reconstruct_n(0, shard.ntotal)  # (rows, dim)
                keep = np.ones(len(ids), bool) if self._live is None else self._live[ids]
                out.add_with_ids(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(ids[keep]))
            else:
                out.merge_from(shard, 0)
        if self._live is not None and not hnsw:
            out.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(~self._live).astype(np.int64)))
        set_search_params(out, nprobe=self._default[0], ef_search=self._default[1])
        if out.ntotal != self.live_count:
            raise IndexIntegrityError(f"Merged index holds {out.ntotal} vectors, expected {self.live_count}.")
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _open_floats(root: Path, rec: dict[str, Any], dim: int, *, what: str, verify: bool) -> np.ndarray | None:
    """The float32 vectors (rows, dim) a shard record lists under ``vectors``, memory-mapped; None if none."""
    if not rec.get("vectors"):
        return None
    path = verify_file(root, rec["vectors"], what=what, check_hash=verify)
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise IndexIntegrityError(f"{what} {path} cannot be read ({e}); delete it and rebuild the index.") from e
    if x.dtype != np.float32 or x.shape != (rec["rows"], dim):
        raise IndexIntegrityError(
            f"{what} {path} holds {x.shape} {x.dtype}, but the manifest says ({rec['rows']}, {dim}) float32. "
            "The manifest does not match; rebuild the index."
        )
    return x


def _search_dropping(index, x: np.ndarray, depth: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-``depth`` of ``index`` among the ids where ``mask`` is True, for indexes that take no
    IDSelector (``IndexBinaryIVF``): fetch deeper, doubling, until each query has ``depth`` allowed
    ids or has seen all it can reach, and drop the rest. Returns (distances, ids) (n, depth)."""
    n, total = len(x), int(index.ntotal)
    frac = max(float(mask.mean()), 1.0 / max(len(mask), 1))
    fetch = max(1, min(total, int(np.ceil(depth / frac * 1.25))))
    while True:
        dist, ids = index.search(x, fetch)
        keep = (ids >= 0) & mask[np.clip(ids, 0, None)]
        done = (keep.sum(axis=1) >= depth) | (ids[:, -1] < 0)
        if done.all() or fetch >= total:
            break
        fetch = min(total, fetch * 2)
    out_d = np.zeros((n, depth), dtype=dist.dtype)
    out_i = np.full((n, depth), -1, np.int64)
    for r in range(n):
        at = np.flatnonzero(keep[r])[:depth]
        out_d[r, : len(at)] = dist[r, at]
        out_i[r, : len(at)] = ids[r, at]
    return out_d, out_i

"""A living index: upserts and deletes as delta shards and tombstones, and compaction.

Example::

    from rayembed.index.update import update_index, compact_index

    update_index("runs/idx", upsert="changed.jsonl", delete=["doc-7", "doc-9"], embedder=emb)
    compact_index("runs/idx")          # fold deltas and tombstones into new base shards

An update never rewrites a file the current manifest lists:

1. The documents' ids (the user's strings, ``doc_id`` in the id map) are matched against the live
   internal ids. A deleted id, and an upserted id that exists, get its internal ids tombstoned.
2. Upserted documents are encoded in this process (an update is usually small: starting a Ray
   actor pool costs more than encoding a 1% delta with one model) and written as **delta shards**
   under new internal ids continuing after the last one, with the base's trained index (an IVF
   delta shares the base's coarse quantizer, so the stacked-lists search still applies).
3. The cumulative tombstones go to ``tombstones/tombstones-vNNNN.npy``.
4. The new manifest (format_version 2, ``version`` + 1) lists base shards, deltas and tombstones,
   each file with its size and sha256, and is written **last** (a rename on a local disk, one PUT
   on an object store). An update killed before that leaves the old manifest in force and only
   unlisted files behind: updates are atomic, and rerunning the same update redoes it.

:class:`rayembed.index.ShardedIndex` searches deltas with the base and skips tombstoned ids inside
FAISS (an ``IDSelectorBitmap`` over live ids). A server swaps to a new version with its usual
zero-downtime reload (the version is the manifest's hash, reported in every answer).

:func:`compact_index` writes new base shards holding only live vectors, renumbered 0..live-1 in
internal-id order, from the stored codes (IVF lists are copied code by code; flat and HNSW vectors
are reconstructed and re-added, exact for fp32 and fp16; binary codes are copied as they are),
then a manifest without deltas or tombstones.

Compact storage (``sq8``, ``binary``) and ``dims`` are kept: delta shards are cut to the index's
``dims``, binary ones take the base's centre (the manifest's ``center``), and where the base
shards keep their float32 vectors for rescoring (``vectors``), deltas and compacted shards get
theirs too (compaction copies the live rows). Indexes with extra parts (bm25, sparse, multivector) are refused: those parts are not
updated yet, and serving stale lexical results beside fresh dense ones would be wrong.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.builder import (
    DOCS_DIR,
    SHARDS_DIR,
    _docs_table,
    _write_faiss,
    floats_name,
    read_faiss,
    write_floats,
)
from rayembed.index.corpus import ColumnMapping, encode_text, iter_records, normalize, resolve_corpus
from rayembed.index.faiss_util import (
    IndexSpec,
    add_vectors,
    center_of,
    inner_index,
    is_binary,
    new_index,
    prepare_vectors,
)
from rayembed.index.manifest import (
    FORMAT_VERSION,
    FORMAT_VERSION_UPDATED,
    KIND_LEXICAL,
    MANIFEST,
    IndexIntegrityError,
    check_manifest,
    file_record,
    kind_of,
    local_index_dir,
    read_docs_part,
    read_json,
    verify_file,
)
from rayembed.io import atomic_write_json, atomic_write_parquet

logger = logging.getLogger(__name__)

TOMBSTONES_DIR = "tombstones"

#: ``encode(texts) -> (n, dim) float32`` unit vectors.
TextEncodeFn = Callable[[list[str]], np.ndarray]


# ----------------------------------------------------------------------------- reading state


def manifest_version(m: dict[str, Any]) -> int:
    """The update version of a manifest: 1 for a fresh build, +1 per update or compaction."""
    return int(m.get("version", 1))


def read_tombstones(root: Path, m: dict[str, Any], *, verify: bool = True) -> np.ndarray:
    """Sorted internal ids deleted or replaced (int64); empty when the index has none."""
    rec = m.get("tombstones")
    if not rec:
        return np.zeros(0, dtype=np.int64)
    path = verify_file(root, rec, what="tombstones", check_hash=verify)
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise IndexIntegrityError(f"tombstones {path} cannot be read ({e}); rebuild or compact the index.") from e
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if len(ids) != rec.get("count", len(ids)) or (len(ids) and (ids.min() < 0 or ids.max() >= m["ntotal"])):
        raise IndexIntegrityError(
            f"tombstones {path} hold {len(ids)} ids, some outside 0..{m['ntotal'] - 1} or not the {rec.get('count')} "
            "the manifest records; the index is damaged. Compact or rebuild it."
        )
    return ids


def live_mask(root: Path, m: dict[str, Any], *, verify: bool = True) -> np.ndarray | None:
    """``(ntotal,)`` bool, True for live internal ids; None when nothing is tombstoned."""
    dead = read_tombstones(root, m, verify=verify)
    if not len(dead):
        return None
    mask = np.ones(int(m["ntotal"]), dtype=bool)
    mask[dead] = False
    return mask


def _load_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    m = read_json(path, what="index manifest")
    check_manifest(m, path)
    if kind_of(m) == KIND_LEXICAL:
        raise IndexIntegrityError(
            f"{root} is a BM25-only index; `rayembed index update` updates dense indexes. Rebuild it with the new corpus."
        )
    extra = sorted(m.get("parts") or {})
    if extra:
        raise IndexIntegrityError(
            f"{root} has the extra parts {extra}, which updates do not maintain yet. Rebuild the index with "
            "`rayembed index` after changing the corpus, or build a dense-only index (index.parts=[dense]) to update."
        )
    return m


def _mapping_of(m: dict[str, Any]) -> ColumnMapping:
    """The column mapping the index was built with (so ids, titles and metadata read the same)."""
    rec = (m.get("corpus") or {}).get("mapping") or {}
    fields = ColumnMapping.__dataclass_fields__
    return ColumnMapping(**{k: v for k, v in rec.items() if k in fields})


def _doc_instruction_of(m: dict[str, Any]) -> str | None:
    cfg = m.get("config") or {}
    return (cfg.get("index") or cfg).get("doc_instruction")


def doc_id_map(root: Path, m: dict[str, Any], live: np.ndarray | None) -> dict[str, list[int]]:
    """``{doc_id: [live internal ids]}`` over every shard of the manifest."""
    out: dict[str, list[int]] = {}
    for shard in m["shards"]:
        table = read_docs_part(root, shard, ["id", "doc_id"])
        ids = table.column("id").to_numpy()
        for i, d in zip(ids.tolist(), table.column("doc_id").to_pylist()):
            if live is None or live[i]:
                out.setdefault(d, []).append(i)
    return out


# ----------------------------------------------------------------------------- inputs


def _read_upserts(upsert: str | os.PathLike | Sequence[dict[str, Any]] | None, mapping: ColumnMapping,
                  fmt: str = "auto") -> list[dict[str, Any]]:
    if upsert is None:
        return []
    if isinstance(upsert, (str, os.PathLike)):
        path, fmt = resolve_corpus(upsert, fmt, data_dir=Path.cwd())
        rows = list(normalize(iter_records(path, fmt), mapping, source=str(path)))
    else:
        rows = list(normalize(list(upsert), mapping, source="upsert documents"))
    last: dict[str, dict[str, Any]] = {}
    for r in rows:  # the last version of a repeated id wins
        last.pop(r["doc_id"], None)
        last[r["doc_id"]] = r
    return list(last.values())


def _read_deletes(delete: str | os.PathLike | Iterable[str] | None) -> list[str]:
    if delete is None:
        return []
    if isinstance(delete, (str, os.PathLike)):
        path = Path(delete)
        if not path.is_file():
            raise FileNotFoundError(f"--delete file {path} does not exist; give a text file with one document id a line.")
        items = path.read_text(encoding="utf-8").splitlines()
    else:
        items = [str(x) for x in delete]
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


# ----------------------------------------------------------------------------- writing


class _Target:
    """Where new files go: the index folder itself, or a staging folder uploaded to a URI."""

    def __init__(self, location: str | os.PathLike):
        from rayembed.cluster.storage import is_remote, resolve_storage

        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.remote = is_remote(text)
        if self.remote:
            if text.rstrip("/").endswith("/" + MANIFEST):
                text = text.rstrip("/")[: -len(MANIFEST) - 1]
            self.storage = resolve_storage(text)
            self.read_root = local_index_dir(text)  # a verified copy of the current version
            self.stage = Path(tempfile.mkdtemp(prefix="rayembed-update-"))
        else:
            p = Path(text)
            self.read_root = (p.parent if p.name == MANIFEST else p).resolve()
            if not (self.read_root / MANIFEST).is_file():
                raise FileNotFoundError(f"{self.read_root} holds no {MANIFEST}; build the index first with `rayembed index`.")
            self.stage = self.read_root
        self.new_files: list[str] = []

    def path(self, rel: str) -> Path:
        p = self.stage / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.new_files.append(rel)
        return p

    def commit(self, manifest: dict[str, Any]) -> str:
        """Publish the new files, then the manifest (last)."""
        if not self.remote:
            atomic_write_json(self.read_root / MANIFEST, manifest)
            return str(self.read_root)
        try:
            for rel in self.new_files:
                self.storage.put_file(self.stage / rel, rel)
            self.storage.write_json(MANIFEST, manifest)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)
        return self.storage.uri

    def abort(self) -> None:
        if self.remote:
            shutil.rmtree(self.stage, ignore_errors=True)


def _record(target: _Target, rel: str) -> dict[str, Any]:
    return file_record(target.stage, target.stage / rel)


def _empty_index(root: Path, m: dict[str, Any]):
    """A copy of the base's trained (empty) index, or a fresh untrained-type one."""
    binary = IndexSpec(**m["spec"]).binary
    if m.get("trained"):
        path = verify_file(root, m["trained"], what="trained index")
        return read_faiss(path, what="trained index", binary=binary)
    return new_index(IndexSpec(**m["spec"]), int(m["dim"]))


def _keeps_floats(m: dict[str, Any]) -> bool:
    """Whether the index's shards keep float32 vectors for rescoring (so new shards must too)."""
    return bool(m["shards"]) and all(s.get("vectors") for s in m["shards"])


def _write_shard(target: _Target, root: Path, m: dict[str, Any], rows: list[dict[str, Any]], ids: np.ndarray,
                 vectors: np.ndarray | None, names: tuple[str, str], *, fill: Callable[[Any], None] | None = None,
                 extra: dict[str, Any] | None = None, floats: np.ndarray | None = None) -> dict[str, Any]:
    """Write one shard (FAISS file + id-map part, and the float vectors where the index keeps them)
    for consecutive ``ids``; returns its manifest record. ``vectors`` are stored vectors (already
    cut to ``dims``); ``fill(index)`` adds codes instead, with ``floats`` the rows' float copy."""
    faiss_rel, docs_rel = names
    index = _empty_index(root, m)
    if fill is not None:
        fill(index)
    else:
        add_vectors(index, vectors, ids, center_of(m.get("center")))
        floats = vectors if floats is None else floats
    _write_faiss(index, target.path(faiss_rel))
    atomic_write_parquet(target.path(docs_rel), _docs_table(rows, int(ids[0])))
    rec = {"file": faiss_rel, "rows": len(rows), "id_start": int(ids[0]), "id_end": int(ids[0]) + len(rows)}
    rec.update(_record(target, faiss_rel))
    if _keeps_floats(m):
        if floats is None or len(floats) != len(rows):
            raise IndexIntegrityError(f"Shard {faiss_rel} needs the float vectors of its {len(rows)} rows; the index "
                                      "keeps them for rescoring. Rebuild the index.")
        vec_rel = floats_name(faiss_rel)
        write_floats(floats, target.path(vec_rel))
        rec["vectors"] = _record(target, vec_rel)
    rec["docs"] = _record(target, docs_rel)
    rec.update(extra or {})
    return rec


def _chunk_size(m: dict[str, Any]) -> int:
    base = [s["rows"] for s in m["shards"] if not s.get("delta")]
    return max(base or [100_000])


# ----------------------------------------------------------------------------- update


def update_index(index: str | os.PathLike, *, upsert: str | os.PathLike | Sequence[dict[str, Any]] | None = None,
                 delete: str | os.PathLike | Iterable[str] | None = None, embedder: Any = None,
                 encode: TextEncodeFn | None = None, format: str = "auto", batch_size: int = 32,
                 max_length: int | None = None, doc_instruction: str | None = None,
                 fail_after_encode: bool = False) -> dict[str, Any]:
    """Upsert and delete documents of the index at ``index`` (a folder or URI); returns a summary.

    ``upsert``: a corpus file (JSONL, Parquet, BEIR) or a list of ``{id, text, title?, ...}``
    read with the index's own column mapping; an existing id is replaced. ``delete``: a text
    file with one id a line, or a list of ids; unknown ids are counted in ``not_found``.
    ``embedder`` (an Embedder, a folder or registered name; default: the manifest's embedder)
    or ``encode(texts) -> (n, dim)`` encodes the upserts. ``fail_after_encode`` stops before the
    manifest is written (used to show that an interrupted update changes nothing).
    """
    t0 = time.perf_counter()
    target = _Target(index)
    try:
        root = target.read_root
        m = _load_manifest(root)
        mapping = _mapping_of(m)
        ups = _read_upserts(upsert, mapping, format)
        dels = _read_deletes(delete)
        both = sorted(set(dels) & {r["doc_id"] for r in ups})
        if both:
            raise ValueError(
                f"Document id {both[0]!r} is both upserted and deleted ({len(both)} such ids); give each id to one of "
                "--upsert or --delete."
            )
        if not ups and not dels:
            raise ValueError("Nothing to update: give --upsert with documents and/or --delete with ids.")
        live = live_mask(root, m)
        by_id = doc_id_map(root, m, live)
        dead_new = [i for d in dels for i in by_id.get(d, [])]
        not_found = [d for d in dels if d not in by_id]
        replaced = [r["doc_id"] for r in ups if r["doc_id"] in by_id]
        dead_new += [i for d in replaced for i in by_id[d]]
        if not_found:
            logger.warning("%d ids to delete are not in the index (e.g. %r)", len(not_found), not_found[0])

        version = manifest_version(m) + 1
        ntotal = int(m["ntotal"])
        shards = [dict(s) for s in m["shards"]]
        if ups:
            enc = encode or _text_encoder(embedder, m, batch_size=batch_size, max_length=max_length,
                                          doc_instruction=doc_instruction)
            texts = [encode_text(r["text"], r["title"], mapping.include_title) for r in ups]
            vectors = np.asarray(enc(texts), dtype=np.float32)  # (n_up, embedder dim)
            full = int(m.get("embedder_dim") or m["dim"])
            if vectors.shape != (len(ups), full):
                raise ValueError(f"The encoder returned vectors of shape {vectors.shape}; the index needs "
                                 f"({len(ups)}, {full}). Update with the embedder the index was built with.")
            if not np.isfinite(vectors).all():
                raise ValueError("The encoder returned NaN or infinite values; refusing to index them.")
            vectors = prepare_vectors(vectors, IndexSpec(**m["spec"]))  # (n_up, dim): cut to index.dims if set
            size = _chunk_size(m)
            for j, lo in enumerate(range(0, len(ups), size)):
                hi = min(lo + size, len(ups))
                ids = np.arange(ntotal + lo, ntotal + hi, dtype=np.int64)
                names = (f"{SHARDS_DIR}/delta-v{version:04d}-{j:05d}.faiss", f"{DOCS_DIR}/docs-v{version:04d}-{j:05d}.parquet")
                shards.append(_write_shard(target, root, m, ups[lo:hi], ids, vectors[lo:hi], names,
                                           extra={"delta": version}))
        new_total = ntotal + len(ups)
        old_dead = read_tombstones(root, m)
        dead = np.unique(np.concatenate([old_dead, np.asarray(dead_new, dtype=np.int64)]))
        tomb = None
        if len(dead):
            rel = f"{TOMBSTONES_DIR}/tombstones-v{version:04d}.npy"
            with open(target.path(rel), "wb") as f:
                np.save(f, dead, allow_pickle=False)
            tomb = {**_record(target, rel), "count": int(len(dead))}
        summary = {"version": version, "upserted": len(ups), "replaced": len(replaced),
                   "deleted": len(dels) - len(not_found), "not_found": len(not_found),
                   "ntotal": new_total, "live": new_total - int(len(dead))}
        new = dict(m)
        new.update({
            "format_version": FORMAT_VERSION_UPDATED, "version": version, "ntotal": new_total,
            "num_shards": len(shards), "shards": shards, "tombstones": tomb, "live": summary["live"],
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "history": list(m.get("history") or []) + [{k: v for k, v in summary.items() if k not in ("ntotal", "live")}],
        })
        check_manifest(new, root / MANIFEST)
        if fail_after_encode:
            raise RuntimeError("update stopped before its manifest (fail_after_encode)")
        where = target.commit(new)
    except BaseException:
        target.abort()
        raise
    summary["index"] = where
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("Updated %s to version %d: %d upserted (%d replaced), %d deleted, %d live of %d (%.1fs)", where,
                version, summary["upserted"], summary["replaced"], summary["deleted"], summary["live"], new_total,
                summary["seconds"])
    return summary


def _text_encoder(embedder: Any, m: dict[str, Any], *, batch_size: int, max_length: int | None,
                  doc_instruction: str | None) -> TextEncodeFn:
    from rayembed.index.manifest import identity_of, same_embedder

    if embedder is None:
        embedder = m.get("embedder_name")
        if not embedder:
            raise ValueError("The manifest names no embedder; pass --embedder (the one the index was built with).")
    if isinstance(embedder, (str, os.PathLike)):
        from rayembed.modeling.embedder import Embedder

        embedder = Embedder.from_pretrained(embedder)
    if m.get("embedder") and not same_embedder(m["embedder"], identity_of(embedder)):
        raise IndexIntegrityError(
            "The embedder given for the update is not the one the index was built with (config/weights hashes "
            "differ); its vectors would not be comparable. Update with the index's own embedder."
        )
    instruction = doc_instruction if doc_instruction is not None else _doc_instruction_of(m)

    def enc(texts: list[str]) -> np.ndarray:
        return embedder.encode(texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                               show_progress=False)

    return enc


# ----------------------------------------------------------------------------- compaction


def _ivf_of(index):
    """The IVF index inside ``index`` (a float IVF, or a binary ``IndexBinaryIVF`` itself)."""
    import faiss

    return inner_index(index) if is_binary(index) else faiss.extract_index_ivf(index)


def _ivf_entries(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(list_no, ids, codes)`` of every entry of an IVF index: (n,), (n,) int64, (n, code_size) uint8."""
    import faiss

    ivf = _ivf_of(index)
    invlists = ivf.invlists
    cs = invlists.code_size
    lists, ids, codes = [], [], []
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if not n:
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy().astype(np.int64))
        codes.append(faiss.rev_swig_ptr(invlists.get_codes(lst), n * cs).copy().reshape(n, cs))
        lists.append(np.full(n, lst, dtype=np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, cs), np.uint8)
    return np.concatenate(lists), np.concatenate(ids), np.concatenate(codes)


def _flat_entries(index) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of an IndexIDMap over a flat, SQ or HNSW index (vectors reconstructed), or
    ``(ids, codes)`` of an IndexBinaryIDMap over an IndexBinaryFlat (its packed sign bits)."""
    import faiss

    idmap = faiss.downcast_IndexBinary(index) if is_binary(index) else faiss.downcast_index(index)
    ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
    vecs = inner_index(index).reconstruct_n(0, index.ntotal)  # (rows, dim)
    return ids, vecs


def compact_index(index: str | os.PathLike) -> dict[str, Any]:
    """Fold delta shards and tombstones of ``index`` (a folder or URI) into new base shards.

    Live documents keep their internal-id order and are renumbered 0..live-1; search answers
    (document ids and scores) equal the uncompacted index's for flat and IVF types, and for fp32
    and fp16 HNSW up to the graph being built anew.
    """
    import faiss

    t0 = time.perf_counter()
    target = _Target(index)
    try:
        root = target.read_root
        m = _load_manifest(root)
        version = manifest_version(m) + 1
        live = live_mask(root, m)
        ntotal = int(m["ntotal"])
        live = np.ones(ntotal, dtype=bool) if live is None else live
        new_of = np.full(ntotal, -1, dtype=np.int64)
        new_of[live] = np.arange(int(live.sum()), dtype=np.int64)
        n_live = int(live.sum())
        if n_live == 0:
            raise ValueError(f"Every document of {root} is deleted; nothing to compact. Rebuild the index instead.")
        ivf = m["index_type"] in ("ivf_flat", "ivf_pq")
        spec = IndexSpec(**m["spec"])
        keep_floats = _keeps_floats(m)
        # Gather the live entries of every shard under their new ids.
        all_ids, payload, lists, floats = [], [], [], []
        for i, rec in enumerate(m["shards"]):
            path = verify_file(root, rec, what=f"shard {i}")
            sh = read_faiss(path, what=f"shard {i}", binary=spec.binary)
            if keep_floats:
                vpath = verify_file(root, rec["vectors"], what=f"float vectors of shard {i}")
                fl = np.load(vpath, mmap_mode="r", allow_pickle=False)  # (rows, dim), row j = id id_start + j
                live_rows = np.flatnonzero(live[rec["id_start"]:rec["id_end"]])
                floats.append(np.asarray(fl[live_rows], dtype=np.float32))
            if ivf:
                lst, ids, codes = _ivf_entries(sh)
                lists.append(lst[live[ids]])
                payload.append(codes[live[ids]])
            else:
                ids, vecs = _flat_entries(sh)
                payload.append(vecs[live[ids]])
            all_ids.append(new_of[ids[live[ids]]])
        new_ids = np.concatenate(all_ids)
        payload_all = np.concatenate(payload)
        lists_all = np.concatenate(lists) if ivf else None
        # The float copies are in internal-id order, shard after shard: row r is new id r.
        floats_all = np.concatenate(floats) if keep_floats else None
        rows: list[dict[str, Any]] = []
        for rec in m["shards"]:
            table = read_docs_part(root, rec, ["id", "doc_id", "text", "title", "metadata"])
            keep = live[table.column("id").to_numpy()]
            for r, k in zip(table.to_pylist(), keep):
                if k:
                    rows.append({"doc_id": r["doc_id"], "text": r["text"], "title": r["title"],
                                 "metadata": r["metadata"]})
        size = _chunk_size(m)
        shards = []
        for j, lo in enumerate(range(0, n_live, size)):
            hi = min(lo + size, n_live)
            sel = (new_ids >= lo) & (new_ids < hi)
            ids_j = new_ids[sel]
            order = np.argsort(ids_j, kind="stable")
            ids_j = np.ascontiguousarray(ids_j[order])
            data_j = np.ascontiguousarray(payload_all[sel][order])
            if len(ids_j) != hi - lo:
                raise IndexIntegrityError(f"Compaction found {len(ids_j)} vectors for ids [{lo}, {hi}); the shards of "
                                          f"{root} do not match their id maps. Rebuild the index.")
            names = (f"{SHARDS_DIR}/shard-c{version:04d}-{j:05d}.faiss", f"{DOCS_DIR}/docs-c{version:04d}-{j:05d}.parquet")
            floats_j = floats_all[lo:hi] if keep_floats else None
            if ivf:
                lists_j = lists_all[sel][order]

                def fill(index, _l=lists_j, _i=ids_j, _c=data_j):
                    inv = _ivf_of(index)
                    for lst in np.unique(_l):
                        at = np.flatnonzero(_l == lst)
                        ids_l = np.ascontiguousarray(_i[at])
                        codes_l = np.ascontiguousarray(_c[at])
                        inv.invlists.add_entries(int(lst), len(at), faiss.swig_ptr(ids_l), faiss.swig_ptr(codes_l))
                    inv.ntotal = len(_i)
                    index.ntotal = len(_i)

                shards.append(_write_shard(target, root, m, rows[lo:hi], ids_j, None, names, fill=fill,
                                           floats=floats_j))
            elif spec.binary:  # packed sign bits: copied as they are (re-adding needs no float vectors)
                def fill_codes(index, _i=ids_j, _c=data_j):
                    index.add_with_ids(_c, _i)

                shards.append(_write_shard(target, root, m, rows[lo:hi], ids_j, None, names, fill=fill_codes,
                                           floats=floats_j))
            else:  # re-added from the float copy where kept (the codes it gives are the original ones)
                shards.append(_write_shard(target, root, m, rows[lo:hi], ids_j,
                                           floats_j if keep_floats else data_j, names, floats=floats_j))
        new = {k: v for k, v in m.items() if k not in ("tombstones", "live")}
        new.update({
            "format_version": FORMAT_VERSION, "version": version, "ntotal": n_live, "num_shards": len(shards),
            "shards": shards, "compacted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "history": list(m.get("history") or []) + [{"version": version, "compacted": True,
                                                        "dropped": ntotal - n_live}],
        })
        check_manifest(new, root / MANIFEST)
        where = target.commit(new)
    except BaseException:
        target.abort()
        raise
    summary = {"version": version, "index": where, "ntotal": n_live, "dropped": ntotal - n_live,
               "shards": len(shards), "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("Compacted %s to version %d: %d live vectors in %d shards (%d dropped, %.1fs)", where, version,
                n_live, len(shards), ntotal - n_live, summary["seconds"])
    return summary


def describe(m: dict[str, Any]) -> str:
    """One line about a manifest's version, deltas and tombstones."""
    deltas = sum(1 for s in m["shards"] if s.get("delta"))
    dead = (m.get("tombstones") or {}).get("count", 0)
    return (f"version {manifest_version(m)}: {m['ntotal'] - dead} live of {m['ntotal']} ids, "
            f"{len(m['shards']) - deltas} base + {deltas} delta shards, {dead} tombstones")


__all__ = ["compact_index", "describe", "live_mask", "manifest_version", "read_tombstones", "update_index"]

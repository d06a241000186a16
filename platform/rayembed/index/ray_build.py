"""``build_index(cfg)``: the index build on a Ray cluster. The driver plans; the workers carry the data.

1. **Count.** One Ray task per input file reads it where it lies (a local path, or a URI through
   ``pyarrow.fs``) and returns three numbers: rows read, empty rows, documents.
2. **Plan** (driver). Shards are fixed slices of the input files in order (a shard never spans
   two files), so their contents and global id ranges depend only on the files and their row
   counts, never on how Ray Data splits blocks: a retried or resumed shard is the same shard.
   ``plan.json`` goes to the output location.
3. **Train** (IVF, PQ, SQ8, binary only). A seeded sample of documents is encoded on the actor
   pool; the driver trains the quantizer on those vectors (``index.train_size`` of them, whatever
   the corpus size) and writes ``trained.index``; for binary storage the sample's mean is the
   centre of every shard's sign bits (``center`` in the plan and the manifest).
4. **Shards.** ``map_batches(ShardActor, compute=ActorPoolStrategy(min, max))`` over the pending
   shard descriptors: each actor loads the embedder once (a LoRA adapter merged for inference),
   then per shard reads its slice of the corpus, writes the id map (``docs/``), encodes the dense
   vectors and, with heads, the ``sparse`` and ``multivector`` parts, writes the FAISS shard (and,
   for sq8 and binary with rescoring, its float32 vectors ``shards/shard-NNNNN.npy``; with
   ``index.dims`` every vector is cut and re-normalised first), and writes the sidecar ``shards/shard-NNNNN.json`` **last**, each file with its sha256, straight to
   the output location. The driver receives only that sidecar.
5. **BM25** (``bm25`` in ``index.parts``): one task reads the id maps and writes ``bm25/``.
6. **Manifest** (driver), written last: its presence means the index is complete.

A killed or failed build keeps every shard whose sidecar verifies; a rerun redoes only the
others. The output location is a folder or a URI (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``,
``file://``): object stores have no rename, so an index there is complete exactly when
``manifest.json`` exists, and readers download it into a verified local cache
(:func:`rayembed.index.sharded.localize_index`).

What the driver receives (``manifest["build"]["driver_received"]``) is a few records per shard
and per input file, and never a document or a vector, whatever the corpus size.

Laptop::

    rayembed index --config jobs/configs/local/index.yaml

Cluster::

    ray job submit --working-dir . -- python jobs/index.py --config jobs/configs/gpu/index.yaml \\
        index.output_dir=s3://bucket/indexes/msmarco
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rayembed.index.corpus import (
    ColumnMapping,
    encode_text,
    jsonl_records,
    normalize,
    read_smart,
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
    BM25_DIR,
    MULTIVECTOR_DIR,
    SPARSE_DIR,
    BM25Params,
    check_parts,
    write_multivector_shard,
    write_sparse_shard,
)
from rayembed.index.manifest import (
    FORMAT,
    FORMAT_VERSION,
    KIND_DENSE,
    MANIFEST,
    PLAN,
    TRAINED,
    IndexIntegrityError,
)

logger = logging.getLogger(__name__)

DOCS_DIR = "docs"
SHARDS_DIR = "shards"
LAYOUT = "distributed-1"


# ----------------------------------------------------------------------------- corpus files


def corpus_files(corpus: str, fmt: str, data_dir: Path | None) -> tuple[list[dict[str, Any]], str]:
    """The input files of a corpus, in order, each ``{"uri", "bytes", "mtime_ns"}``, and the format.

    ``corpus`` is a local file or folder (resolved against ``data_dir`` as before; a folder of
    ``.parquet`` or ``.jsonl`` files gives all of them, sorted) or a URI of a file or a prefix.
    """
    import pyarrow.fs as pafs

    from rayembed.cluster.storage import check_location, is_remote

    if not is_remote(corpus):
        local = Path(corpus[len("file://"):] if corpus.startswith("file://") else corpus)
        tries = [local] if local.is_absolute() else [p for p in (data_dir and data_dir / local, Path.cwd() / local) if p]
        folder = next((p for p in tries if p.is_dir()), None)
        if folder is not None and not any((folder / n).exists() for n in ("corpus.jsonl", "cran.all.1400")):
            # A folder of .parquet / .jsonl files: one input file each, counted and read in parallel.
            return _folder_files(pafs.LocalFileSystem(), str(folder.resolve()), fmt, str(folder.resolve()), local=True)
        path, fmt = resolve_corpus(local, fmt, data_dir)
        st = path.stat()
        return [{"uri": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}], fmt
    st = check_location(corpus, what="index.corpus", must_exist=True)
    info = st.filesystem.get_file_info(st.path)
    if info.type == pafs.FileType.Directory:
        return _folder_files(st.filesystem, st.path, fmt, st.uri, local=False)
    fmt = _format_of(PurePosixPath(st.path).name, fmt, corpus)
    return [{"uri": corpus, "bytes": info.size, "mtime_ns": info.mtime_ns}], fmt


def _format_of(name: str, fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "beir" if name == "corpus.jsonl" else "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if name.startswith("cran.all") or suffix in (".all", ".smart"):
        return "smart"
    raise ValueError(f"Cannot tell the format of corpus {where}; set index.format (jsonl, parquet, beir, smart).")


def _folder_files(fs: Any, path: str, fmt: str, uri: str, *, local: bool) -> tuple[list[dict[str, Any]], str]:
    import pyarrow.fs as pafs

    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
             if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))]
    if (corpus_json := [i for i in infos if i.base_name == "corpus.jsonl"]):
        infos = corpus_json
    by_fmt: dict[str, list[Any]] = {}
    for i in infos:
        with contextlib.suppress(ValueError):
            by_fmt.setdefault(_format_of(i.base_name, fmt, uri), []).append(i)
    if len(by_fmt) != 1:
        raise FileNotFoundError(
            f"Corpus folder {uri} must hold .parquet or .jsonl files of one format (found "
            f"{sorted(i.base_name for i in infos)[:8]}). Point index.corpus at a file, or set index.format."
        )
    fmt, files = next(iter(by_fmt.items()))
    base = uri.rstrip("/")
    return [{"uri": (i.path if local else f"{base}/{i.base_name}"), "bytes": i.size, "mtime_ns": i.mtime_ns}
            for i in sorted(files, key=lambda i: i.base_name)], fmt


def _open_records(uri: str, fmt: str) -> Iterator[dict[str, Any]]:
    """Raw records of one input file, read where this code runs (a worker), local or through pyarrow.fs."""
    import pyarrow.parquet as pq

    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(uri)
    if fmt in ("jsonl", "beir"):
        with st.filesystem.open_input_stream(st.path) as raw:
            yield from jsonl_records(io.TextIOWrapper(raw, encoding="utf-8"), uri)
    elif fmt == "parquet":
        with st.filesystem.open_input_file(st.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                yield from batch.to_pylist()
    elif fmt == "smart":
        if st.is_local:
            yield from read_smart(st.path)
        else:
            with tempfile.TemporaryDirectory() as d:
                local = Path(d) / PurePosixPath(st.path).name
                local.write_bytes(st.read_bytes(""))
                yield from read_smart(local)
    else:
        raise ValueError(f"Unknown corpus format {fmt!r}; use jsonl, parquet, beir or smart.")


def count_file(uri: str, fmt: str, mapping: dict[str, Any]) -> dict[str, int]:
    """Rows read, empty rows and documents of one input file (runs as a Ray task)."""
    stats: dict[str, int] = {}
    docs = sum(1 for _ in normalize(_open_records(uri, fmt), ColumnMapping(**mapping), stats=stats, source=uri))
    return {"read": stats.get("read", 0), "empty": stats.get("empty", 0), "docs": docs}


def read_shard_docs(shard: dict[str, Any], mapping: dict[str, Any]) -> list[dict[str, Any]]:
    """The normalised documents of one planned shard: its slice of its input file."""
    src = shard["source"]
    rows = normalize(_open_records(src["uri"], src["format"]), ColumnMapping(**mapping),
                     start_row=src["row_start"], source=src["uri"])
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(rows):
        if i < src["skip"]:
            continue
        out.append(doc)
        if len(out) == shard["rows"]:
            break
    if len(out) != shard["rows"]:
        raise IndexIntegrityError(
            f"{src['uri']} gave {len(out)} documents for {shard['file']} where the plan counted {shard['rows']}: "
            "the corpus changed during the build. Rerun with index.overwrite=true."
        )
    return out


# ----------------------------------------------------------------------------- the plan


def plan_shards(files: list[dict[str, Any]], counts: list[dict[str, int]], fmt: str, *, shard_size: int,
                num_shards: int, limit: int | None) -> list[dict[str, Any]]:
    """Fixed slices of the input files, in order, with consecutive global ids."""
    total = sum(c["docs"] for c in counts)
    if limit is not None:
        total = min(total, limit)
    if num_shards > 0:
        shard_size = max(1, math.ceil(total / num_shards))
    shards: list[dict[str, Any]] = []
    next_id, row0 = 0, 0
    for f, c in zip(files, counts):
        skip = 0
        while skip < c["docs"] and next_id < total:
            rows = min(shard_size, c["docs"] - skip, total - next_id)
            i = len(shards)
            shards.append({
                "index": i, "file": f"{SHARDS_DIR}/shard-{i:05d}.faiss", "rows": rows,
                "id_start": next_id, "id_end": next_id + rows,
                "source": {"uri": f["uri"], "format": fmt, "row_start": row0, "skip": skip},
            })
            skip += rows
            next_id += rows
        row0 += c["read"]
    return shards


def _sidecar_name(shard: dict[str, Any]) -> str:
    return str(PurePosixPath(shard["file"]).with_suffix(".json"))


def _docs_name(i: int) -> str:
    return f"{DOCS_DIR}/docs-{i:05d}.parquet"


# ----------------------------------------------------------------------------- the workers


def _file_record(root: Path, path: Path) -> dict[str, Any]:
    from rayembed.io import sha256_file

    return {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class ShardActor:
    """A Ray Data actor: loads the embedder once, then builds whole shards (``batch_size=1`` rows of
    JSON shard descriptors) and writes them to the output location; returns their sidecars.

    With ``sample`` rows (``{"shard", "positions"}``) it returns the vectors of those documents
    instead: the training sample of an IVF/PQ/SQ8 index.
    """

    def __init__(self, name_or_path: str, load_kwargs: dict[str, Any], *, output: str, mapping: dict[str, Any],
                 parts: list[str], spec: dict[str, Any], dim: int, trained: dict[str, Any] | None,
                 batch_size: int = 64, max_length: int | None = None, instruction: str | None = None,
                 num_threads: int | None = None, center: list[float] | None = None, floats: bool = False):
        import ray
        import torch

        from rayembed.cluster.storage import resolve_storage
        from rayembed.modeling.embedder import Embedder

        if num_threads:
            torch.set_num_threads(num_threads)
        self.emb = Embedder.from_pretrained(name_or_path, **load_kwargs)
        if self.emb.is_peft:
            self.emb.merge_lora()  # once, for inference: no adapter matmuls on every linear layer
        self.emb.eval()
        self.out = resolve_storage(output)
        self.mapping = mapping
        self.parts = parts
        self.spec = IndexSpec(**spec)
        self.dim = dim
        self.center = center_of(center)
        self.floats = floats  # write the float32 copy of each shard (sq8/binary with rescoring)
        self.trained = trained
        self._empty = None
        self.batch_size = batch_size
        self.max_length = max_length
        self.instruction = instruction
        self.include_title = bool(mapping.get("include_title", True))
        self.node = ray.get_runtime_context().get_node_id()

    def _texts(self, docs: list[dict[str, Any]]) -> list[str]:
        return [encode_text(d["text"], d["title"], self.include_title) for d in docs]

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._encode_with_heads(texts, heads=False)[0]

    def _encode_with_heads(self, texts: list[str], *, heads: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
        """Dense vectors and the asked-for head outputs (sparse, multivector), one forward pass per batch."""
        wanted = {p: heads and p in self.parts for p in ("sparse", "multivector")}
        if any(wanted.values()):
            outputs = self.emb.encode_all(texts, instruction=self.instruction, batch_size=self.batch_size,
                                          max_length=self.max_length, **wanted)
            vectors = outputs.pop("dense")
        else:
            outputs = {}
            vectors = self.emb.encode(texts, instruction=self.instruction, batch_size=self.batch_size,
                                      max_length=self.max_length, show_progress=False)  # (n, dim)
        if vectors.ndim != 2 or vectors.shape != (len(texts), self.dim):
            raise ValueError(f"Encoder returned vectors of shape {vectors.shape}; expected ({len(texts)}, {self.dim}).")
        if not np.isfinite(vectors).all():
            raise ValueError("Encoder returned NaN or infinite values; refusing to index them.")
        return vectors, outputs

    def _empty_index(self):
        """A fresh copy of the (trained) empty index; the trained one is fetched and verified once."""
        import faiss

        if not self.spec.trained:
            return new_index(self.spec, self.spec.index_dim(self.dim))
        binary = self.spec.binary
        if self._empty is None:
            from rayembed.io import sha256_file

            with tempfile.TemporaryDirectory() as d:
                local = Path(d) / TRAINED
                local.write_bytes(self.out.read_bytes(TRAINED))
                if sha256_file(local) != self.trained["sha256"]:
                    raise IndexIntegrityError(f"{self.out.uri}/{TRAINED} fails its sha256 check; rerun the build.")
                self._empty = (faiss.serialize_index_binary(faiss.read_index_binary(str(local))) if binary
                               else faiss.serialize_index(faiss.read_index(str(local))))
        return faiss.deserialize_index_binary(self._empty) if binary else faiss.deserialize_index(self._empty)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "positions" in batch:
            return self._sample(batch)
        results = [json.dumps(self.build_shard(json.loads(s))) for s in batch["shard"]]
        return {"sidecar": np.array(results, dtype=object)}

    def _sample(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, vecs = [], []
        for s, pos in zip(batch["shard"], batch["positions"]):
            shard = json.loads(s)
            docs = read_shard_docs(shard, self.mapping)
            pos = np.asarray(json.loads(pos), dtype=np.int64)
            vecs.append(self._encode(self._texts([docs[p] for p in pos])))
            ids.append(pos + shard["id_start"])
        return {"id": np.concatenate(ids), "vector": np.concatenate(vecs)}

    def build_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        """Read, encode and write one shard (docs, FAISS, parts, then the sidecar); return the sidecar."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        t0 = time.perf_counter()
        i = shard["index"]
        docs = read_shard_docs(shard, self.mapping)
        texts = self._texts(docs)
        with tempfile.TemporaryDirectory(prefix="rayembed-shard-") as d:
            root = Path(d)
            (root / DOCS_DIR).mkdir()
            (root / SHARDS_DIR).mkdir()
            ids = np.arange(shard["id_start"], shard["id_end"], dtype=np.int64)
            table = pa.table({
                "id": pa.array(ids),
                "doc_id": pa.array([r["doc_id"] for r in docs], pa.string()),
                "text": pa.array([r["text"] for r in docs], pa.string()),
                "title": pa.array([r["title"] for r in docs], pa.string()),
                "metadata": pa.array([r["metadata"] for r in docs], pa.string()),
            })
            pq.write_table(table, root / _docs_name(i))
            vectors, heads = self._encode_with_heads(texts)
            vectors = prepare_vectors(vectors, self.spec)  # (rows, index_dim): cut to index.dims if set
            index = self._empty_index()
            add_vectors(index, vectors, ids, self.center)
            write_index_verified(index, root / shard["file"])  # size + re-read before upload
            side: dict[str, Any] = {k: shard[k] for k in ("index", "file", "rows", "id_start", "id_end")}
            side.update(_file_record(root, root / shard["file"]))
            side["docs"] = _file_record(root, root / _docs_name(i))
            if self.floats:
                fname = str(PurePosixPath(shard["file"]).with_suffix(".npy"))
                write_floats_verified(vectors, root / fname)
                side["vectors"] = _file_record(root, root / fname)
            if index.ntotal != shard["rows"] or side["bytes"] == 0:
                raise IndexIntegrityError(f"{shard['file']} holds {index.ntotal} vectors for {shard['rows']} rows.")
            side["parts"] = self._write_parts(root, shard, texts, heads)
            files = [side["file"], side["docs"]["file"]] + ([side["vectors"]["file"]] if "vectors" in side else []) + [
                f["file"] for p in side["parts"].values() for f in _part_shard_files(p)]
            for rel in files:
                self.out.put_file(root / rel, rel)
        side["encode_s"] = time.perf_counter() - t0
        side["node"] = self.node
        self.out.write_json(_sidecar_name(shard), side)  # last: the shard exists once this does
        return side

    def _write_parts(self, root: Path, shard: dict[str, Any], texts: list[str],
                     heads: dict[str, Any]) -> dict[str, Any]:
        """Write the sparse / multivector files from ``heads``, the outputs of the dense pass."""
        out: dict[str, Any] = {}
        base = {k: shard[k] for k in ("index", "rows", "id_start", "id_end")}
        whole = max(1, len(texts))  # the outputs are already computed: hand them over in one piece
        if "sparse" in self.parts:
            path = root / SPARSE_DIR / f"sparse-{shard['index']:05d}.npz"
            mat = write_sparse_shard(lambda b: heads["sparse"], texts, path, batch_size=whole)
            out["sparse"] = {**base, "nnz": int(mat.nnz), "vocab_size": int(mat.shape[1]),
                             "file": _file_record(root, path)}
        if "multivector" in self.parts:
            stem = root / MULTIVECTOR_DIR / f"mv-{shard['index']:05d}"
            vpath, opath, dim, offsets = write_multivector_shard(lambda b: heads["multivector"], texts, stem,
                                                                 batch_size=whole)
            out["multivector"] = {**base, "tokens": int(offsets[-1]), "dim": dim,
                                  "vectors": _file_record(root, vpath), "offsets": _file_record(root, opath)}
        return out


def _part_shard_files(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry[k] for k in ("file", "vectors", "offsets") if isinstance(entry.get(k), dict)]


def build_bm25(output: str, shards: list[dict[str, Any]], params: dict[str, Any], include_title: bool
               ) -> dict[str, Any]:
    """The ``bm25`` part from the id maps in ``output`` (runs as a Ray task); returns its record."""
    import pyarrow.parquet as pq

    from rayembed.cluster.storage import resolve_storage
    from rayembed.index.lexical import BM25Index

    out = resolve_storage(output)
    texts: list[str] = []
    for s in shards:
        with out.filesystem.open_input_file(out.join(s["docs"]["file"]).path) as f:
            t = pq.read_table(f, columns=["text", "title"])
        texts.extend(encode_text(a, b, include_title)
                     for a, b in zip(t.column("text").to_pylist(), t.column("title").to_pylist()))
    bm = BM25Params(**params)
    index = BM25Index.build(texts, bm)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        files = index.save(root / BM25_DIR)
        records = [_file_record(root, Path(f)) for f in files]
        for rec in records:
            out.put_file(root / rec["file"], rec["file"])
    return {"settings": {**bm.to_dict(), "include_title": include_title}, "complete": True, "files": records,
            "rows": len(texts), "vocab_size": len(index.retriever.vocab_dict)}


# ----------------------------------------------------------------------------- the driver


class DriverTraffic:
    """Counts what the driver receives from Ray: records and their serialised bytes."""

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0

    def add(self, obj: Any, records: int = 1) -> Any:
        self.records += records
        self.bytes += len(json.dumps(obj, default=str))
        return obj

    def to_dict(self) -> dict[str, int]:
        return {"records": self.records, "bytes": self.bytes}


def _probe(name_or_path: str, load_kwargs: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, bool]]:
    """Identity, dimension and heads of the embedder, computed where the actors run (not on the driver)."""
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(name_or_path, **load_kwargs)
    heads = {"sparse": bool(getattr(emb, "has_sparse", False)), "multivector": bool(getattr(emb, "has_multivector", False))}
    return emb.identity(), int(emb.dim), heads


def embedder_args(cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` for the embedder that indexes the corpus.

    The embedder loads with its own settings (a saved folder's ``embedder_config.json``, or a
    registered model's defaults), exactly as serving and evaluation load it by name; only
    ``model`` keys set away from their defaults override them. Passing every default would, for
    example, force left padding onto an encoder registered with right padding, and change its
    vectors and identity.
    """
    from rayembed.modeling.loading import pretrained_kwargs

    m, enc = cfg.model, cfg.index.encode
    name = cfg.index.embedder or m.name_or_path
    own = cfg.index.embedder or "://" in str(name) or (Path(name) / "embedder_config.json").is_file()
    kwargs = pretrained_kwargs(m, settings="none" if own else "changed", heads=False,
                               device=m.device or ("cuda" if enc.num_gpus_per_actor > 0 else "cpu"))
    if enc.max_length is not None or "max_length" not in kwargs:
        kwargs["max_length"] = enc.max_length  # index.encode.max_length wins over model.max_length
    return name, kwargs


def _remote_args(enc: Any) -> dict[str, Any]:
    remote: dict[str, Any] = {"num_cpus": enc.num_cpus_per_actor}
    if enc.num_gpus_per_actor > 0:
        remote["num_gpus"] = enc.num_gpus_per_actor
    if enc.resources_per_actor:
        remote["resources"] = dict(enc.resources_per_actor)
    return remote


def _shard_pool(ds, cfg: Any, actor_kwargs: dict[str, Any], size: tuple[int, int]):
    from ray.data import ActorPoolStrategy

    enc = cfg.index.encode
    return ds.map_batches(
        ShardActor,
        compute=ActorPoolStrategy(min_size=size[0], max_size=size[1]),
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs=actor_kwargs,
        **_remote_args(enc),
    )


def _output_location(out_dir: str) -> str:
    from rayembed.cluster.storage import is_remote

    if is_remote(out_dir) or out_dir.startswith("file://"):
        return out_dir
    return str(Path(out_dir).resolve())


def build_index(cfg: Any) -> Path | str:
    """Build (or resume) the index described by ``cfg.index`` on Ray; returns manifest.json's location.

    A local output gives a ``Path``; a URI output gives the manifest's URI (open it with
    ``ShardedIndex.open`` or ``HybridSearcher.open``, which download and verify it).
    """
    import ray

    from rayembed.cluster.storage import check_location, warn_if_node_local
    from rayembed.config import ConfigError, to_dict
    from rayembed.runtime import init_ray, resolve_data_dir
    from rayembed.security import redact_config

    icfg, enc = cfg.index, cfg.index.encode
    if not icfg.corpus:
        raise ConfigError("index.corpus is empty; set it to a JSONL/Parquet file, a BEIR folder or cran.all.1400.")
    try:
        data_dir = resolve_data_dir(cfg.data_dir)
    except FileNotFoundError:
        data_dir = None
    try:
        parts = check_parts(icfg.parts, where="index.parts")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    out_uri = _output_location(str(icfg.output_dir or f"{str(cfg.run_dir).rstrip('/')}/index"))
    out = check_location(out_uri, what="index.output_dir")
    files, fmt = corpus_files(str(icfg.corpus), icfg.format, data_dir)
    mapping = ColumnMapping.from_config(icfg)
    init_ray(cfg.compute)
    warn_if_node_local(out, "index.output_dir")
    if "dense" not in parts:
        return _lexical_only(cfg, out, files, fmt, mapping)
    t_start = time.perf_counter()
    traffic = DriverTraffic()
    name, load_kwargs = embedder_args(cfg)
    remote = _remote_args(enc)
    identity, dim, heads = traffic.add(ray.get(ray.remote(**remote)(_probe).remote(name, load_kwargs)))
    logger.info("Embedder %s: dim %d (%.1fs to load)", name, dim, time.perf_counter() - t_start)
    for part in ("sparse", "multivector"):
        if part in parts and not heads[part]:
            raise ConfigError(
                f"index.parts has '{part}' but the embedder {name} has no {part} head. Train one with "
                f"model.heads.{part}=true, or drop '{part}' from index.parts."
            )

    # 1-2. count and plan (or resume a matching plan)
    spec = IndexSpec.from_config(icfg)
    key = {
        "layout": LAYOUT,
        "corpus": {"files": files, "format": fmt, "mapping": mapping.__dict__},
        "limit": icfg.limit, "spec": spec.to_dict(),
        "embedder": {k: v for k, v in identity.items() if k != "path"}, "dim": dim,
        "shard_size": icfg.shard_size, "num_shards": icfg.num_shards,
        "doc_instruction": icfg.doc_instruction, "include_title": icfg.include_title, "max_length": enc.max_length,
    }
    plan = _resume_plan(out, key, icfg.overwrite)
    if plan is None:
        t = time.perf_counter()
        count = ray.remote(num_cpus=min(0.25, enc.num_cpus_per_actor or 0.25))(count_file)
        counts = [traffic.add(c) for c in ray.get([count.remote(f["uri"], fmt, mapping.__dict__) for f in files])]
        shards = plan_shards(files, counts, fmt, shard_size=icfg.shard_size, num_shards=icfg.num_shards,
                             limit=icfg.limit)
        if not shards:
            read, empty = sum(c["read"] for c in counts), sum(c["empty"] for c in counts)
            raise ValueError(
                f"The corpus has no non-empty documents ({read} read, {empty} empty). Check index.corpus and "
                "index.text_field."
            )
        ntotal = shards[-1]["id_end"]
        stats = {"read": sum(c["read"] for c in counts), "empty": sum(c["empty"] for c in counts)}
        if stats["empty"]:
            logger.warning("Skipped %d empty documents of %d read", stats["empty"], stats["read"])
        resolved = spec.resolve(ntotal, dim)
        plan = {"key": key, "ntotal": ntotal, "shards": shards, "stats": stats, "counts": counts,
                "spec_resolved": resolved.to_dict(), "trained": None, "floats": resolved.keeps_floats}
        out.write_json(PLAN, plan)
        logger.info("Planned %d shards for %d documents from %d file(s) in %.1fs", len(shards), ntotal, len(files),
                    time.perf_counter() - t)
    spec = IndexSpec(**plan["spec_resolved"])
    _save_config(cfg, out)

    mapping_d = mapping.__dict__
    actor_kwargs = dict(
        name_or_path=name, load_kwargs=load_kwargs, output=out.uri if not out.is_local else out.path,
        mapping=mapping_d, parts=[p for p in parts if p in ("sparse", "multivector")], spec=spec.to_dict(),
        dim=dim, trained=plan.get("trained"), batch_size=enc.batch_size, max_length=enc.max_length,
        instruction=icfg.doc_instruction, num_threads=max(1, int(round(enc.num_cpus_per_actor))),
        center=plan.get("center"), floats=bool(plan.get("floats")),
    )
    # 3. train the quantizer on a sample the workers encode
    if spec.trained and not _valid_remote(out, plan.get("trained")):
        plan["trained"], plan["center"] = _train(cfg, out, plan, spec, dim, actor_kwargs, traffic)
        actor_kwargs["trained"] = plan["trained"]
        actor_kwargs["center"] = plan["center"]
        out.write_json(PLAN, plan)

    # 4. shards: the workers write them; the driver gets their sidecars
    done, pending = _done_shards(out, plan, parts, traffic, floats=bool(plan.get("floats")))
    pending_rows = sum(s["rows"] for s in pending)
    logger.info("Index %s: %d shards done, %d to build (%d documents) with %d-%d actors (%s)", out.uri, len(done),
                len(pending), pending_rows, enc.min_actors, enc.max_actors, remote)
    if pending:
        import ray.data

        size = (min(enc.min_actors, len(pending)), max(1, min(enc.max_actors, len(pending))))
        ds = ray.data.from_items([{"shard": json.dumps(s)} for s in pending],
                                 override_num_blocks=len(pending))
        t, rows, nodes = time.perf_counter(), 0, {}
        last_log = t
        for batch in _shard_pool(ds, cfg, actor_kwargs, size).iter_batches(batch_size=1, batch_format="numpy"):
            for s in batch["sidecar"]:
                side = traffic.add(json.loads(s))
                done[side["index"]] = side
                rows += side["rows"]
                nodes[side["node"]] = nodes.get(side["node"], 0) + side["rows"]
            now = time.perf_counter()
            if now - last_log >= enc.log_every_s or len(done) == len(plan["shards"]):
                rate = rows / max(now - t, 1e-9)
                logger.info("Shards %d/%d, %d/%d documents, %.1f docs/s, about %.0fs left", len(done),
                            len(plan["shards"]), rows, pending_rows, rate, (pending_rows - rows) / max(rate, 1e-9))
                last_log = now
        secs = time.perf_counter() - t
        logger.info("Encoded %d documents in %.1fs (%.1f docs/s) on %d node(s)", rows, secs, rows / max(secs, 1e-9),
                    len(nodes))
    missing = [s for s in plan["shards"] if s["index"] not in done]
    if missing:
        raise IndexIntegrityError(
            f"{len(missing)} shards of {out.uri} are still missing (first: {missing[0]['file']}); rerun the build."
        )

    # 5. bm25
    part_recs: dict[str, Any] = _shard_parts(done, plan, parts, icfg.include_title)
    if "bm25" in parts:
        bm = BM25Params.from_config(icfg.bm25)
        ordered = [done[s["index"]] for s in plan["shards"]]
        part_recs["bm25"] = traffic.add(ray.get(ray.remote(num_cpus=enc.num_cpus_per_actor or 0.5)(build_bm25).remote(
            actor_kwargs["output"], ordered, bm.to_dict(), icfg.include_title)))

    # 6. manifest, last
    shards_m = [{k: done[s["index"]][k] for k in ("file", "rows", "id_start", "id_end", "bytes", "sha256", "docs",
                                                   "vectors") if k in done[s["index"]]}
                for s in plan["shards"]]
    manifest = {
        "kind": KIND_DENSE, "format": FORMAT, "format_version": FORMAT_VERSION, "dim": spec.index_dim(dim),
        "embedder_dim": dim, "center": plan.get("center"), "metric": METRIC,
        "index_type": spec.index_type, "storage": spec.storage, "factory": spec.factory_string(),
        "spec": spec.to_dict(), "ntotal": plan["ntotal"], "num_shards": len(shards_m), "shards": shards_m,
        "trained": plan.get("trained"), "parts": part_recs, "embedder": identity, "embedder_name": str(name),
        "corpus": {"mapping": mapping_d, "files": files, "format": fmt, "stats": plan["stats"]},
        "config": redact_config(to_dict(cfg)),
        "build": {"driver_received": traffic.to_dict(), "wall_s": time.perf_counter() - t_start,
                  "docs_per_node": _docs_per_node(done)},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_json(MANIFEST, manifest)
    logger.info("Index complete: %d vectors in %d shards%s at %s; the driver received %d records (%d bytes)",
                plan["ntotal"], len(shards_m), f" + {', '.join(part_recs)}" if part_recs else "", out.uri,
                traffic.records, traffic.bytes)
    return Path(out.path) / MANIFEST if out.is_local else f"{out.uri}/{MANIFEST}"


def _docs_per_node(done: dict[int, dict[str, Any]]) -> dict[str, int]:
    nodes: dict[str, int] = {}
    for side in done.values():
        nodes[side.get("node", "?")] = nodes.get(side.get("node", "?"), 0) + side["rows"]
    return nodes


def _save_config(cfg: Any, out: Any) -> None:
    import yaml

    from rayembed.config import to_dict
    from rayembed.security import redact_config

    out.write_bytes("config.resolved.yaml", yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False).encode())


def _resume_plan(out: Any, key: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """A matching plan to resume; None to plan anew (after clearing a different build when allowed)."""
    if out.exists(PLAN):
        try:
            old = out.read_json(PLAN)
        except (ValueError, OSError):
            old = {}
        if old.get("key") == key:
            logger.info("Resuming the build in %s (%d shards planned)", out.uri, len(old["shards"]))
            return old
        diff = sorted(k for k in set(key) | set(old.get("key") or {}) if key.get(k) != (old.get("key") or {}).get(k))
        if not overwrite:
            raise IndexIntegrityError(
                f"{out.uri} holds a build with a different {', '.join(diff)} ({PLAN}). Choose another "
                "index.output_dir, or set index.overwrite=true to replace it."
            )
        logger.warning("Replacing the build in %s (different %s)", out.uri, ", ".join(diff))
        _clear(out)
    elif out.exists(MANIFEST) or out.exists(SHARDS_DIR):
        if not overwrite:
            raise IndexIntegrityError(
                f"{out.uri} holds index files but no {PLAN}; choose another index.output_dir or set index.overwrite=true."
            )
        _clear(out)
    return None


def _clear(out: Any) -> None:
    """Remove the files a build owns (never anything else in the folder); the manifest first."""
    fs = out.filesystem
    for name in (MANIFEST, PLAN, TRAINED):
        if out.exists(name):
            fs.delete_file(out.join(name).path)
    for sub in (DOCS_DIR, SHARDS_DIR, BM25_DIR, SPARSE_DIR, MULTIVECTOR_DIR):
        if out.exists(sub):
            fs.delete_dir(out.join(sub).path)


def _valid_remote(out: Any, rec: dict[str, Any] | None) -> bool:
    """The file exists with its recorded size (its sha256 is checked by whoever reads it)."""
    import pyarrow.fs as pafs

    if not rec:
        return False
    info = out.filesystem.get_file_info(out.join(rec["file"]).path)
    return info.type == pafs.FileType.File and info.size == rec["bytes"]


def _listing(out: Any) -> dict[str, int]:
    """Every file below ``out`` with its size, from one recursive listing (one request per
    1,000 keys on an object store, instead of one metadata request per file)."""
    import pyarrow.fs as pafs

    infos = out.filesystem.get_file_info(pafs.FileSelector(out.path, allow_not_found=True, recursive=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


def _done_shards(out: Any, plan: dict[str, Any], parts: tuple[str, ...], traffic: DriverTraffic, *,
                 floats: bool = False) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Shards whose sidecar matches the plan, has every asked-for part (and its float vectors when
    ``floats``) and whose files are in place with their recorded sizes (their sha256 is checked by
    whoever reads them)."""
    sizes = _listing(out)

    def in_place(rec: dict[str, Any] | None) -> bool:
        return bool(rec) and sizes.get(out.join(rec["file"]).path) == rec["bytes"]

    done: dict[int, dict[str, Any]] = {}
    pending = []
    for s in plan["shards"]:
        side = None
        if out.join(_sidecar_name(s)).path in sizes:
            with contextlib.suppress(ValueError, OSError):
                side = traffic.add(out.read_json(_sidecar_name(s)))
        ok = (
            side is not None
            and all(side.get(k) == s[k] for k in ("file", "rows", "id_start", "id_end"))
            and all(p in side.get("parts", {}) for p in parts if p in ("sparse", "multivector"))
            and (not floats or "vectors" in side)
            and all(in_place(r) for r in [side, side["docs"]] + ([side["vectors"]] if "vectors" in side else [])
                    + [f for p in side.get("parts", {}).values() for f in _part_shard_files(p)])
        )
        if ok:
            done[s["index"]] = side
        else:
            pending.append(s)
    return done, pending


def _shard_parts(done: dict[int, dict[str, Any]], plan: dict[str, Any], parts: tuple[str, ...],
                 include_title: bool) -> dict[str, Any]:
    """The manifest records of the per-shard parts (sparse, multivector) from the sidecars."""
    recs: dict[str, Any] = {}
    for part in ("sparse", "multivector"):
        if part not in parts:
            continue
        entries = [dict(done[s["index"]]["parts"][part]) for s in plan["shards"]]
        rec: dict[str, Any] = {"settings": {"include_title": include_title}, "complete": True}
        if part == "sparse":
            rec["vocab_size"] = entries[0].pop("vocab_size")
            for e in entries[1:]:
                e.pop("vocab_size", None)
        else:
            rec["settings"]["dtype"] = "float16"
            rec["dim"] = max(e.pop("dim") for e in entries)
        rec["shards"] = entries
        recs[part] = rec
    return recs


def _train(cfg: Any, out: Any, plan: dict[str, Any], spec: IndexSpec, dim: int, actor_kwargs: dict[str, Any],
           traffic: DriverTraffic) -> tuple[dict[str, Any], list[float] | None]:
    """Encode a seeded sample on the actor pool, train the empty index on it, write ``trained.index``;
    returns its record and the binary centre (the sample's mean; None for other storages)."""
    import ray.data

    n = plan["ntotal"]
    rng = np.random.default_rng(cfg.seed)
    ids = np.sort(rng.choice(n, size=min(spec.train_size, n), replace=False))
    rows = []
    for s in plan["shards"]:
        local = ids[(ids >= s["id_start"]) & (ids < s["id_end"])] - s["id_start"]
        if len(local):
            rows.append({"shard": json.dumps(s), "positions": json.dumps(local.tolist())})
    enc = cfg.index.encode
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    kwargs = {**actor_kwargs, "trained": None, "parts": []}
    vecs = []
    for b in _shard_pool(ds, cfg, kwargs, (1, max(1, min(enc.max_actors, len(rows))))).iter_batches(
            batch_size=None, batch_format="numpy"):
        vecs.append(b["vector"])
    vectors = np.concatenate(vecs)  # (train_size, dim): bounded by index.train_size, not the corpus
    traffic.records += len(rows)
    traffic.bytes += int(vectors.nbytes)
    vectors = prepare_vectors(vectors, spec)
    center = corpus_center(vectors) if spec.binary else None
    index = new_index(spec, spec.index_dim(dim))
    t = time.perf_counter()
    train_index(index, vectors, cfg.index.use_gpu, center)
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / TRAINED
        write_index_verified(index, local)
        rec = _file_record(Path(d), local)
        out.put_file(local, TRAINED)
    logger.info("Trained %s on %d vectors in %.1fs", spec.factory_string(), len(vectors), time.perf_counter() - t)
    return rec, (center.tolist() if center is not None else None)


def _lexical_only(cfg: Any, out: Any, files: list[dict[str, Any]], fmt: str, mapping: ColumnMapping) -> Path | str:
    """A BM25-only index: built in this process from the corpus files, then published (manifest last)."""
    from rayembed.config import to_dict
    from rayembed.index.builder import build_lexical_index
    from rayembed.security import redact_config

    icfg = cfg.index
    if len(files) != 1:
        raise ValueError("A BM25-only index reads one corpus file; point index.corpus at one file.")
    logger.info("Building a BM25-only index (index.parts=%s): no embedder is loaded", list(icfg.parts))
    if out.is_local:
        return build_lexical_index(
            files[0]["uri"], out.path, bm25=icfg.bm25, shard_size=None if icfg.num_shards else icfg.shard_size,
            num_shards=icfg.num_shards, mapping=mapping, overwrite=icfg.overwrite, format=fmt,
            config=redact_config(to_dict(cfg)), limit=icfg.limit,
        )
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / ("corpus" + PurePosixPath(files[0]["uri"]).suffix)
        from rayembed.cluster.storage import resolve_storage

        corpus.write_bytes(resolve_storage(files[0]["uri"]).read_bytes(""))
        local = Path(d) / "index"
        build_lexical_index(corpus, local, bm25=icfg.bm25, shard_size=None if icfg.num_shards else icfg.shard_size,
                            num_shards=icfg.num_shards, mapping=mapping, overwrite=True, format=fmt,
                            config=redact_config(to_dict(cfg)), limit=icfg.limit)
        for p in sorted(local.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                out.put_file(p, p.relative_to(local).as_posix())
        out.put_file(local / MANIFEST, MANIFEST)
    return f"{out.uri}/{MANIFEST}"


def build_indexes(cfg: Any, corpora: dict[str, str], *, embedder: str | None = None) -> dict[str, Path | str]:
    """Index several corpora with one embedder (e.g. the model a pipeline just trained).

    ``corpora`` maps a name to a corpus (``{"msmarco": "msmarco-subset", "cranfield": "cranfield"}``;
    the format is detected: BEIR folder, SMART ``cran.all.1400``, JSONL, Parquet). Each index goes
    to ``<index.output_dir or run_dir/index>/<name>``. Returns ``{name: manifest location}``.
    """
    import dataclasses

    base = str(cfg.index.output_dir or Path(cfg.run_dir) / "index").rstrip("/")
    out: dict[str, Path | str] = {}
    for name, corpus in corpora.items():
        icfg = dataclasses.replace(cfg.index, corpus=corpus, format="auto", output_dir=f"{base}/{name}",
                                   embedder=embedder or cfg.index.embedder)
        out[name] = build_index(dataclasses.replace(cfg, index=icfg))
    return out


# ----------------------------------------------------------------------------- encoding only (benchmarks)


class EncoderActor:
    """A Ray Data actor mapping ``{id, text, title}`` batches to ``{id, vector}`` (no index written);
    an ``instruction`` column formats each row as a query with its own instruction.

    The shard build uses :class:`ShardActor`; this one serves encoding comparisons and callers
    that want vectors back. A LoRA adapter is merged once at load for inference.
    """

    def __init__(self, name_or_path: str, load_kwargs: dict[str, Any], *, batch_size: int = 64,
                 max_length: int | None = None, instruction: str | None = None, include_title: bool = True,
                 num_threads: int | None = None):
        import torch

        from rayembed.modeling.embedder import Embedder

        if num_threads:
            torch.set_num_threads(num_threads)
        self.emb = Embedder.from_pretrained(name_or_path, **load_kwargs)
        if self.emb.is_peft:
            self.emb.merge_lora()
        self.batch_size = batch_size
        self.max_length = max_length
        self.instruction = instruction
        self.include_title = include_title

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        titles = batch.get("title")
        if titles is None:
            titles = [""] * len(batch["text"])
        texts = [encode_text(str(t), "" if ti is None else str(ti), self.include_title)
                 for t, ti in zip(batch["text"], titles)]
        instruction = self.instruction
        if "instruction" in batch:  # one instruction per row (queries): formatted here, not per batch
            texts = [self.emb.format_query(t, str(i)) if i else t for t, i in zip(texts, batch["instruction"])]
            instruction = None
        vectors = self.emb.encode(texts, instruction=instruction, batch_size=self.batch_size,
                                  max_length=self.max_length, show_progress=False)  # (B, dim)
        return {"id": np.asarray(batch["id"], dtype=np.int64), "vector": vectors}


@contextlib.contextmanager
def _ordered():
    """Ray Data in input order."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old


def _encode_dataset(ds, cfg: Any, name: str, load_kwargs: dict[str, Any]):
    """``ds`` of ``{id, text, title}`` -> ``{id, vector}`` on the autoscaling actor pool."""
    from ray.data import ActorPoolStrategy

    enc = cfg.index.encode
    # Each call gets a whole block: the actor sorts its texts by length and encodes them in
    # batches of enc.batch_size, so batches carry little padding (as Embedder.encode in process
    # does over the whole corpus). A call per enc.batch_size rows would pad each batch to its
    # longest text, whatever the lengths around it.
    return ds.repartition(target_num_rows_per_block=enc.rows_per_block).map_batches(
        EncoderActor,
        compute=ActorPoolStrategy(min_size=enc.min_actors, max_size=enc.max_actors),
        batch_size=enc.rows_per_block,
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            name_or_path=name, load_kwargs=load_kwargs, batch_size=enc.batch_size, max_length=enc.max_length,
            instruction=cfg.index.doc_instruction, include_title=cfg.index.include_title,
            num_threads=max(1, int(round(enc.num_cpus_per_actor))),
        ),
        **_remote_args(enc),
    )

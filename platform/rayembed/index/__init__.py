"""Corpus encoding into verified FAISS shards, and sharded search.

Public API::

    from rayembed.index import ShardedIndex, build_index_in_process, build_index

    manifest = build_index_in_process("all-minilm-l6-v2", docs, "runs/idx", index_type="hnsw", num_shards=4)
    manifest = build_index(cfg)                       # Ray Data actor pool, from the ``index`` config
    idx = ShardedIndex.open(manifest, expected_embedder=emb)
    scores, ids = idx.search(query_vectors, k=10)     # (n, k) float32, (n, k) int64 global ids
    docs = idx.get_documents(ids[0])

    # Parts beside the shards, and a BM25-only index (no model); search them with rayembed.search.
    build_index_in_process(emb, docs, "runs/idx", parts=("dense", "bm25", "sparse", "multivector"))
    build_lexical_index(docs, "runs/bm25")

See :mod:`rayembed.index.builder` for the build protocol and :mod:`rayembed.index.manifest` for
the files on disk, :mod:`rayembed.index.lexical` for the extra parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rayembed.index.manifest import IndexIntegrityError, UnsafePathError

if TYPE_CHECKING:
    from rayembed.index.builder import build_index_from_vectors, build_index_in_process, build_lexical_index
    from rayembed.index.ray_build import EncoderActor, build_index, build_indexes
    from rayembed.index.sharded import ShardedIndex

_LAZY = {
    "ShardedIndex": "rayembed.index.sharded",
    "build_index_in_process": "rayembed.index.builder",
    "build_index_from_vectors": "rayembed.index.builder",
    "build_lexical_index": "rayembed.index.builder",
    "build_index": "rayembed.index.ray_build",
    "build_indexes": "rayembed.index.ray_build",
    "EncoderActor": "rayembed.index.ray_build",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import rayembed.index` does not import faiss, torch or ray.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayembed.index' has no attribute {name!r}")


__all__ = [
    "EncoderActor",
    "IndexIntegrityError",
    "ShardedIndex",
    "UnsafePathError",
    "build_index",
    "build_index_from_vectors",
    "build_indexes",
    "build_index_in_process",
    "build_lexical_index",
]

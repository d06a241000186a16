"""Compact vectors on real MiniLM vectors of the MS MARCO subset: binary and int8 codes with
rescoring of the top 4k candidates by the float vectors on disk reach recall@10 >= 0.95 against
exact float32 search. The test encodes the first 1,500 passages (a fresh CI cache pays for the
encoding); bench/compact.py measures all 5,000 and a larger random set.

The same holds through a built index (``index.storage`` binary / sq8 with ``rescore_k``: the
manifest, the float copies beside the shards, ``ShardedIndex.search``); binary without rescoring
returns Hamming-based scores, an ``index.dims`` index takes full-size queries, a changed float
copy fails verification, and bad keys are clear config errors."""

from __future__ import annotations

import numpy as np
import pytest
from index_helpers import brute_force, recall
from minilm_vectors import minilm_msmarco

from rayembed.index.quantize import CompactIndex, save_vectors, truncate


@pytest.fixture(scope="module")
def minilm(data_dir, tmp_path_factory):
    docs, queries = minilm_msmarco(data_dir, n_docs=1500)
    path = save_vectors(docs, tmp_path_factory.mktemp("vecs") / "docs.npy")
    # The 50 real queries, plus 150 passages used as queries (more pairs, same distribution).
    q = np.concatenate([queries, docs[::10] + 0.0])
    return path, docs, q


@pytest.mark.parametrize(("kind", "bytes_per_vector"), [("binary", 48), ("int8", 384)])
def test_compact_codes_with_rescoring_keep_recall(minilm, kind, bytes_per_vector):
    path, docs, q = minilm
    _, truth = brute_force(docs, q, 10)
    idx = CompactIndex.build(path, kind=kind)
    assert isinstance(idx.floats, np.memmap)  # floats stay on disk, read for the candidates only
    assert idx.memory_bytes_per_vector() == bytes_per_vector  # fp32 is 1536
    s, ids = idx.search(q, 10, rescore_k=40)
    assert recall(ids, truth) >= 0.95
    exact = np.einsum("qd,qkd->qk", q, docs[ids])
    np.testing.assert_allclose(s, exact, atol=1e-5)  # rescored scores are the float inner products
    if kind == "binary":
        _, raw = idx.search(q, 10)  # without rescoring binary alone is clearly worse
        assert recall(raw, truth) < recall(ids, truth)


def test_truncation_renormalises():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = truncate(x, 16)
    assert y.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(y, x[:, :16] / np.linalg.norm(x[:, :16], axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="dims must be in 1..64"):
        truncate(x, 65)


# ----------------------------------------------------------------------------- built indexes (manifest, ShardedIndex)


def _hamming_scores(x: np.ndarray, q: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(nq, n) inner products of the ±1 sign vectors of ``q`` and ``x`` less ``center``."""
    sx, sq = np.where(x - center > 0, 1.0, -1.0), np.where(q - center > 0, 1.0, -1.0)
    return sq @ sx.T


@pytest.mark.parametrize(("storage", "code_bytes"), [("binary", 48), ("sq8", 384)])
def test_built_compact_index_with_rescoring_keeps_recall(minilm, tmp_path, storage, code_bytes):
    from rayembed.index import ShardedIndex, build_index_from_vectors
    from rayembed.index.faiss_util import inner_index

    _, docs, q = minilm
    _, truth = brute_force(docs, q, 10)
    idx = ShardedIndex.open(build_index_from_vectors(docs, tmp_path / storage, storage=storage, rescore_k=40))
    m = idx.manifest
    assert m["storage"] == storage and m["factory"] == {"binary": "BFlat", "sq8": "SQ8"}[storage]
    assert m["spec"]["rescore_k"] == 40 and (m["center"] is not None) == (storage == "binary")
    floats = m["shards"][0]["vectors"]
    assert floats["file"] == "shards/shard-00000.npy" and floats["bytes"] >= 1500 * 384 * 4 and len(floats["sha256"]) == 64
    assert isinstance(idx._floats[0], np.memmap)  # read from disk for the candidates only
    assert inner_index(idx.shards[0]).code_size == code_bytes  # bytes per vector in memory; fp32 is 1536
    s, ids = idx.search(q, 10)  # the index's rescore_k: 40 candidates re-scored
    assert recall(ids, truth) >= 0.95
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, docs[ids]), atol=1e-5)  # exact float scores
    s2, ids2 = idx.search(q, 10, rescore_k=0)  # the compact codes alone
    if storage == "binary":
        assert recall(ids2, truth) < recall(ids, truth)


def test_binary_index_without_rescoring_returns_hamming_scores(minilm, tmp_path):
    from rayembed.index import ShardedIndex, build_index_from_vectors

    _, docs, q = minilm
    docs, q = docs[:600], q[:20]
    idx = ShardedIndex.open(build_index_from_vectors(docs, tmp_path / "b0", storage="binary", rescore_k=0,
                                                     num_shards=2))
    assert not idx.has_floats and not list((tmp_path / "b0" / "shards").glob("*.npy"))
    center = np.asarray(idx.manifest["center"], np.float32)
    np.testing.assert_allclose(center, docs.mean(axis=0), atol=1e-6)  # train_size covers all 600
    s, ids = idx.search(q, 10)
    want = -np.sort(-_hamming_scores(docs, q, center), axis=1)[:, :10]  # 384 - 2 * hamming, best first
    np.testing.assert_array_equal(s, want)
    np.testing.assert_array_equal(np.take_along_axis(_hamming_scores(docs, q, center), ids, axis=1), s)
    with pytest.raises(ValueError, match="rescore_k=40 needs the float vectors"):
        idx.search(q, 10, rescore_k=40)
    # A metadata-style restriction and tombstones work on binary shards too (IDSelector on BFlat).
    allowed = np.zeros(600, bool)
    allowed[::7] = True
    _, fids = idx.search(q, 5, allowed=allowed)
    assert (fids % 7 == 0).all()


def test_binary_ivf_filters_by_overfetching(minilm, tmp_path):
    from rayembed.index import ShardedIndex, build_index_from_vectors

    _, docs, q = minilm
    idx = ShardedIndex.open(build_index_from_vectors(docs, tmp_path / "bivf", storage="binary", index_type="ivf_flat",
                                                     nlist=8, num_shards=2))
    assert idx.manifest["factory"] == "BIVF8" and idx._overfetch
    allowed = np.zeros(len(docs), bool)
    allowed[::5] = True
    q = q[:60]
    s, ids = idx.search(q, 10, allowed=allowed, nprobe=8, rescore_k=200)  # every list, all 150 allowed per shard
    _, truth = brute_force(docs[allowed], q, 10)
    np.testing.assert_array_equal(ids, np.flatnonzero(allowed)[truth])
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, docs[ids]), atol=1e-5)


def test_dims_index_takes_full_queries(vectors, tmp_path):
    from rayembed.index import ShardedIndex, build_index_from_vectors

    x, q = vectors  # 32-d
    idx = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "d16", dims=16, num_shards=2))
    assert idx.dim == 32 and idx.index_dim == 16 and idx.manifest["dim"] == 16
    assert idx.manifest["embedder_dim"] == 32 and idx.manifest["spec"]["dims"] == 16
    s, ids = idx.search(q, 10)  # full 32-d queries, cut and re-normalised by the index
    want_s, want_i = brute_force(truncate(x, 16), truncate(q, 16), 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(s, want_s, atol=1e-5)
    s16, ids16 = idx.search(truncate(q, 16), 10)  # already cut: taken as they are
    np.testing.assert_array_equal(ids16, ids)
    with pytest.raises(ValueError, match=r"shape \(n, 32\) or \(n, 16\)"):
        idx.search(q[:, :20], 10)
    # binary + dims + rescoring: the float copy is the cut vectors too.
    b = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "b16", dims=16, storage="binary"))
    assert b.manifest["factory"] == "BFlat" and b._floats[0].shape == (3000, 16)
    bs, bids = b.search(q, 10, rescore_k=3000)
    np.testing.assert_array_equal(bids, want_i)


def test_tampered_float_vectors_are_caught(vectors, tmp_path):
    from rayembed.index import IndexIntegrityError, ShardedIndex, build_index_from_vectors
    from rayembed.index.manifest import index_files

    x, _ = vectors
    m = build_index_from_vectors(x[:500], tmp_path / "sq8", storage="sq8", num_shards=2)
    rec = ShardedIndex.open(m).manifest["shards"][1]["vectors"]
    assert rec in index_files(ShardedIndex.open(m).manifest)  # copied, downloaded and verified like every file
    path = tmp_path / "sq8" / rec["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one float changed
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"float vectors of shard 1 .*shard-00001.npy fails its sha256"):
        ShardedIndex.open(m)
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(IndexIntegrityError, match="has 1 bytes|bytes but the manifest records"):
        ShardedIndex.open(m, verify=False)


def test_compact_storage_config_errors(vectors, tmp_path):
    from rayembed.config import ConfigError, load_config
    from rayembed.index import build_index_from_vectors

    with pytest.raises(ConfigError, match="storage=binary works with index_type flat or ivf_flat.*index.index_type=flat"):
        load_config(None, ["index.storage=binary", "index.index_type=hnsw"])
    with pytest.raises(ConfigError, match="index.dims=100 with storage binary.*divisible by 8.*index.dims=96"):
        load_config(None, ["index.storage=binary", "index.dims=100"])
    with pytest.raises(ConfigError, match="index.rescore_k=40 .*storage fp32 has none.*sq8 or binary"):
        load_config(None, ["index.rescore_k=40"])
    with pytest.raises(ConfigError, match="index.rescore_k must be >= 0"):
        load_config(None, ["index.storage=sq8", "index.rescore_k=-1"])
    cfg = load_config(None, ["index.storage=binary", "index.rescore_k=40", "index.dims=256"])
    assert (cfg.index.storage, cfg.index.rescore_k, cfg.index.dims) == ("binary", 40, 256)
    x, _ = vectors
    with pytest.raises(ConfigError, match="index.dims=64 must be between 1 and the embedder's dimension 32"):
        build_index_from_vectors(x[:50], tmp_path / "a", dims=64)
    with pytest.raises(ConfigError, match="needs a dimension divisible by 8, but the vectors have 12.*index.dims"):
        build_index_from_vectors(x[:50], tmp_path / "b", dims=12, storage="binary")

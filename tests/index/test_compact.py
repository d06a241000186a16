"""Compact vectors on real MiniLM vectors of the MS MARCO subset: binary and int8 codes with
rescoring of the top 4k candidates by the float vectors on disk reach recall@10 >= 0.95 against
exact float32 search. The test encodes the first 1,500 passages (a fresh CI cache pays for the
encoding); bench/compact.py measures all 5,000 and a larger random set."""

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

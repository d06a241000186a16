"""Flat equals brute force; IVF/HNSW recall; sharded top-k equals one index; merging; documents."""

from __future__ import annotations

import numpy as np
import pytest
from index_helpers import brute_force, recall

from rayembed.index import ShardedIndex, build_index_from_vectors


def test_flat_equals_brute_force(vectors, tmp_path):
    x, q = vectors
    idx = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "flat", index_type="flat"))
    scores, ids = idx.search(q, 10)
    want_scores, want_ids = brute_force(x, q, 10)
    assert scores.shape == (50, 10) and scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize(
    "index_type,opts,params",
    [
        ("ivf_flat", {"nlist": 32}, {"nprobe": 20}),
        ("ivf_flat", {"nlist": 32, "storage": "sq8"}, {"nprobe": 20}),
        ("hnsw", {}, {"ef_search": 128}),
        ("hnsw", {"storage": "fp16"}, {"ef_search": 128}),
    ],
)
def test_approximate_recall_at_10(vectors, tmp_path, index_type, opts, params):
    x, q = vectors
    exact = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "flat", index_type="flat"))
    approx = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "approx", index_type=index_type, **opts))
    _, truth = exact.search(q, 10)
    _, found = approx.search(q, 10, **params)
    assert recall(found, truth) >= 0.9


def test_query_time_params_change_results(vectors, tmp_path):
    x, q = vectors
    idx = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "ivf", index_type="ivf_flat", nlist=32))
    _, truth = brute_force(x, q, 10)
    low = recall(idx.search(q, 10, nprobe=1)[1], truth)
    high = recall(idx.search(q, 10, nprobe=32)[1], truth)
    assert high == 1.0 and low < high


@pytest.mark.parametrize("index_type", ["flat", "ivf_flat", "hnsw"])
def test_four_shards_match_one_index_and_merge(vectors, tmp_path, index_type):
    x, q = vectors
    opts = {"nlist": 16} if index_type == "ivf_flat" else {}
    one = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "one", index_type=index_type, **opts))
    four = ShardedIndex.open(
        build_index_from_vectors(x, tmp_path / "four", index_type=index_type, num_shards=4, **opts)
    )
    assert four.num_shards == 4 and four.ntotal == one.ntotal == 3000
    params = {"nprobe": 16} if index_type == "ivf_flat" else {"ef_search": 256}
    s1, i1 = one.search(q, 10, **params)
    s4, i4 = four.search(q, 10, **params)
    if index_type == "hnsw":  # separate graphs: compare recall, not identity
        assert recall(i4, i1) >= 0.95
    else:
        np.testing.assert_array_equal(i4, i1)
        np.testing.assert_allclose(s4, s1, atol=1e-5)
    merged = four.merged()
    assert merged.ntotal == 3000
    sm, im = merged.search(q, 10)
    if index_type == "hnsw":
        assert recall(im, i1) >= 0.95
    else:
        np.testing.assert_array_equal(im, i1)


@pytest.mark.parametrize("index_type,storage", [("ivf_flat", "fp32"), ("ivf_flat", "sq8"), ("ivf_pq", "fp32")])
def test_sharded_ivf_equals_one_ivf_index_with_the_same_quantizer(vectors, tmp_path, index_type, storage):
    import faiss

    from rayembed.index.faiss_util import bitmap_selector, selector_params

    x, q = vectors
    opts = {"nlist": 16, "storage": storage, "rescore_k": 0} if index_type == "ivf_flat" else \
        {"nlist": 16, "pq_m": 8, "pq_nbits": 4}
    four = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "four", index_type=index_type, num_shards=4,
                                                      **opts))
    assert four._ivfs is not None  # one trained quantizer: one coarse assignment for every shard
    one = four.merged()  # every list under that quantizer in one IVF index
    allowed = np.random.default_rng(5).random(len(x)) < 0.3
    sel, _bitmap = bitmap_selector(allowed)
    for nprobe in (1, 4):  # partial probes: the cells scanned must be the one index's
        want_s, want_i = one.search(q, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
        got_s, got_i = four.search(q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, atol=1e-5)
        want_s, want_i = one.search(q, 10, params=selector_params(one, sel, nprobe=nprobe))
        got_s, got_i = four.search(q, 10, nprobe=nprobe, allowed=allowed)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, atol=1e-5)
        assert allowed[got_i[got_i >= 0]].all()


def test_global_ids_and_documents(vectors, tmp_path):
    x, q = vectors
    docs = [{"id": f"d{i}", "text": f"text {i}", "title": f"t{i}", "lang": "en"} for i in range(len(x))]
    from rayembed.index.corpus import ColumnMapping

    m = build_index_from_vectors(
        x, tmp_path / "idx", docs=docs, index_type="flat", shard_size=700,
        mapping=ColumnMapping(metadata_fields=["lang"]),
    )
    idx = ShardedIndex.open(m)
    assert idx.num_shards == 5
    assert [(s["id_start"], s["id_end"]) for s in idx.manifest["shards"]][-1] == (2800, 3000)
    # Each shard holds exactly its global id range.
    import faiss

    for shard, rec in zip(idx.shards, idx.manifest["shards"]):
        ids = faiss.vector_to_array(faiss.downcast_index(shard).id_map)
        np.testing.assert_array_equal(np.sort(ids), np.arange(rec["id_start"], rec["id_end"]))
    # A document's own vector finds it under its global id.
    _, ids = idx.search(x[[5, 1234, 2999]], 1)
    assert ids[:, 0].tolist() == [5, 1234, 2999]
    got = idx.get_documents([1234, -1])
    assert got[0] == {"id": 1234, "doc_id": "d1234", "text": "text 1234", "title": "t1234", "metadata": {"lang": "en"}}
    assert got[1] is None
    with pytest.raises(KeyError, match="not in this index"):
        idx.get_documents([3000])
    assert len(idx.version) == 16 and idx.dim == 32


def test_fewer_than_k_results(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    idx = ShardedIndex.open(build_index_from_vectors(x, tmp_path / "tiny", num_shards=2, index_type="flat"))
    scores, ids = idx.search(x[:1], 5)
    assert ids.shape == (1, 5) and ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        idx.search(np.zeros((1, 4), np.float32), 3)


def test_ivf_pq_builds_and_searches(vectors, tmp_path):
    x, q = vectors
    idx = ShardedIndex.open(
        build_index_from_vectors(x, tmp_path / "pq", index_type="ivf_pq", nlist=8, pq_m=8, pq_nbits=4, num_shards=2)
    )
    assert idx.manifest["factory"] == "IVF8,PQ8x4np" and idx.manifest["trained"]["file"] == "trained.index"
    _, ids = idx.search(x[:20], 10, nprobe=8)
    _, truth = brute_force(x, x[:20], 10)
    assert recall(ids, truth) >= 0.3  # 4-byte codes of 32-d vectors: coarse by design


def _ivf(x):
    import faiss

    ivf = faiss.index_factory(x.shape[1], "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    return ivf


def test_nprobe_reaches_every_ivf_inside_shards_and_replicas(vectors):
    """What index_cpu_to_all_gpus returns with several GPUs: nprobe must reach each member."""
    import faiss

    from rayembed.index.faiss_util import set_search_params

    x, _ = vectors
    ivf, d = _ivf(x[:400]), x.shape[1]
    shards, replicas = faiss.IndexShards(d, True, False), faiss.IndexReplicas(d, True)
    members = [faiss.clone_index(ivf) for _ in range(4)]  # kept alive: the wrappers do not own them
    shards.add_shard(members[0])
    shards.add_shard(members[1])
    replicas.add_replica(members[2])
    replicas.add_replica(members[3])
    for wrapper in (shards, replicas):
        set_search_params(wrapper, nprobe=5)
        assert [faiss.extract_index_ivf(wrapper.at(i)).nprobe for i in range(wrapper.count())] == [5, 5]
    set_search_params(faiss.IndexIDMap(faiss.IndexFlatIP(d)), nprobe=5)  # no nprobe to set: left alone


@pytest.mark.gpu
def test_gpu_ivf_searches_with_the_nprobe_asked_for(vectors):
    import faiss

    from rayembed.index.faiss_util import set_search_params, to_gpu

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this faiss build has no GPU support (pip uninstall faiss-cpu; pip install faiss-gpu-cu12)")
    x, q = vectors
    cpu = _ivf(x[:400])
    gpu = to_gpu(cpu, "true")
    assert "Gpu" in type(gpu).__name__ or isinstance(gpu, (faiss.IndexReplicas, faiss.IndexShards))
    for nprobe in (1, 8):
        set_search_params(cpu, nprobe=nprobe)
        set_search_params(gpu, nprobe=nprobe)
        assert np.array_equal(cpu.search(q[:20], 5)[1], gpu.search(q[:20], 5)[1]), nprobe

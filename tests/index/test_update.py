"""A living index: `rayembed index update` (delta shards, tombstones), compaction, atomic updates,
IVF deltas on the base's quantizer, and updates of an index in object storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_helpers import brute_force, unit

from rayembed.index import ShardedIndex, build_index_from_vectors, build_index_in_process
from rayembed.index.update import compact_index, update_index


def _corpus(n: int) -> list[dict]:
    topics = ["rivers", "wing flaps", "faiss", "tax law", "jazz", "volcanoes", "chess"]
    return [{"id": f"doc-{i}", "text": f"document {i} is about {topics[i % 7]} and item {i * 13 % 29}",
             "title": f"T{i % 11}"} for i in range(n)]


def _answers(idx: ShardedIndex, q: np.ndarray, k: int, **kw):
    scores, ids = idx.search(q, k, **kw)
    docs = [[d["doc_id"] for d in idx.get_documents(row)] for row in ids]
    return scores, docs


@pytest.fixture(scope="module")
def emb(tiny_embedder_dir):
    from rayembed.modeling.embedder import Embedder

    return Embedder.from_pretrained(tiny_embedder_dir)


def test_update_equals_fresh_build_and_compaction_keeps_answers(emb, tiny_embedder_dir, tmp_path):
    from rayembed.cli import main

    base = _corpus(80)
    build_index_in_process(emb, base, tmp_path / "idx", num_shards=2, batch_size=16)
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    # 10 upserts: 4 replace existing documents (new text), 6 are new; 5 deletes (+1 unknown id).
    ups = [{"id": f"doc-{i}", "text": f"rewritten document {i} about glaciers", "title": "G"} for i in (3, 17, 40, 79)]
    ups += [{"id": f"new-{i}", "text": f"a new document {i} about rivers and glaciers", "title": "N"} for i in range(6)]
    gone = ["doc-0", "doc-5", "doc-41", "doc-42", "doc-78"]
    (tmp_path / "ups.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ups))
    (tmp_path / "gone.txt").write_text("\n".join(gone + ["no-such-doc"]) + "\n")
    assert main(["index", "update", "--index", str(tmp_path / "idx"), "--upsert", str(tmp_path / "ups.jsonl"),
                 "--delete", str(tmp_path / "gone.txt"), "--embedder", str(tiny_embedder_dir)]) == 0

    final = {d["id"]: d for d in base}
    for d in gone:
        final.pop(d)
    final.update({d["id"]: d for d in ups})
    build_index_in_process(emb, list(final.values()), tmp_path / "fresh", batch_size=16)

    upd, fresh = ShardedIndex.open(tmp_path / "idx", expected_embedder=emb), ShardedIndex.open(tmp_path / "fresh")
    m = upd.manifest
    assert m["version"] == 2 and m["format_version"] == 2 and upd.manifest_version == 2
    assert [s.get("delta") for s in m["shards"]] == [None, None, 2]
    assert m["tombstones"]["count"] == 9 and len(m["tombstones"]["sha256"]) == 64  # 5 deleted + 4 replaced
    assert upd.live_count == fresh.ntotal == 81
    q = emb.encode_queries(["glaciers", "rivers", "jazz music", "chess openings", "tax law", "wing flaps"], None)
    s_upd, d_upd = _answers(upd, q, 20)
    s_new, d_new = _answers(fresh, q, 20)
    assert d_upd == d_new
    np.testing.assert_allclose(s_upd, s_new, atol=1e-5)
    # Every live document is reachable, no tombstoned one ever is.
    _, every = _answers(upd, q, 81)
    assert all(sorted(row) == sorted(final) for row in every)
    assert upd.get_documents([int(upd.search(emb.encode_documents(["G rewritten document 3 about glaciers"]), 1)[1][0, 0])]
                             )[0]["text"] == "rewritten document 3 about glaciers"

    # A second update that stops before its manifest changes nothing (updates are atomic).
    with pytest.raises(RuntimeError, match="before its manifest"):
        update_index(tmp_path / "idx", delete=["doc-1"], upsert=[{"id": "x", "text": "x"}], embedder=emb,
                     fail_after_encode=True)
    assert ShardedIndex.open(tmp_path / "idx").version == upd.version

    assert main(["index", "compact", "--index", str(tmp_path / "idx")]) == 0
    comp = ShardedIndex.open(tmp_path / "idx", expected_embedder=emb)
    assert comp.manifest["version"] == 3 and comp.manifest["format_version"] == 1
    assert not comp.manifest.get("tombstones") and comp.ntotal == comp.live_count == 81
    assert not any(s.get("delta") for s in comp.manifest["shards"])
    s_c, d_c = _answers(comp, q, 20)
    assert d_c == d_upd
    np.testing.assert_allclose(s_c, s_upd, atol=1e-6)
    assert before != (tmp_path / "idx" / "manifest.json").read_bytes()


def test_ivf_deltas_use_the_base_quantizer(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    x = unit(rng, 1200, 16)
    docs = [{"id": f"d{i}", "text": f"t{i}"} for i in range(len(x))]
    build_index_from_vectors(x, tmp_path / "ivf", docs=docs, index_type="ivf_flat", nlist=16, num_shards=2)
    new_vecs = unit(rng, 30, 16)
    by_text = {f"n{i}": v for i, v in enumerate(new_vecs)}
    ups = [{"id": f"d{i}", "text": f"n{i}"} for i in range(10)] + [{"id": f"e{i}", "text": f"n{i}"} for i in range(10, 30)]
    summary = update_index(tmp_path / "ivf", upsert=ups, delete=[f"d{i}" for i in range(100, 150)],
                           encode=lambda texts: np.stack([by_text[t] for t in texts]))
    assert summary["replaced"] == 10 and summary["deleted"] == 50 and summary["live"] == 1200 - 50 + 20
    idx = ShardedIndex.open(tmp_path / "ivf")
    assert idx._ivfs is not None  # one quantizer for base and delta: the shared-assignment search applies
    base_q = faiss.extract_index_ivf(idx.shards[0]).quantizer.reconstruct_n(0, 16)
    delta_q = faiss.extract_index_ivf(idx.shards[-1]).quantizer.reconstruct_n(0, 16)
    np.testing.assert_array_equal(base_q, delta_q)
    # With every list probed the quantizer's cells do not matter: answers equal brute force over the final corpus.
    final = {d["id"]: x[i] for i, d in enumerate(docs) if not 100 <= i < 150}
    final.update({d["id"]: by_text[d["text"]] for d in ups})
    names = list(final)
    mat = np.stack([final[n] for n in names])
    q = unit(rng, 25, 16)
    truth_s, truth_i = brute_force(mat, q, 10)
    s, d = _answers(idx, q, 10, nprobe=16)
    assert d == [[names[j] for j in row] for row in truth_i]
    np.testing.assert_allclose(s, truth_s, atol=1e-5)
    compact_index(tmp_path / "ivf")
    s_c, d_c = _answers(ShardedIndex.open(tmp_path / "ivf"), q, 10, nprobe=4)
    s_u, d_u = _answers(idx, q, 10, nprobe=4)
    assert d_c == d_u  # codes and lists are copied, so even a partial probe answers the same
    np.testing.assert_allclose(s_c, s_u, atol=1e-6)


def test_binary_dims_deltas_share_the_centre_and_keep_floats(tmp_path):
    from rayembed.index.quantize import truncate

    rng = np.random.default_rng(4)
    x = unit(rng, 600, 32)
    docs = [{"id": f"d{i}", "text": f"t{i}"} for i in range(len(x))]
    build_index_from_vectors(x, tmp_path / "bin", docs=docs, storage="binary", dims=16, num_shards=2)
    new_vecs = unit(rng, 40, 32)  # the embedder's full dimension: the update cuts them to 16
    by_text = {f"n{i}": v for i, v in enumerate(new_vecs)}
    ups = [{"id": f"d{i}", "text": f"n{i}"} for i in range(10)] + [{"id": f"e{i}", "text": f"n{i}"} for i in range(10, 40)]
    update_index(tmp_path / "bin", upsert=ups, delete=[f"d{i}" for i in range(100, 130)],
                 encode=lambda texts: np.stack([by_text[t] for t in texts]))
    idx = ShardedIndex.open(tmp_path / "bin")
    delta = idx.manifest["shards"][-1]
    assert delta["delta"] == 2 and delta["vectors"]["file"] == "shards/delta-v0002-00000.npy"
    final = {d["id"]: x[i] for i, d in enumerate(docs) if not 100 <= i < 130}
    final.update({d["id"]: by_text[d["text"]] for d in ups})
    names = list(final)
    mat = truncate(np.stack([final[n] for n in names]), 16)
    q = unit(rng, 20, 32)
    # Rescoring every candidate: exact float scores over the live, cut vectors.
    truth_s, truth_i = brute_force(mat, truncate(q, 16), 10)
    s, d = _answers(idx, q, 10, rescore_k=idx.ntotal)
    assert d == [[names[j] for j in row] for row in truth_i]
    np.testing.assert_allclose(s, truth_s, atol=1e-5)
    # Hamming scores alone: the deltas' codes were taken with the base's centre.
    center = np.asarray(idx.manifest["center"], np.float32)
    sign = np.where(mat - center > 0, 1.0, -1.0) @ np.where(truncate(q, 16) - center > 0, 1.0, -1.0).T  # (n, nq)
    h, _ = _answers(idx, q, 10, rescore_k=0)
    np.testing.assert_array_equal(h, -np.sort(-sign.T, axis=1)[:, :10])
    compact_index(tmp_path / "bin")
    comp = ShardedIndex.open(tmp_path / "bin")
    assert comp.ntotal == len(names) and all(sh.get("vectors") for sh in comp.manifest["shards"])
    s_c, d_c = _answers(comp, q, 10, rescore_k=comp.ntotal)
    assert d_c == d
    np.testing.assert_allclose(s_c, s, atol=1e-6)
    h_c, _ = _answers(comp, q, 10, rescore_k=0)  # codes copied as they are
    np.testing.assert_array_equal(h_c, h)


def test_update_in_object_storage_writes_the_manifest_last(s3_store, tmp_path):
    from rayembed.cluster.storage import publish_folder, resolve_storage
    from rayembed.index.manifest import MANIFEST

    rng = np.random.default_rng(5)
    x = unit(rng, 200, 8)
    build_index_from_vectors(x, tmp_path / "local", index_type="flat")
    uri = "s3://rayembed-test/living/idx"
    publish_folder(tmp_path / "local", uri)
    v1 = ShardedIndex.open(uri)
    assert v1.live_count == 200
    st = resolve_storage(uri)
    old = st.read_bytes(MANIFEST)
    with pytest.raises(RuntimeError):
        update_index(uri, delete=["3"], upsert=[{"id": "new", "text": "new"}], encode=lambda t: unit(rng, len(t), 8),
                     fail_after_encode=True)
    assert st.read_bytes(MANIFEST) == old and not st.exists("tombstones")
    new_vec = unit(rng, 1, 8)
    update_index(uri, delete=["3", "4"], upsert=[{"id": "new", "text": "new"}], encode=lambda t: new_vec)
    v2 = ShardedIndex.open(uri)
    assert v2.version != v1.version and v2.manifest_version == 2 and v2.live_count == 199
    s, ids = v2.search(np.concatenate([new_vec, x[3:5]]), 1)
    got = [d["doc_id"] for d in v2.get_documents(ids[:, 0])]
    assert got[0] == "new" and "3" not in got and "4" not in got


def test_bad_updates_are_clear_errors(tmp_path):
    from rayembed.cli import main

    rng = np.random.default_rng(1)
    build_index_from_vectors(unit(rng, 20, 8), tmp_path / "idx")
    with pytest.raises(ValueError, match="both upserted and deleted"):
        update_index(tmp_path / "idx", upsert=[{"id": "1", "text": "a"}], delete=["1"], encode=lambda t: unit(rng, 1, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 4\).*\(1, 8\)"):
        update_index(tmp_path / "idx", upsert=[{"id": "1", "text": "a"}], encode=lambda t: unit(rng, 1, 4))
    assert main(["index", "update", "--index", str(tmp_path / "nowhere"), "--delete", "x"]) == 1
    assert main(["index", "update", "--index", str(tmp_path / "idx")]) == 1

"""Index parts beside the shards (bm25, sparse, multivector) and hybrid search over them.

A tiny embedder with untrained heads is enough to check the mechanics: every method's order
is recomputed here from the embedder's own outputs, fusion from those rankings, and every
damaged part file is caught on open.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from rayembed.index import IndexIntegrityError, ShardedIndex, build_index_in_process
from rayembed.modeling.heads import maxsim
from rayembed.rerank.multivector import rerank_multivector
from rayembed.search import HybridSearcher

TOPICS = {
    "wing": "wing flap lift airfoil stall aircraft",
    "boat": "boat hull sail keel harbour anchor",
    "bread": "bread flour yeast oven dough crust",
    "rain": "rain cloud storm humidity weather forecast",
    "chess": "chess rook bishop opening endgame checkmate",
}
ALL = ("dense", "bm25", "sparse", "multivector")


def corpus() -> list[dict]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(40):
        name = list(TOPICS)[i % len(TOPICS)]
        words = TOPICS[name].split()
        text = " ".join(rng.choice(words, size=6 + i % 5).tolist())
        docs.append({"id": f"{name}-{i}", "text": f"the {text} and more {name}"})
    return docs


QUERIES = ["wing stall lift", "sourdough bread oven", "storm forecast"]


@pytest.fixture(scope="module")
def emb():
    from rayembed.modeling.embedder import Embedder

    return Embedder.from_pretrained("tiny-llama", sparse=True, multivector=True, multivector_dim=16, max_length=64)


@pytest.fixture(scope="module")
def built(emb, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "idx"
    build_index_in_process(emb, corpus(), out, num_shards=2, parts=ALL)
    return out


@pytest.fixture
def index_copy(built, tmp_path):
    import shutil

    dst = tmp_path / "idx"
    shutil.copytree(built, dst)
    return dst


def test_parts_are_in_the_manifest_with_checksums(built):
    import json

    m = json.loads((built / "manifest.json").read_text())
    assert m["kind"] == "dense" and set(m["parts"]) == {"bm25", "sparse", "multivector"}
    assert {f["file"] for f in m["parts"]["bm25"]["files"]} >= {"bm25/vocab.index.json", "bm25/data.csc.index.npy"}
    assert [s["file"]["file"] for s in m["parts"]["sparse"]["shards"]] == ["sparse/sparse-00000.npz",
                                                                            "sparse/sparse-00001.npz"]
    mv = m["parts"]["multivector"]["shards"][1]
    assert mv["vectors"]["file"] == "multivector/mv-00001.vectors.npy" and len(mv["vectors"]["sha256"]) == 64


def _ranking(ids: np.ndarray, scores: np.ndarray, doc_ids: list[str], k: int) -> list[tuple[str, float]]:
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [(doc_ids[i], float(scores[i])) for i in order if scores[i] > 0 or ids is None]


def test_each_method_and_the_fusion_match_an_independent_computation(emb, built):
    docs = corpus()
    doc_ids = [d["id"] for d in docs]
    texts = [d["text"] for d in docs]
    s = HybridSearcher.open(built, embedder=emb)
    assert s.available_methods == ["dense", "bm25", "sparse"] and s.available_rerankers == ["multivector"]
    k, cand = 5, 20

    dense_scores = emb.encode(QUERIES) @ emb.encode(texts).T  # (nq, n)
    sparse_scores = (emb.encode_sparse(QUERIES) @ emb.encode_sparse(texts).T).toarray()  # (nq, n)
    for qi, q in enumerate(QUERIES):
        dense = s.search([q], cand, methods={"dense": 1})[0]
        assert [h["doc_id"] for h in dense] == [doc_ids[i] for i in np.argsort(-dense_scores[qi], kind="stable")[:cand]]
        np.testing.assert_allclose([h["score"] for h in dense], np.sort(dense_scores[qi])[::-1][:cand], rtol=1e-4)
        sparse = s.search([q], cand, methods={"sparse": 1})[0]
        want = [(doc_ids[i], sparse_scores[qi, i]) for i in np.lexsort((np.arange(40), -sparse_scores[qi]))
                if sparse_scores[qi, i] > 0][:cand]
        assert [h["doc_id"] for h in sparse] == [d for d, _ in want]
        np.testing.assert_allclose([h["score"] for h in sparse], [v for _, v in want], rtol=1e-4)
        bm25 = s.search([q], cand, methods={"bm25": 1})[0]
        assert bm25 and all(h["scores"] == {"bm25": h["score"]} for h in bm25)
        topic = q.split()[0] if q.split()[0] in TOPICS else ("bread" if "bread" in q else "rain")
        assert bm25[0]["doc_id"].startswith(topic)

        # RRF computed here from the two single-method lists.
        rrf: dict[str, float] = {}
        for lst, w in ((dense, 2.0), (bm25, 1.0)):
            for rank, h in enumerate(lst, 1):
                rrf[h["doc_id"]] = rrf.get(h["doc_id"], 0.0) + w / (60 + rank)
        want_rrf = sorted(rrf.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        got = s.search([q], k, methods={"dense": 2, "bm25": 1}, fusion="rrf", candidates=cand)[0]
        assert [(h["doc_id"], h["score"]) for h in got] == [(d, pytest.approx(v, abs=1e-12)) for d, v in want_rrf]
        for h in got:
            assert h["text"] == texts[doc_ids.index(h["doc_id"])]
            assert h["scores"].get("dense") == next((x["score"] for x in dense if x["doc_id"] == h["doc_id"]), None)

        # Weighted sum: min-max within each list, computed here.
        def mm(lst):
            v = [h["score"] for h in lst]
            lo, hi = min(v), max(v)
            return {h["doc_id"]: 1.0 if hi == lo else (h["score"] - lo) / (hi - lo) for h in lst}

        nd, nb = mm(dense), mm(bm25)
        ws = {d: 0.7 * nd.get(d, 0.0) + 0.3 * nb.get(d, 0.0) for d in set(nd) | set(nb)}
        want_ws = sorted(ws.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        got = s.search([q], k, methods={"dense": 0.7, "bm25": 0.3}, fusion="weighted_sum", candidates=cand)[0]
        assert [h["doc_id"] for h in got] == [d for d, _ in want_ws]
        np.testing.assert_allclose([h["score"] for h in got], [v for _, v in want_ws], atol=1e-9)


def test_multivector_rerank_is_maxsim_over_the_fused_top(emb, built):
    s = HybridSearcher.open(built, embedder=emb)
    q = QUERIES[0]
    fused = s.search([q], 40, methods={"dense": 1, "bm25": 1}, candidates=40)[0]
    got = s.search([q], 8, methods={"dense": 1, "bm25": 1}, candidates=40, rerank="multivector", rerank_top=10)[0]
    top10 = [h["doc_id"] for h in fused[:10]]
    assert {h["doc_id"] for h in got} <= set(top10)
    fresh = rerank_multivector(emb, q, [h["text"] for h in fused[:10]])  # encoded on the fly, float32
    by_id = dict(zip(top10, fresh))
    np.testing.assert_allclose([h["score"] for h in got], [by_id[h["doc_id"]] for h in got], atol=2e-3)
    assert [h["score"] for h in got] == sorted((h["score"] for h in got), reverse=True)
    assert all(h["scores"]["multivector"] == h["score"] for h in got)
    qv = emb.encode_multivector([q])[0]
    dv = emb.encode_multivector([fused[0]["text"]])[0]
    assert by_id[top10[0]] == pytest.approx(maxsim(qv, dv), abs=1e-6)


def test_bm25_only_index_needs_no_model(tmp_path):
    out = tmp_path / "bm25"
    build_index_in_process(None, corpus(), out, parts=["bm25"], num_shards=3)
    s = HybridSearcher.open(out)
    assert s.kind == "lexical" and s.available_methods == ["bm25"] and s.available_rerankers == []
    hits = s.search(["checkmate rook", "zzz unknown"], 3)
    assert [h["doc_id"].split("-")[0] for h in hits[0]] == ["chess"] * 3 and hits[1] == []
    with pytest.raises(ValueError, match=r"Method 'dense' is not in the index .* holds \['bm25'\]"):
        s.search(["x"], 3, methods={"dense": 1, "bm25": 1})
    with pytest.raises(IndexIntegrityError, match="BM25-only index.*HybridSearcher"):
        ShardedIndex.open(out)
    # A rebuild with the same settings is a no-op; other BM25 settings are refused without overwrite.
    before = os.stat(out / "bm25/params.index.json").st_mtime_ns
    build_index_in_process(None, corpus(), out, parts=["bm25"], num_shards=3)
    assert os.stat(out / "bm25/params.index.json").st_mtime_ns == before
    with pytest.raises(IndexIntegrityError, match="bm25 part built with different k1"):
        build_index_in_process(None, corpus(), out, parts=["bm25"], num_shards=3, bm25={"k1": 0.9})


@pytest.mark.parametrize("pattern", ["bm25/data.csc.index.npy", "bm25/vocab.index.json", "sparse/sparse-00001.npz",
                                     "multivector/mv-00000.vectors.npy", "multivector/mv-00001.offsets.npy"])
def test_flipped_byte_in_a_part_file_is_detected(index_copy, pattern):
    path = index_copy / pattern
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    name = pattern.split("/")[1].replace(".", r"\.")
    with pytest.raises(IndexIntegrityError, match=rf"{name} fails its sha256 check.*rerun `rayembed index` to rebuild"):
        HybridSearcher.open(index_copy, embedder=None)


def test_parts_resume_and_can_be_added_later(emb, built, index_copy, tmp_path):
    (index_copy / "sparse/sparse-00000.npz").unlink()
    keep = {p: os.stat(index_copy / p).st_mtime_ns for p in
            ("sparse/sparse-00001.npz", "shards/shard-00000.faiss", "bm25/params.index.json",
             "multivector/mv-00000.vectors.npy")}
    with pytest.raises(IndexIntegrityError, match=r"sparse-00000\.npz is missing"):
        HybridSearcher.open(index_copy, embedder=emb)
    build_index_in_process(emb, corpus(), index_copy, num_shards=2, parts=ALL)
    assert {p: os.stat(index_copy / p).st_mtime_ns for p in keep} == keep
    again = HybridSearcher.open(index_copy, embedder=emb).search(QUERIES, 5, methods={"sparse": 1})
    assert any(again) and again == HybridSearcher.open(built, embedder=emb).search(QUERIES, 5, methods={"sparse": 1})

    # A dense-only index gains a bm25 part without re-encoding its shards.
    out = tmp_path / "dense"
    build_index_in_process(emb, corpus(), out, parts=["dense"])
    shard = os.stat(out / "shards/shard-00000.faiss").st_mtime_ns
    assert HybridSearcher.open(out, embedder=emb).available_methods == ["dense"]
    build_index_in_process(emb, corpus(), out, parts=["dense", "bm25"])
    assert os.stat(out / "shards/shard-00000.faiss").st_mtime_ns == shard
    assert HybridSearcher.open(out, embedder=emb).available_methods == ["dense", "bm25"]


def test_unknown_or_missing_methods_are_named(emb, built, tmp_path):
    s = HybridSearcher.open(built, embedder=emb)
    with pytest.raises(ValueError, match=r"Unknown retrieval method 'colbert'.*holds \['dense', 'bm25', 'sparse'\]"):
        s.search(["x"], 3, methods={"colbert": 1})
    with pytest.raises(ValueError, match="'multivector' reranks, it does not retrieve: pass rerank='multivector'"):
        s.search(["x"], 3, methods={"multivector": 1})
    with pytest.raises(ValueError, match="Unknown fusion 'max'"):
        s.search(["x"], 3, methods={"dense": 1, "bm25": 1}, fusion="max")
    with pytest.raises(ValueError, match="Unknown reranker 'llm'"):
        s.search(["x"], 3, rerank="llm")
    out = tmp_path / "plain"
    build_index_in_process(emb, corpus(), out, parts=["dense"])
    with pytest.raises(ValueError, match=r"rerank='multivector' needs the multivector part.*\['dense'\]"):
        HybridSearcher.open(out, embedder=emb).search(["x"], 3, rerank="multivector")
    with pytest.raises(ValueError, match="unknown index part.*'splade'"):
        build_index_in_process(emb, corpus(), out, parts=["dense", "splade"])
    with pytest.raises(ValueError, match="need the dense part beside them"):
        build_index_in_process(emb, corpus(), out, parts=["sparse"])


def test_embedder_without_heads_is_refused_before_encoding(tmp_path):
    from rayembed.modeling.embedder import Embedder

    plain = Embedder.from_pretrained("tiny-llama", max_length=64)
    with pytest.raises(ValueError, match=r"needs an embedder with a sparse head.*model\.heads\.sparse=true"):
        build_index_in_process(plain, corpus(), tmp_path / "x", parts=["dense", "sparse"])
    assert not (tmp_path / "x").exists()


def test_ray_build_builds_the_parts(ray_local, tmp_path):
    import json

    from rayembed.config import load_config
    from rayembed.index import build_index
    from rayembed.modeling.embedder import Embedder

    model_dir = tmp_path / "tiny-heads"
    Embedder.from_pretrained("tiny-llama", sparse=True, multivector=True, multivector_dim=16,
                             max_length=64).save_pretrained(model_dir)
    emb = Embedder.from_pretrained(model_dir)
    corpus_path = tmp_path / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"_id": d["id"], "text": d["text"]}) + "\n" for d in corpus()))

    def cfg(out, parts):
        return load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"index.embedder={model_dir}", f"index.corpus={corpus_path}",
            f"index.output_dir={out}", "index.num_shards=2", "index.encode.min_actors=1", "index.encode.max_actors=1",
            "index.encode.num_cpus_per_actor=0.5", "index.encode.batch_size=16", "compute.log_to_driver=false",
            f"index.parts={parts}",
        ])

    lexical = build_index(cfg(tmp_path / "lex", "[bm25]"))
    s = HybridSearcher.open(lexical)
    assert s.kind == "lexical"
    ref = HybridSearcher.open(build_index_in_process(emb, corpus(), tmp_path / "ref", num_shards=2, parts=ALL))
    assert s.search(QUERIES, 5) == ref.search(QUERIES, 5, methods={"bm25": 1})

    full = HybridSearcher.open(build_index(cfg(tmp_path / "full", "[dense, bm25, sparse, multivector]")))
    assert full.available_methods == ["dense", "bm25", "sparse"] and full.available_rerankers == ["multivector"]
    for methods in ({"sparse": 1}, {"dense": 1, "bm25": 1, "sparse": 1}):
        got = full.search(QUERIES, 5, methods=methods, rerank="multivector", rerank_top=10)
        want = ref.search(QUERIES, 5, methods=methods, rerank="multivector", rerank_top=10)
        assert [[h["doc_id"] for h in r] for r in got] == [[h["doc_id"] for h in r] for r in want]


def test_hybrid_rows_in_the_evaluation_table(emb, tmp_path):
    from rayembed.evaluate.datasets import RetrievalData
    from rayembed.evaluate.runner import evaluate_models, render_table

    docs = corpus()
    queries = {"q1": "wing stall lift", "q2": "bread oven dough", "q3": "chess rook endgame"}
    qrels = {q: {d["id"]: 1 for d in docs if d["id"].startswith(t)} for q, t in
             (("q1", "wing"), ("q2", "bread"), ("q3", "chess"))}
    data = RetrievalData(name="topics", corpus={d["id"]: {"title": "", "text": d["text"]} for d in docs},
                         queries=queries, qrels=qrels, instruction="Find passages on the topic")
    hybrid = [{"name": "tiny+bm25 (rrf)", "methods": {"dense": 1, "bm25": 1}},
              {"name": "bm25 (index part)", "methods": {"bm25": 1}},
              {"name": "tiny+sparse, mv rerank", "methods": {"dense": 1, "sparse": 1}, "fusion": "weighted_sum",
               "rerank": "multivector", "rerank_top": 20}]
    res = evaluate_models({"bm25": "bm25", "tiny": emb}, [data], tmp_path / "eval", hybrid=hybrid, top_k=20,
                          keep_indexes=True, plot=False)
    rows = res["metrics"]
    assert list(rows) == ["bm25", "tiny", "tiny+bm25 (rrf)", "bm25 (index part)", "tiny+sparse, mv rerank"]
    assert res["models"]["tiny+sparse, mv rerank"]["parts"] == ["dense", "sparse", "multivector"]
    # The index's bm25 part and the BM25 baseline are one implementation: the same figures.
    assert rows["bm25 (index part)"]["topics"]["ndcg@10"] == pytest.approx(rows["bm25"]["topics"]["ndcg@10"])
    assert rows["tiny+bm25 (rrf)"]["topics"]["ndcg@10"] > rows["tiny"]["topics"]["ndcg@10"]
    # The dense row and the hybrid rows over it share one index: parts were added beside its shards.
    shared = tmp_path / "eval/indexes/tiny/topics"
    assert {p.name for p in shared.iterdir()} >= {"shards", "bm25", "sparse", "multivector", "manifest.json"}
    table = render_table(res)
    assert "| tiny+bm25 (rrf) |" in table and "| tiny+sparse, mv rerank |" in table

"""Hybrid /search and /rerank over real HTTP on the session's Ray.

One app for the module (route prefix /hybrid) serves an index holding every part (dense FAISS
shards, BM25, learned sparse, multi-vector token vectors) built with a tiny Llama embedder that
has both heads, and an LLM reranker saved from the tiny Llama. Expected answers are computed in
this process: the fused order with rayembed.search.fusion from each method's own results, the
reranker scores with LLMReranker.score. The last tests use the shared endpoint of conftest (no
heads, no reranker, dense-only index) for the errors that need a poorer endpoint.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = "rayembed-hybrid-test"
PREFIX = "/hybrid"
TOPICS = ["rivers", "volcanoes", "bread", "compilers", "orbits", "violins", "glaciers", "honey", "chess", "tides"]
QUERIES = ["how do volcanoes erupt", "baking sourdough bread at home"]
DOCS = [
    {
        "id": f"h{i}",
        "text": f"Passage {i} on {TOPICS[i % 10]}: notes about {TOPICS[(i * 3) % 10]} and {TOPICS[(i * 7 + 1) % 10]}, "
        f"item {i * 11 % 17}.",
        "title": f"{TOPICS[i % 10]} {i}",
    }
    for i in range(60)
]
RERANK_TEXTS = [
    "Volcanoes erupt when magma rises through the crust.",
    "Sourdough bread needs a starter and a long rise.",
    "Chess openings: the Sicilian defence.",
    "Glaciers carve valleys over thousands of years.",
    "x",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An embedder with both heads, an index with all four parts, and a saved LLM reranker."""
    from rayembed.index import build_index_in_process
    from rayembed.modeling.embedder import Embedder
    from rayembed.rerank.llm import LLMReranker

    root = tmp_path_factory.mktemp("hybrid-serve")
    emb_dir = Embedder.from_pretrained("tiny-llama", max_length=128, sparse=True, multivector=True).save_pretrained(
        root / "tiny-heads"
    )
    manifest = build_index_in_process(
        str(emb_dir), DOCS, root / "index", index_type="flat", num_shards=2,
        parts=("dense", "bm25", "sparse", "multivector"),
    )
    rr_dir = LLMReranker.from_pretrained("tiny-llama", max_length=160).save_pretrained(root / "reranker")
    return {"embedder": emb_dir, "index": manifest.parent, "reranker": rr_dir}


@pytest.fixture(scope="module")
def hybrid_url(ray_local, assets):
    from ray import serve

    from rayembed.config import load_config
    from rayembed.serving import server

    cfg = load_config(
        None,
        [
            f"serve.port={_free_port()}", f"serve.app_name={APP}", f"serve.route_prefix={PREFIX}",
            "serve.max_k=20", "serve.max_rerank_top=50", "serve.max_rerank_docs=100", "serve.max_input_chars=300",
            "serve.encoder.num_cpus=0.5", "serve.access_log=false", "serve.batch_wait_timeout_s=0.01",
            "serve.torch_threads=1",
            f"serve.reranker.path={assets['reranker']}", "serve.reranker.num_cpus=0.5",
            "serve.reranker.batch_size=4", "serve.reranker.max_texts=8",
        ],
    )
    url = server.start_server(cfg, index_dir=assets["index"])
    yield url
    current = server.current()
    if current and current["base_url"] == url:
        server.stop_server()
    else:
        serve.delete(APP)


@pytest.fixture(scope="module")
def client(hybrid_url):
    import httpx

    with httpx.Client(base_url=hybrid_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def searcher(assets):
    """The same index and embedder, opened in this process."""
    from rayembed.modeling.embedder import Embedder
    from rayembed.search.hybrid import HybridSearcher

    return HybridSearcher.open(assets["index"], embedder=Embedder.from_pretrained(str(assets["embedder"])))


def _per_method(searcher, query: str, method: str) -> list[tuple[str, float]]:
    """One method's own ranked list over the whole corpus (the depth hybrid search fuses)."""
    hits = searcher.search([query], len(DOCS), methods={method: 1.0})[0]
    return [(h["doc_id"], h["score"]) for h in hits]


@pytest.mark.parametrize(
    "override, match",
    [
        ("serve.reranker.batch_size=0", "serve.reranker.batch_size must be >= 1"),
        ("serve.reranker.max_texts=0", "serve.reranker.max_texts must be >= 1"),
        ("serve.reranker.max_length=4", "serve.reranker.max_length must be at least 16"),
        ("serve.reranker.num_cpus=0", "serve.reranker reserves no CPU"),
        ("serve.max_rerank_top=0", "serve.max_rerank_top must be >= 1"),
    ],
)
def test_bad_reranker_config(override, match):
    from rayembed.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_reranker_folder_fails_before_deploying(tmp_path):
    from rayembed.serving.app import resolve_reranker

    assert resolve_reranker(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_reranker("smollm2-135m") == "smollm2-135m"
    with pytest.raises(FileNotFoundError, match="serve.reranker.path"):
        resolve_reranker(str(tmp_path / "runs" / "x" / "model"))


def test_plain_search_is_unchanged(client, searcher):
    body = client.post("/search", json={"query": QUERIES, "k": 5}).json()
    assert "methods" not in body and "fusion" not in body
    for qi, res in enumerate(body["results"]):
        assert "method_scores" not in res
        expected = _per_method(searcher, QUERIES[qi], "dense")[:5]
        assert res["ids"] == [d for d, _ in expected]
        np.testing.assert_allclose(res["scores"], [s for _, s in expected], atol=1e-4)


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_hybrid_search_returns_the_fused_order(client, searcher, fusion):
    from rayembed.search import fusion as F

    weights = {"dense": 1.0, "bm25": 0.5, "sparse": 0.25}
    r = client.post("/search", json={"query": QUERIES, "k": 8, "methods": weights, "fusion": fusion})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["methods"] == weights and body["fusion"] == ("rrf" if fusion == "rrf" else "weighted_sum")
    for qi, res in enumerate(body["results"]):
        lists = {m: _per_method(searcher, QUERIES[qi], m) for m in weights}
        fused = F.rrf(lists, weights=weights) if fusion == "rrf" else F.weighted_sum(lists, weights)
        assert res["ids"] == [d for d, _ in fused[:8]]
        np.testing.assert_allclose(res["scores"], [s for _, s in fused[:8]], rtol=1e-5, atol=1e-6)
        dense = dict(lists["dense"])
        for did, ms in zip(res["ids"], res["method_scores"]):
            assert set(ms) <= set(weights) and abs(ms["dense"] - dense[did]) < 1e-4
    single = client.post("/search", json={"query": QUERIES[0], "k": 4, "methods": {"bm25": 1}}).json()
    assert single["results"][0]["ids"] == [d for d, _ in _per_method(searcher, QUERIES[0], "bm25")[:4]]


def test_hybrid_search_with_multivector_rerank(client, searcher):
    opts = {"methods": {"dense": 1.0, "bm25": 1.0}, "rerank": "multivector", "rerank_top": 12}
    body = client.post("/search", json={"query": QUERIES, "k": 6, **opts}).json()
    assert body["rerank"] == "multivector"
    local = searcher.search(QUERIES, 6, methods=opts["methods"], rerank="multivector", rerank_top=12)
    for res, hits in zip(body["results"], local):
        assert res["ids"] == [h["doc_id"] for h in hits]
        np.testing.assert_allclose(res["scores"], [h["score"] for h in hits], atol=1e-4)
        assert res["scores"] == sorted(res["scores"], reverse=True)
        assert all(abs(ms["multivector"] - s) < 1e-6 for ms, s in zip(res["method_scores"], res["scores"]))


def test_rerank_llm_equals_in_process_scores(client, assets):
    from rayembed.rerank.llm import LLMReranker

    rr = LLMReranker.from_pretrained(str(assets["reranker"]))
    r = client.post("/rerank", json={"query": QUERIES[0], "texts": RERANK_TEXTS, "model": "llm"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "llm"
    expected = rr.score(QUERIES[0], RERANK_TEXTS, batch_size=4)
    got = {x["index"]: x["score"] for x in body["results"]}
    assert sorted(got) == list(range(len(RERANK_TEXTS)))
    np.testing.assert_allclose([got[i] for i in range(len(RERANK_TEXTS))], expected, rtol=0, atol=1e-5)
    assert [x["index"] for x in body["results"]] == sorted(range(len(expected)), key=lambda i: (-expected[i], i))
    # The default model is llm when one is configured; instruction and top_n pass through.
    instr = "Judge relevance for a geology student"
    top = client.post("/rerank", json={"query": QUERIES[0], "texts": RERANK_TEXTS, "top_n": 2, "instruction": instr})
    want = rr.score(QUERIES[0], RERANK_TEXTS, instruction=instr, batch_size=4)
    body = top.json()
    assert body["model"] == "llm" and len(body["results"]) == 2
    assert [x["index"] for x in body["results"]] == list(np.argsort(-want, kind="stable")[:2])


def test_rerank_multivector_equals_library(client, assets):
    from rayembed.modeling.embedder import Embedder
    from rayembed.rerank import rerank

    body = client.post("/rerank", json={"query": QUERIES[1], "texts": RERANK_TEXTS, "model": "multivector"}).json()
    emb = Embedder.from_pretrained(str(assets["embedder"]))
    expected = rerank(QUERIES[1], RERANK_TEXTS, model="multivector", embedder=emb)
    assert [x["index"] for x in body["results"]] == [x["index"] for x in expected]
    np.testing.assert_allclose([x["score"] for x in body["results"]], [x["score"] for x in expected], atol=1e-5)


BAD = [
    ("unknown method", "/search", {"query": "x", "methods": {"colbert": 1}}, "methods.colbert"),
    ("negative weight", "/search", {"query": "x", "methods": {"bm25": -1}}, "methods.bm25"),
    ("weight as string", "/search", {"query": "x", "methods": {"dense": "1"}}, "methods.dense"),
    ("empty methods", "/search", {"query": "x", "methods": {}}, "methods"),
    ("methods as list", "/search", {"query": "x", "methods": ["dense"]}, "methods"),
    ("unknown fusion", "/search", {"query": "x", "methods": {"dense": 1}, "fusion": "max"}, "fusion"),
    ("unknown reranker", "/search", {"query": "x", "rerank": "llm"}, "rerank"),
    ("rerank_top zero", "/search", {"query": "x", "rerank": "multivector", "rerank_top": 0}, "rerank_top"),
    ("rerank_top above limit", "/search", {"query": "x", "rerank": "multivector", "rerank_top": 51}, "rerank_top"),
    ("rerank_top alone", "/search", {"query": "x", "rerank_top": 10}, "rerank_top"),
    ("rerank_top x queries above limit", "/search",
     {"query": ["a", "b", "c"], "rerank": "multivector", "rerank_top": 40}, "rerank_top"),
    ("weighted fusion overflow", "/search",
     {"query": "x", "methods": {"dense": 1e308, "bm25": 1e308}, "fusion": "weighted"}, "methods.dense"),
    ("llm instruction too long for the prompt", "/rerank",
     {"query": "x", "texts": ["a"], "model": "llm", "instruction": "judge " * 49}, "instruction"),
    ("nprobe with methods", "/search", {"query": "x", "methods": {"dense": 1}, "nprobe": 4}, "nprobe"),
    ("missing texts", "/rerank", {"query": "x"}, "texts"),
    ("empty texts", "/rerank", {"query": "x", "texts": []}, "texts"),
    ("blank text", "/rerank", {"query": "x", "texts": ["ok", " "]}, "texts[1]"),
    ("texts as string", "/rerank", {"query": "x", "texts": "abc"}, "texts"),
    ("too many texts", "/rerank", {"query": "x", "texts": ["t"] * 9}, "texts"),
    ("text too long", "/rerank", {"query": "x", "texts": ["y" * 301]}, "texts[0]"),
    ("blank query", "/rerank", {"query": "", "texts": ["a"]}, "query"),
    ("unknown model", "/rerank", {"query": "x", "texts": ["a"], "model": "cross-encoder"}, "model"),
    ("top_n zero", "/rerank", {"query": "x", "texts": ["a"], "top_n": 0}, "top_n"),
    ("unknown field", "/rerank", {"query": "x", "texts": ["a"], "documents": ["b"]}, "documents"),
]


@pytest.mark.parametrize("name, path, body, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_400_naming_the_field(client, name, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_openapi_lists_rerank(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/rerank" in paths and "methods" in str(client.get("/openapi.json").json()["components"])


# The shared endpoint of conftest: dense-only index, embedder without heads, no LLM reranker.


def test_endpoint_without_reranker_or_parts_names_what_is_missing(http, endpoint):
    import httpx

    assert httpx.post(endpoint["url"] + "/rerank", json={"query": "x", "texts": ["a"]}).status_code == 401
    r = http.post("/rerank", json={"query": "x", "texts": ["a", "b"], "model": "llm"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "serve.reranker.path" in r.json()["error"]["message"]
    r = http.post("/rerank", json={"query": "x", "texts": ["a", "b"]})  # default: multivector, absent here
    assert r.status_code == 400 and "model.heads.multivector" in r.json()["error"]["message"]
    r = http.post("/search", json={"query": "x", "methods": {"dense": 1, "bm25": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "methods.bm25"
    assert "['dense']" in r.json()["error"]["message"]
    r = http.post("/search", json={"query": "x", "rerank": "multivector"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rerank"
    ok = http.post("/search", json={"query": "rivers", "k": 3, "methods": {"dense": 1}}).json()
    plain = http.post("/search", json={"query": "rivers", "k": 3}).json()
    assert ok["results"][0]["ids"] == plain["results"][0]["ids"]

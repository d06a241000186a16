"""Metadata filters inside the search: equal to brute force over the filtered subset, with
tombstones, through HybridSearcher and /search's planner; bad filters name their field."""

from __future__ import annotations

import numpy as np
import pytest
from index_helpers import unit

from rayembed.index import ShardedIndex, build_index_from_vectors
from rayembed.index.corpus import ColumnMapping
from rayembed.index.filters import FilterError

LANGS = ["en", "de", "fr", "ja"]


def _docs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        d = {"id": f"d{i}", "text": f"doc {i}", "lang": LANGS[i % 4], "year": 1990 + i % 35,
             "tags": ["even" if i % 2 == 0 else "odd"] + (["seven"] if i % 7 == 0 else [])}
        if i % 10 == 9:
            d.pop("year")  # some documents lack a field: they never match a condition on it
        out.append(d)
    return out


def _matches(d: dict, flt: dict) -> bool:
    for field, cond in flt.items():
        v = d.get(field)
        vals = v if isinstance(v, list) else [v]
        if not isinstance(cond, dict):
            cond = {"eq": cond}
        for op, arg in cond.items():
            if op == "eq" and arg not in vals:
                return False
            if op == "in" and not set(arg) & set(vals):
                return False
            if op in ("gt", "gte", "lt", "lte"):
                if not isinstance(v, (int, float)):
                    return False
                ok = {"gt": v > arg, "gte": v >= arg, "lt": v < arg, "lte": v <= arg}[op]
                if not ok:
                    return False
    return True


FILTERS = [
    {"lang": "de"},
    {"lang": {"in": ["en", "ja"]}},
    {"year": {"gte": 2000, "lt": 2010}},
    {"year": {"gt": 2019}, "lang": "fr"},
    {"tags": "seven", "year": {"lte": 1995}},
    {"tags": {"in": ["odd"]}, "lang": {"eq": "en"}},  # empty: odd ids are never 'en'
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(11)
    docs = _docs(2000)
    x = unit(rng, len(docs), 24)
    root = tmp_path_factory.mktemp("flt")
    mapping = ColumnMapping(metadata_fields=["lang", "year", "tags"])
    build_index_from_vectors(x, root / "flat", docs=docs, mapping=mapping, num_shards=3)
    build_index_from_vectors(x, root / "ivf", docs=docs, mapping=mapping, num_shards=2, index_type="ivf_flat", nlist=16)
    return docs, x, root, unit(rng, 20, 24)


def _truth(docs, x, q, flt, k, dead=()):
    keep = [i for i, d in enumerate(docs) if _matches(d, flt) and d["id"] not in dead]
    if not keep:
        return [[] for _ in q], None
    s = q @ x[keep].T  # (nq, |keep|)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return [[docs[keep[j]]["id"] for j in row] for row in order], np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_filtered_search_equals_brute_force_over_the_subset(built, kind):
    docs, x, root, q = built
    idx = ShardedIndex.open(root / kind)
    for flt in FILTERS:
        scores, ids = idx.search(q, 10, filter=flt, nprobe=16)
        got = [[d["doc_id"] for d in idx.get_documents(row[row >= 0])] for row in ids]
        want, want_s = _truth(docs, x, q, flt, 10)
        assert got == want, flt
        if want_s is not None:
            np.testing.assert_allclose(scores[:, : want_s.shape[1]], want_s, atol=1e-5)
        assert np.all(ids[:, len(want[0]):] == -1)


def test_filters_skip_tombstones_and_reach_hybrid_and_the_planner(built, tmp_path):
    import shutil

    from rayembed.config import RayembedConfig
    from rayembed.index.update import update_index
    from rayembed.search.hybrid import HybridSearcher
    from rayembed.serving.query import Loaded, plan_search
    from rayembed.serving.schemas import InvalidRequest, SearchRequest

    docs, x, root, q = built
    shutil.copytree(root / "flat", tmp_path / "idx")
    dead = {f"d{i}" for i in range(0, 400, 3)}
    update_index(tmp_path / "idx", delete=sorted(dead), encode=lambda t: None)
    idx = ShardedIndex.open(tmp_path / "idx")
    flt = {"lang": {"in": ["de", "en"]}, "year": {"gte": 1995}}
    _, ids = idx.search(q, 10, filter=flt)
    want, _ = _truth(docs, x, q, flt, 10, dead)
    assert [[d["doc_id"] for d in idx.get_documents(r)] for r in ids] == want

    class Vectors:  # the query "encoder" of a HybridSearcher: query i is q[i]
        def encode(self, queries, instruction=None):
            return q[[int(s) for s in queries]]

    hs = HybridSearcher.open(tmp_path / "idx", embedder=None)
    hs._embedder = Vectors()
    hits = hs.search([str(i) for i in range(len(q))], 10, filter=flt)
    assert [[h["doc_id"] for h in row] for row in hits] == want

    cfg = RayembedConfig().serve
    loaded = Loaded(hs, str(tmp_path / "idx"))
    plan = plan_search(SearchRequest(query="x", filter=flt), cfg, loaded)
    assert plan.allowed.sum() == idx.filter_mask(flt).sum() > 0
    with pytest.raises(InvalidRequest) as e:
        plan_search(SearchRequest(query="x", filter={"country": "fr"}), cfg, loaded)
    assert e.value.status == 400 and e.value.param == "filter.country" and "'country'" in e.value.message
    assert "lang" in e.value.message  # the known fields are listed


@pytest.mark.parametrize(("flt", "field", "msg"), [
    ({"colour": "red"}, "colour", "not a metadata field"),
    ({"lang": {"like": "e%"}}, "lang", "unknown operator 'like'"),
    ({"lang": {"gte": 3}}, "lang", "holds no numbers"),
    ({"year": {"gte": "2000"}}, "year", "must be a finite number"),
    ({"lang": ["en", "de"]}, "lang", "write {\"in\""),
    ({"lang": {"in": []}}, "lang", "list of 1.."),
    ({"lang": {"k": 1}}, "lang", "unknown operator"),
    ({}, None, "non-empty object"),
])
def test_bad_filters_name_the_field(built, flt, field, msg):
    _, _, root, q = built
    idx = ShardedIndex.open(root / "flat")
    with pytest.raises(FilterError, match=None) as e:
        idx.search(q, 5, filter=flt)
    assert e.value.field == field and msg in str(e.value)

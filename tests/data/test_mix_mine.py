"""Mixing (ratios, dedup, validation split, manifest, bad rows) and hard-negative mining."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rayembed.config import ConfigError, load_config
from rayembed.data.mine import mine_negatives
from rayembed.data.mix import build_mix, read_manifest
from rayembed.data.schema import make_row
from rayembed.io import sha256_file


def _pairs_file(path, n, prefix, bad_lines=0):
    lines = [json.dumps({"q": f"{prefix} question {i}", "d": f"{prefix} answer {i}"}) for i in range(n)]
    lines += ['{"q": "", "d": "empty query"}'] * bad_lines
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path, sources, **data):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.sources={json.dumps(sources)}"]
    overrides += [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    return load_config(None, overrides)


def test_mix_honours_ratios_dedups_and_writes_a_manifest(tmp_path):
    a = _pairs_file(tmp_path / "a.jsonl", 2000, "alpha")
    b = _pairs_file(tmp_path / "b.jsonl", 1000, "beta")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"q": f"alpha question {i}", "d": f"alpha answer {i}"}) + "\n" for i in range(50)))
    src = lambda name, path, ratio: {"name": name, "format": "jsonl", "path": str(path), "ratio": ratio,  # noqa: E731
                                     "instruction": f"Retrieve {name}", "columns": {"query": "q", "positive": "d"}}
    cfg = _cfg(tmp_path, [src("a", a, 0.25), src("b", b, 1.5), src("dup", dup, 1.0)],
               val_fraction=0.1, shard_rows=700, shuffle_buckets=4)
    m = read_manifest(build_mix(cfg))
    total = {s: m["train"]["by_source"].get(s, 0) + m["val"]["by_source"].get(s, 0) for s in ("a", "b", "dup")}
    assert abs(total["a"] - 500) <= 60          # 0.25 x 2000, seeded Bernoulli
    assert abs(total["b"] - 1500) <= 60         # 1 copy + 0.5 more
    assert total["dup"] == 50 - m["duplicates_dropped"].get("dup", 0)
    assert m["duplicates_dropped"]["dup"] >= 1   # rows already sampled from "a" are dropped
    n = m["train"]["rows"] + m["val"]["rows"]
    assert 0.07 < m["val"]["rows"] / n < 0.13
    out = tmp_path / "run" / "data"
    for split in ("train", "val"):
        for f in m[split]["files"]:
            assert sha256_file(out / f["path"]) == f["sha256"]
            assert pq.read_metadata(out / f["path"]).num_rows == f["rows"]
    assert len(m["train"]["files"]) == -(-m["train"]["rows"] // 700)
    ids = [i for f in m["train"]["files"] for i in pq.read_table(out / f["path"], columns=["id"])["id"].to_pylist()]
    assert len(ids) == len(set(ids))
    first = pq.read_table(out / m["train"]["files"][0]["path"]).to_pylist()
    assert len({r["source"] for r in first[:100]}) >= 2  # shuffled across sources
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging folder gone


def test_bad_rows_skip_then_fail_naming_the_file(tmp_path):
    f = _pairs_file(tmp_path / "p.jsonl", 20, "x", bad_lines=2)
    src = {"name": "p", "format": "jsonl", "path": str(f), "instruction": "i", "columns": {"query": "q", "positive": "d"}}
    m = read_manifest(build_mix(_cfg(tmp_path, [src], max_bad_fraction=0.2)))
    assert m["sources"]["p"]["bad"]["reasons"] == {"empty 'query'": 2}
    with pytest.raises(ValueError, match=r"p: 2 of 22 rows are bad .*first bad rows: p row 20: empty 'query'"):
        build_mix(_cfg(tmp_path, [src], max_bad_fraction=0.05))


def test_local_demo_recipe_builds_from_real_data(tmp_path):
    cfg = load_config("jobs/configs/local/data.yaml", [f"run_dir={tmp_path}"])
    m = read_manifest(build_mix(cfg))
    by = m["sources"]
    assert by["stsb"]["bad"]["total"] == 5749  # every STS-B train line read
    assert 1000 < by["stsb"]["read"] < 5749     # pairs scoring >= 4.0 become symmetric positives
    assert m["train"]["by_task_type"]["sts"] > 1000
    assert by["weak-msmarco"]["read"] > 0 and by["weak-cranfield"]["read"] > 0
    # No evaluation judgements: only weak pairs from the raw text of the evaluated corpora.
    assert set(m["train"]["by_source"]) == {"stsb", "weak-msmarco", "weak-cranfield"}


def test_source_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs an instruction"):
        load_config(None, ['data.sources=[{name: x, format: jsonl, path: a.jsonl}]'])
    with pytest.raises(ConfigError, match="format='xml'"):
        load_config(None, ['data.sources=[{name: x, format: xml}]'])


def test_mining_excludes_every_positive_and_is_seeded():
    topics = ["apples", "rivers", "engines", "music"]
    rows = []
    for t in topics:
        for k in range(3):  # three rows share each query: all three passages are positives
            rows.append(make_row(instruction="i", query=f"tell me about {t}", task_type="retrieval", source="s",
                                 positive=f"{t} passage {k}: facts about {t} and more {t}"))
    extra = [f"{t} distractor {j} mentions {t}" for t in topics for j in range(5)]
    mined = mine_negatives(rows, retriever="bm25", top_k=10, num_negatives=3, seed=0, extra_docs=extra)
    pos_by_query = {}
    for r in rows:
        pos_by_query.setdefault(r["query"], set()).add(r["positive"])
    for r in mined:
        assert len(r["negatives"]) == 3
        assert not set(r["negatives"]) & pos_by_query[r["query"]]
        topic = r["query"].split()[-1]
        assert sum(topic in n for n in r["negatives"]) >= 2  # hard: mostly same-topic distractors
    again = mine_negatives(rows, retriever="bm25", top_k=10, num_negatives=3, seed=0, extra_docs=extra)
    assert [r["negatives"] for r in again] == [r["negatives"] for r in mined]
    skipped = mine_negatives(rows, retriever="bm25", top_k=10, skip_top=2, num_negatives=3, seed=0, extra_docs=extra)
    assert all(len(r["negatives"]) == 3 for r in skipped)


def test_false_negative_filter_drops_candidates_near_the_positives_score():
    # The near-copy of the positive scores about as high as the positive: a likely false negative.
    rows = [make_row(instruction="i", query=f"{t} valve repair", task_type="retrieval", source="s",
                     positive=f"{t} valve repair guide for beginners")
            for t in ("brass", "steel", "copper")]
    extra = [f"{t} valve repair guide for experts" for t in ("brass", "steel", "copper")]
    extra += [f"{t} valve catalogue" for t in ("brass", "steel", "copper")]
    kw = dict(retriever="bm25", top_k=10, num_negatives=10, seed=0, extra_docs=extra)
    plain = mine_negatives(rows, **kw)
    stats = {}
    filtered = mine_negatives(rows, **kw, max_positive_ratio=0.95, stats=stats)
    for r, p, f in zip(rows, plain, filtered):
        near = r["positive"].replace("beginners", "experts")
        assert near in p["negatives"]          # without the filter the near-copy is a "negative"
        assert near not in f["negatives"]      # with it, it is dropped
        assert f["negatives"]                  # and weaker candidates remain
    assert stats["rows_mined"] == 3 and stats["false_negatives_dropped"] >= 3


def test_a_query_without_bm25_tokens_gets_no_negatives_and_the_rest_are_mined():
    # "and then, is it?" is stopwords and punctuation only: BM25 has nothing to rank it by.
    rows = [make_row(instruction="i", query=q, task_type="retrieval", source="s", positive=p)
            for q, p in (("and then, is it?", "a passage about nothing in particular"),
                         ("brass valve repair", "brass valve repair guide"))]
    extra = ["brass valve catalogue", "steel valve catalogue", "an unrelated text"]
    stats: dict = {}
    mined = mine_negatives(rows, retriever="bm25", top_k=10, num_negatives=2, seed=0, extra_docs=extra,
                           max_positive_ratio=0.95, stats=stats)
    assert mined[0]["negatives"] == []
    assert len(mined[1]["negatives"]) == 2 and "brass valve repair guide" not in mined[1]["negatives"]
    assert stats["rows_mined"] == 2 and stats["rows_short"] == 1


def test_data_build_mines_sources_that_lack_negatives(tmp_path):
    a = _pairs_file(tmp_path / "a.jsonl", 40, "alpha")
    b = _pairs_file(tmp_path / "b.jsonl", 40, "beta")
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"q": f"gamma question {i}", "d": f"gamma answer {i}", "n": [f"gamma other {i}"]})
                         + "\n" for i in range(40)))
    cols = {"query": "q", "positive": "d"}
    sources = [{"name": "a", "format": "jsonl", "path": str(a), "instruction": "i", "columns": cols},
               {"name": "b", "format": "jsonl", "path": str(b), "instruction": "i", "columns": cols, "mine": False},
               {"name": "c", "format": "jsonl", "path": str(c), "instruction": "i", "columns": {**cols, "negatives": "n"}}]
    m = read_manifest(build_mix(_cfg(tmp_path, sources, val_fraction=0.0)))
    out = tmp_path / "run" / "data"
    rows = [r for f in m["train"]["files"] for r in pq.read_table(out / f["path"]).to_pylist()]
    by = {s: [r for r in rows if r["source"] == s] for s in "abc"}
    assert all(len(r["negatives"]) == 1 and r["negatives"][0] != r["positive"]
               and r["negatives"][0].startswith("alpha answer") for r in by["a"])  # mined within source a
    assert all(r["negatives"] == [] for r in by["b"])                              # mine: false
    assert all(r["negatives"] == [r["positive"].replace("answer", "other")] for r in by["c"])  # kept as given
    assert m["sources"]["a"]["mined"]["rows_mined"] == 40
    assert "mined" not in m["sources"]["b"] and "mined" not in m["sources"]["c"]
    off = read_manifest(build_mix(_cfg(tmp_path, sources[:1], val_fraction=0.0, mine={"in_build": False})))
    assert "mined" not in off["sources"]["a"]


def test_mining_with_a_saved_embedder(tiny_embedder_dir):
    rows = [make_row(instruction="i", query=f"q{i}", positive=f"doc {i}", task_type="retrieval", source="s")
            for i in range(12)]
    mined = mine_negatives(rows, retriever=str(tiny_embedder_dir), top_k=5, num_negatives=2, seed=1)
    for r in mined:
        assert len(r["negatives"]) == 2 and r["positive"] not in r["negatives"]


def test_schema_source_skips_bookkeeping_files(tmp_path):
    import json

    from rayembed.data.schema import to_table
    from rayembed.io import atomic_write_parquet

    synth = tmp_path / "synth"
    row = make_row(instruction="i", query="q one", positive="p one", task_type="sts", source="synth:x")
    atomic_write_parquet(synth / "part-00000.parquet", to_table([row]))
    (synth / "_rejects").mkdir()
    (synth / "_rejects" / "generate-part-00000.jsonl").write_text(json.dumps({"reason": "no_json", "reply": "hi"}) + "\n")
    src = {"name": "synthetic", "format": "schema", "path": str(synth)}
    m = read_manifest(build_mix(_cfg(tmp_path, [src], max_bad_fraction=0.0)))
    assert m["train"]["rows"] + m["val"]["rows"] == 1

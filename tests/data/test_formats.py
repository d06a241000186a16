"""Local format readers on the real data in ../shared/data and on small fixtures."""

from __future__ import annotations

import json

import pytest

from rayembed.data.formats import BadRows, iter_records, load_beir, load_smart_collection, load_stsb


def test_cranfield_counts_and_query_renumbering(data_dir):
    corpus, queries, qrels = load_smart_collection(data_dir / "cranfield")
    assert len(corpus) == 1400 and len(queries) == 225
    assert sum(len(v) for v in qrels.values()) == 1837
    # cranqrel numbers queries 1..225 in order; the queries keep their .I ids (1, 2, 4, 8, ...).
    assert list(queries)[:4] == ["1", "2", "4", "8"]
    assert set(qrels) <= set(queries) and len(qrels) == 225
    third = list(queries)[2]  # judged as query "3" in cranqrel
    assert third == "4" and qrels["4"]
    assert qrels["1"]["184"] == 5 - 2  # "1 184 2" in cranqrel
    assert corpus["471"]["text"] == "" and corpus["995"]["text"] == ""
    assert queries["1"].startswith("what similarity laws must be obeyed")


def test_msmarco_subset_beir_counts(data_dir):
    corpus, queries, qrels = load_beir(data_dir / "msmarco-subset")
    assert (len(corpus), len(queries), len(qrels)) == (5000, 50, 43)
    assert sum(len(v) for v in qrels.values()) == 4102
    assert {g for v in qrels.values() for g in v.values()} <= {1, 2, 3}
    assert set(corpus[next(iter(corpus))]) == {"title", "text"}


def test_stsb_counts(data_dir):
    for split, n in (("train", 5749), ("dev", 1500), ("test", 1379)):
        s1, s2, scores = load_stsb(data_dir / "stsb" / f"sts-{split}.csv")
        assert len(s1) == len(s2) == len(scores) == n
        assert 0.0 <= min(scores) and max(scores) <= 5.0
    assert s1[0] == "A girl is styling her hair."


def test_cisi_style_binary_qrels(tmp_path):
    d = tmp_path / "cisi"
    d.mkdir()
    (d / "CISI.ALL").write_text(".I 1\n.T\nFirst doc\n.A\nSomeone\n.W\nAbout libraries.\n.X\n1 5 1\n"
                                ".I 2\n.T\nSecond\n.W\nAbout indexing\nand search.\n")
    (d / "CISI.QRY").write_text(".I 1\n.W\nHow are books indexed?\n.I 2\n.W\nWhat is a library?\n")
    (d / "CISI.REL").write_text("     1     2 0 0.000000\n     2     1 0 0.000000\n")
    corpus, queries, qrels = load_smart_collection(d)
    assert corpus["2"] == {"title": "Second", "text": "About indexing and search."}
    assert queries == {"1": "How are books indexed?", "2": "What is a library?"}
    assert qrels == {"1": {"2": 1}, "2": {"1": 1}}


def test_beir_with_header_and_missing_parts(tmp_path):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "x"}) + "\n")
    (d / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "y"}) + "\n")
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    _, _, qrels = load_beir(d, split="train")
    assert qrels == {"q1": {"d1": 1}}
    with pytest.raises(FileNotFoundError, match=r"lacks qrels/test.tsv.*train.tsv"):
        load_beir(d)


def test_bad_rows_are_counted_then_fail_over_the_threshold(tmp_path):
    p = tmp_path / "pairs.jsonl"
    good = [json.dumps({"q": f"q{i}", "p": f"p{i}"}) for i in range(8)]
    p.write_bytes(("\n".join(good[:4]) + "\n{broken\n").encode() + b"\xff\xfe bad bytes\n" + ("\n".join(good[4:]) + "\n").encode())
    bad = BadRows(str(p))
    rows = list(iter_records(p, {"query": "q", "positive": "p"}, bad))
    assert [r["query"] for r in rows] == [f"q{i}" for i in range(8)]
    assert bad.total == 10 and bad.bad == 2
    assert bad.reasons == {"invalid JSON": 1, "not UTF-8": 1}
    bad.check(0.25)  # 20% bad: skipped with a warning
    with pytest.raises(ValueError, match=r"pairs.jsonl: 2 of 10 rows are bad .*pairs.jsonl:5: invalid JSON"):
        bad.check(0.1)

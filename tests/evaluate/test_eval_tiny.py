"""`rayembed eval` end to end on tiny data with a tiny saved embedder, BM25 and the passkey test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayembed.cli import main
from rayembed.config.eval import DatasetSpec
from rayembed.evaluate import (
    BM25Retriever,
    evaluate_models,
    load_dataset,
    make_passkey_data,
    passkey_accuracy,
    render_table,
    run_passkey,
)
from rayembed.evaluate.passkey import count_words


def _sts_file(tmp_path):
    rows = [("A man plays a guitar.", "A man is playing guitar.", 4.8),
            ("A dog runs.", "A cat sleeps.", 0.6),
            ("Kids swim in a pool.", "Children are swimming.", 4.0),
            ("The stock fell.", "A bird sings.", 0.0)]
    path = tmp_path / "sts-test.csv"
    path.write_text("".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(rows)))
    return path


def _by_hand(model_dir, beir, sts):
    """nDCG@10 (linear gains, as trec_eval) and Spearman computed directly from the embedder."""
    from scipy.stats import spearmanr

    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(model_dir)
    data = load_dataset(DatasetSpec(name="tiny", path=str(beir)))
    doc_ids = data.doc_ids()
    dvecs = emb.encode(data.doc_texts())  # (docs, dim)
    judged = [q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values())]
    qvecs = emb.encode([data.queries[q] for q in judged], instruction=data.instruction)  # (queries, dim)
    per_query = []
    for q, scores in zip(judged, qvecs @ dvecs.T):
        top = np.argsort(-scores, kind="stable")[:10]
        dcg = sum(data.qrels[q].get(doc_ids[j], 0) / np.log2(r + 2) for r, j in enumerate(top))
        ideal = sorted(data.qrels[q].values(), reverse=True)[:10]
        per_query.append(dcg / sum(g / np.log2(r + 2) for r, g in enumerate(ideal)))
    pairs = load_dataset(DatasetSpec(name="sts", path=str(sts), format="sts"))
    a = emb.encode(pairs.sentences1, instruction=pairs.instruction)
    b = emb.encode(pairs.sentences2, instruction=pairs.instruction)
    return float(np.mean(per_query)), float(spearmanr((a * b).sum(axis=1), pairs.scores).statistic)


def test_cli_eval_writes_json_markdown_plot_and_config(tiny_embedder_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "eval"
    sts = _sts_file(tmp_path)
    rc = main([
        "eval", "--model", f"tiny={tiny_embedder_dir}", "--model", "bm25=bm25", "--output-dir", str(out),
        f"eval.datasets=[{{name: tiny, path: '{tiny_beir}'}}, {{name: sts, path: '{sts}', format: sts}}]",
        "eval.top_k=10",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "| bm25 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"tiny", "bm25"}
    tiny = results["metrics"]["tiny"]["tiny"]
    assert tiny["num_queries"] == 3
    # The reported numbers are the model's: recomputed here by hand from its own vectors.
    ndcg, rho = _by_hand(tiny_embedder_dir, tiny_beir, sts)
    assert tiny["ndcg@10"] == pytest.approx(ndcg, abs=1e-4)
    assert results["metrics"]["tiny"]["sts"]["spearman"] == pytest.approx(rho, abs=1e-6)
    assert "sts" not in results["metrics"]["bm25"]  # BM25 scores no sentence pairs
    # BM25 on its own terms: "capital of Italy" -> the Rome document first.
    assert results["metrics"]["bm25"]["tiny"]["mrr@10"] >= 0.5
    # A decoder embedder gets the instruction on queries; the dataset facts are recorded.
    assert results["models"]["tiny"]["instruct"] is True
    assert results["datasets"]["tiny"]["num_docs"] == 6
    assert (out / "results.md").read_text().startswith("# Evaluation results")
    assert (out / "ndcg.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "config.resolved.yaml").exists()
    per_query = json.loads((out / "per_query.json").read_text())
    assert set(per_query["bm25"]["tiny"]) == {"q1", "q2", "q3"}


def test_library_api_accepts_loaded_data_and_instruction_policy(tiny_embedder_dir, tiny_beir):
    data = load_dataset(DatasetSpec(name="tiny", path=str(tiny_beir)))
    results = evaluate_models({"tiny": str(tiny_embedder_dir)}, [data], None, query_instructions="never",
                              top_k=10, plot=False)
    assert results["models"]["tiny"]["instruct"] is False
    table = render_table(results)
    assert table.splitlines()[0] == "| model | tiny nDCG@10 | tiny R@100 |"


def test_unknown_model_is_a_clear_error(tiny_beir, tmp_path, capsys):
    rc = main(["eval", "--model", f"x={tmp_path / 'nope'}", "--output-dir", str(tmp_path / "o"),
               f"eval.datasets=[{{name: tiny, path: '{tiny_beir}'}}]"])
    assert rc == 1
    assert "could not be loaded" in capsys.readouterr().err


def test_passkey_data_has_one_needle_per_document_at_the_length():
    data = make_passkey_data(128, num_docs=10, num_queries=4, seed=1)
    assert len(data.corpus) == 10 and len(data.qrels) == 4
    for doc in data.corpus.values():
        assert doc["text"].count("passkey is") == 1
        assert 100 <= count_words(doc["text"]) <= 128
    # Different lengths give different insertion positions but the same kind of data.
    assert make_passkey_data(128, num_docs=10, num_queries=4, seed=1).corpus == data.corpus


def test_passkey_accuracy_bm25_is_perfect_and_tiny_model_runs(tiny_embedder_dir):
    from rayembed.evaluate import load_retriever

    bm25 = run_passkey(BM25Retriever(), [64, 128], num_docs=10, num_queries=5)
    assert {k: v["accuracy"] for k, v in bm25.items()} == {"64": 1.0, "128": 1.0}
    tiny = run_passkey(load_retriever("tiny", str(tiny_embedder_dir)), [64, 128], num_docs=10, num_queries=5)
    assert set(tiny) == {"64", "128"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["num_docs"] == 10 for r in tiny.values())


def test_passkey_cli_mode(tiny_embedder_dir, tmp_path, capsys):
    out = tmp_path / "pk"
    rc = main(["eval", "--passkey", "--model", f"tiny={tiny_embedder_dir}", "--model", "bm25=bm25",
               "--output-dir", str(out), "eval.passkey.lengths=[64]", "eval.passkey.num_docs=6",
               "eval.passkey.num_queries=3"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["passkey"]["bm25"]["64"]["accuracy"] == 1.0
    assert "Passkey retrieval" in capsys.readouterr().out


def test_passkey_accuracy_counts_top1():
    data = make_passkey_data(64, num_docs=3, num_queries=2, seed=0)
    (q1, rel1), (q2, _) = list(data.qrels.items())
    run = {q1: {next(iter(rel1)): 0.9, "other": 0.1}, q2: {"other": 1.0}}
    assert passkey_accuracy(run, data) == pytest.approx(0.5)
    assert np.isclose(passkey_accuracy({}, data), 0.0)


def test_eval_searches_a_prebuilt_exact_index_instead_of_encoding_the_corpus(tiny_embedder_dir, tiny_beir, tmp_path,
                                                                              monkeypatch, caplog):
    import rayembed.index as index_pkg

    build = index_pkg.build_index_in_process
    same = tmp_path / "same"
    build(str(tiny_embedder_dir), tiny_beir, same, format="beir")
    short = tmp_path / "short"  # another max_length: other vectors, so it must not stand in
    build(str(tiny_embedder_dir), tiny_beir, short, format="beir", max_length=4)
    part = tmp_path / "part"  # not every document
    build(str(tiny_embedder_dir), tiny_beir, part, format="beir", limit=3)
    spec = DatasetSpec(name="tiny", path=str(tiny_beir))
    baseline = evaluate_models({"m": str(tiny_embedder_dir)}, [spec], None, top_k=10, plot=False)
    expected = baseline["metrics"]["m"]["tiny"]["ndcg@10"]

    builds = []
    monkeypatch.setattr(index_pkg, "build_index_in_process", lambda *a, **k: builds.append(a) or build(*a, **k))
    r = evaluate_models({"m": str(tiny_embedder_dir)}, [spec], None, top_k=10, plot=False,
                        indexes={"m": {"tiny": str(same)}})
    assert builds == []                                       # the corpus was not indexed again
    assert r["models"]["m"]["index_from"] == {"tiny": str(same)}
    assert r["metrics"]["m"]["tiny"]["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    assert "Searched through the index stage's exact indexes" in render_table(r)
    for other, why in ((short, "stored vectors differ"), (part, "holds 3 documents and the dataset 5")):
        caplog.clear()
        r = evaluate_models({"m": str(tiny_embedder_dir)}, [spec], None, top_k=10, plot=False,
                            indexes={"m": {"tiny": str(other)}})
        assert "index_from" not in r["models"]["m"]                 # refused, with a warning saying why
        assert why in caplog.text
        assert r["metrics"]["m"]["tiny"]["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    assert len(builds) == 2

    # A hybrid row over the same model searches the prebuilt index too, when it holds a bm25 part.
    both = tmp_path / "both"
    build(str(tiny_embedder_dir), tiny_beir, both, format="beir", parts=["dense", "bm25"])
    builds.clear()
    r = evaluate_models({"m": str(tiny_embedder_dir)}, [spec], None, top_k=10, plot=False,
                        hybrid=[{"name": "h", "methods": {"dense": 1, "bm25": 1}}], indexes={"m": {"tiny": str(both)}})
    assert builds == [] and r["models"]["m"]["index_from"] == {"tiny": str(both)}
    assert r["metrics"]["h"]["tiny"]["ndcg@10"] > 0

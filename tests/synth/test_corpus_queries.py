"""The corpus-queries task against the scripted server: queries written for passages of a corpus,
the round-trip filter, rows that name their passage, and bad input refused before any request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from synth_helpers import Reply, synth_cfg

from rayembed.config import ConfigError

TOPICS = {
    "d1": ("Volcanoes", "basalt lava magma eruption crater volcanic ash plume caldera"),
    "d2": ("Coffee", "espresso arabica roasting beans crema barista grinder brewing"),
    "d3": ("Chess", "gambit checkmate bishop rook pawn endgame castling opening"),
    "d4": ("Glaciers", "moraine crevasse icefield meltwater fjord snowpack calving drift"),
    "d5": ("Violins", "fiddle bow rosin strings luthier spruce bridge tuning"),
    "d6": ("Bees", "hive honeycomb pollen nectar queen drone swarm apiary"),
}


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    filler = "This passage describes the subject in some detail for readers who want to learn more"
    with open(path, "w") as f:
        for i, (title, words) in TOPICS.items():
            f.write(json.dumps({"_id": i, "title": title, "text": f"{words}. {filler}."}) + "\n")
    return path


def _passage_words(prompt: str) -> list[str]:
    return re.search(r"Passage:\n(.*?)\n\n", prompt, re.S).group(1).split()


def _rows(out: Path) -> list[dict]:
    return pads.dataset([str(p) for p in sorted(out.glob("part-*.parquet"))], format="parquet").to_table().to_pylist()


def test_queries_that_find_their_passage_are_kept_and_name_it(ray_local, scripted_llm, api_key, tmp_path):
    from rayembed.synth import run_synth

    def script(prompt, attempt):
        words = _passage_words(prompt)
        if words[0] in ("Chess", "Bees"):  # a query about another passage: it cannot find its own
            return Reply(json.dumps({"query": "espresso arabica roasting beans"}))
        return Reply(json.dumps({"query": " ".join(words[1:5])}))  # the passage's own key terms

    scripted_llm.script = script
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={corpus-queries: 6}",
                    f"synth.corpus_queries={{corpus: '{_corpus(tmp_path)}', name: topics, top_k: 1}}")
    s = run_synth(cfg)
    out = Path(s["output_dir"])
    rows = {r["id"]: r for r in _rows(out)}
    assert set(rows) == {"topics/d1", "topics/d2", "topics/d4", "topics/d5"}
    assert s["rows_by_task_type"] == {"corpus-queries": 4} and s["rejected_by_reason"] == {"round_trip": 2}
    d1 = rows["topics/d1"]
    assert d1["query"] == "basalt lava magma eruption" and d1["positive"].startswith("Volcanoes basalt lava")
    assert d1["negatives"] == [] and d1["source"] == "corpus-queries:topics"
    assert d1["instruction"].startswith("Given a web search query")
    rejects = [json.loads(line) for p in (out / "_rejects").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["round_trip", "round_trip"]
    assert all("ranked" in r["detail"] and "top_k=1" in r["detail"] for r in rejects)
    # Each request carried the reply's schema: one "query" key of 3 to 16 words.
    fmt = scripted_llm.log[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["query"]
    # A rerun finds every chunk done: no request is sent again.
    n = len(scripted_llm.log)
    assert run_synth(cfg)["accepted"] == 4 and len(scripted_llm.log) == n


def test_a_filter_that_keeps_nothing_ends_the_stage_saying_what_to_change(ray_local, scripted_llm, api_key,
                                                                          tmp_path):
    from rayembed.synth import run_synth
    from rayembed.synth.pipeline import SynthFailed

    scripted_llm.script = lambda prompt, attempt: Reply(json.dumps({"query": "completely unrelated words here"}))
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={corpus-queries: 3}",
                    f"synth.corpus_queries={{corpus: '{_corpus(tmp_path)}', top_k: 1}}")
    with pytest.raises(SynthFailed, match=r"kept none of the 3 corpus queries.*synth.corpus_queries.top_k"):
        run_synth(cfg)
    summary = json.loads((tmp_path / "synth" / "_summary.json").read_text())
    assert summary["rejected_by_reason"] == {"round_trip": 3}


def test_a_corpus_without_the_text_field_is_refused_before_any_request(scripted_llm, api_key, tmp_path):
    from rayembed.synth import run_synth

    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={corpus-queries: 3}",
                    f"synth.corpus_queries={{corpus: '{_corpus(tmp_path)}', text_field: body}}")
    with pytest.raises(ConfigError, match=r"text_field='body' is not a column of .*docs.jsonl.*'text'"):
        run_synth(cfg)
    assert scripted_llm.log == []
    with pytest.raises(ConfigError, match=r"synth.corpus_queries.corpus is empty"):
        synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={corpus-queries: 3}")


def test_a_query_with_no_bm25_token_finds_nothing_instead_of_failing():
    """A query of stopwords or punctuation only tokenises to nothing: it ranks last and is dropped."""
    from rayembed.synth.corpus_queries import _Ranker

    texts = [f"{title}: {words}" for title, words in TOPICS.values()]
    ranker = _Ranker("bm25", texts, instruction="")
    ranks = ranker.ranks(["basalt lava eruption", "what is the of it", "?!"], [0, 1, 2])
    assert ranks.tolist() == [1, len(texts), len(texts)]


def _big_corpus(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"p{i}", "text": f"passage {i} about topic {i % 97} " + "word " * 30}) + "\n")
    return path


def test_a_large_corpus_is_held_as_a_bounded_seeded_sample(tmp_path):
    """Above max_corpus_docs the driver keeps a seeded sample from across the whole corpus, in corpus
    order, while the fingerprint still covers every document; what it holds does not grow with the corpus."""
    import tracemalloc

    from rayembed.config.synth import CorpusQueriesConfig
    from rayembed.synth.corpus_queries import CorpusQueries

    small, large = _big_corpus(tmp_path / "small.jsonl", 2_000), _big_corpus(tmp_path / "large.jsonl", 20_000)
    capped = CorpusQueriesConfig(corpus=str(large), max_corpus_docs=200)
    a, b = CorpusQueries.load(capped), CorpusQueries.load(capped)
    assert len(a.docs) == 200 and a.corpus_docs == 20_000
    ids = [int(d["doc_id"][1:]) for d in a.docs]
    assert ids == sorted(ids) and ids == [int(d["doc_id"][1:]) for d in b.docs]  # seeded, corpus order
    assert max(ids) > 10_000 and min(ids) < 2_000  # drawn from across the corpus, not its head
    whole = CorpusQueries.load(CorpusQueriesConfig(corpus=str(large), max_corpus_docs=0))
    assert len(whole.docs) == 20_000 and whole.fingerprint() == a.fingerprint()
    assert CorpusQueries.load(CorpusQueriesConfig(corpus=str(small))).fingerprint() != a.fingerprint()

    def held(path: Path, cap: int) -> int:
        """Bytes the loaded corpus keeps, allocated in rayembed's code (the texts, the doc records),
        so that other threads of the test session do not count."""
        tracemalloc.start()
        try:
            corpus = CorpusQueries.load(CorpusQueriesConfig(corpus=str(path), max_corpus_docs=cap))
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*rayembed*")])
        finally:
            tracemalloc.stop()
        assert corpus.docs
        return sum(stat.size for stat in snap.statistics("filename"))

    assert held(large, 200) < 2 * held(small, 200)  # 10x the corpus, about the same bytes
    assert held(large, 0) > 5 * held(small, 0)  # without the cap it grows with the corpus


def test_max_corpus_docs_enters_the_resume_fingerprint_only_when_set(tmp_path):
    """Folders written before the key existed still resume at its default; another value is another run."""
    from rayembed.synth.resume import fingerprint

    base = synth_cfg(tmp_path, "http://127.0.0.1:1/v1", "synth.num_examples={corpus-queries: 3}",
                     f"synth.corpus_queries={{corpus: '{_corpus(tmp_path)}'}}")
    fp = fingerprint(base.synth, 0)
    assert "max_corpus_docs" not in fp["fields"]["corpus_queries"]
    other = synth_cfg(tmp_path, "http://127.0.0.1:1/v1", "synth.num_examples={corpus-queries: 3}",
                      f"synth.corpus_queries={{corpus: '{_corpus(tmp_path)}', max_corpus_docs: 5}}")
    assert fingerprint(other.synth, 0)["fingerprint"] != fp["fingerprint"]

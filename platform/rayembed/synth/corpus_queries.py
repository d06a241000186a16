"""The ``corpus-queries`` task: search queries written for passages of the user's own corpus
(InPars, Promptagator), kept only when they find their passage again (the round-trip filter).

Passages are sampled (seeded) from ``synth.corpus_queries.corpus``; the LLM writes one query per
passage under a JSON schema (``{"query": ...}``); the driver keeps a row only when the passage
ranks in the top ``top_k`` of BM25 (or of a given embedder) over the corpus for that query. A corpus
larger than ``max_corpus_docs`` is read once, streaming, and a seeded sample of that many passages is
kept: the driver's memory is bounded by it, not by the corpus, and the filter ranks over the sample.
Rejected queries go to ``_rejects/`` with the reason ``round_trip`` and the rank. Each row's id is
``<corpus name>/<document id>``, so evaluation can show which passages were used, and that no
evaluation query was.

Example (a recipe fragment)::

    synth:
      num_examples: {corpus-queries: 200}
      corpus_queries: {corpus: msmarco-subset, filter: bm25, top_k: 3}
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.synth.prompts import PromptSpec, spec_id, spec_rng, words_schema

logger = logging.getLogger(__name__)

TASK_TYPE = "corpus-queries"


class CorpusQueries:
    """One corpus's passages and its round-trip filter, loaded before any request is sent."""

    def __init__(self, cq, name: str, docs: list[dict[str, str]], *, corpus_fingerprint: str | None = None,
                 corpus_docs: int | None = None):
        self.cq = cq
        self.name = name
        self.docs = docs  # {"doc_id", "text" (title and body, as the index encodes it)}
        self.index_of = {d["doc_id"]: i for i, d in enumerate(docs)}
        self.corpus_docs = len(docs) if corpus_docs is None else corpus_docs  # in the whole corpus
        self._fingerprint = corpus_fingerprint
        self._ranker = None

    @classmethod
    def load(cls, cq, data_dir: str | Path | None = None) -> CorpusQueries:
        """Read the corpus. A missing file or text column is a ConfigError naming the key to fix."""
        from rayembed.config import ConfigError
        from rayembed.index.corpus import ColumnMapping, encode_text, iter_records, normalize, resolve_corpus

        try:
            path, fmt = resolve_corpus(cq.corpus, cq.format, data_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"synth.corpus_queries.corpus: {e}") from None
        mapping = ColumnMapping(id_field=cq.id_field, text_field=cq.text_field, title_field=cq.title_field)
        records = iter_records(path, fmt)
        first = next(records, None)
        if first is None:
            raise ConfigError(f"synth.corpus_queries.corpus {path} holds no documents.")
        if cq.text_field not in first:
            raise ConfigError(
                f"synth.corpus_queries.text_field={cq.text_field!r} is not a column of {path} (its first record "
                f"has {sorted(first)[:8]}). Set synth.corpus_queries.text_field to the column holding the text."
            )
        # One streaming pass: every document is hashed, at most max_corpus_docs are kept (a seeded
        # reservoir sample, in corpus order), so the driver's memory does not grow with the corpus.
        cap = cq.max_corpus_docs or None
        rng = random.Random(f"corpus-queries-pool:{cap}")
        h = hashlib.sha256()
        pool: list[tuple[int, dict[str, str]]] = []
        n = 0
        try:
            for n, d in enumerate(normalize(_chain(first, records), mapping, source=str(path)), start=1):
                doc = {"doc_id": d["doc_id"], "text": encode_text(d["text"], d["title"], True)}
                h.update(_doc_bytes(doc))
                if cap is None or len(pool) < cap:
                    pool.append((n, doc))
                else:
                    j = rng.randrange(n)
                    if j < cap:
                        pool[j] = (n, doc)
        except ValueError as e:
            raise ConfigError(f"synth.corpus_queries: {e}") from None
        docs = [doc for _, doc in sorted(pool, key=lambda t: t[0])]
        if len(docs) < n:
            logger.info("corpus-queries: %s holds %d passages; a seeded sample of %d is drawn from and ranked over "
                        "(synth.corpus_queries.max_corpus_docs)", path, n, len(docs))
        name = cq.name or (path.parent.name if path.name in ("corpus.jsonl", "cran.all.1400") else path.stem)
        return cls(cq, name, docs, corpus_fingerprint=h.hexdigest()[:16], corpus_docs=n)

    def fingerprint(self) -> str:
        """A hash of the whole corpus: part of every spec id, so a changed corpus is never mixed in."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for d in self.docs:
                h.update(_doc_bytes(d))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def specs(self, n: int, seed: int, max_tokens: int, structured_output: Any) -> list[PromptSpec]:
        """``n`` passages sampled with a seeded RNG (long enough ones only), one request each."""
        cq = self.cq
        fp = self.fingerprint()
        eligible = [i for i, d in enumerate(self.docs) if len(d["text"].split()) >= cq.min_passage_words]
        if not eligible:
            from rayembed.config import ConfigError

            raise ConfigError(
                f"synth.corpus_queries: no passage of {self.name} has {cq.min_passage_words} words or more; "
                "lower synth.corpus_queries.min_passage_words."
            )
        picked = spec_rng(seed, TASK_TYPE, fp).sample(eligible, min(n, len(eligible)))
        if len(picked) < n:
            logger.warning("corpus-queries: %s has %d eligible passages, fewer than the %d asked for",
                           self.name, len(eligible), n)
        schema = {
            "type": "object",
            "properties": {"query": words_schema(cq.min_query_words, cq.max_query_words * 9)},
            "required": ["query"],
            "additionalProperties": False,
        }
        specs = []
        for i, di in enumerate(picked):
            doc = self.docs[di]
            specs.append(PromptSpec(
                id=spec_id(seed, "generate", TASK_TYPE, i, fp, doc["doc_id"]),
                stage="generate",
                task_type=TASK_TYPE,
                prompt=query_prompt(doc["text"][: cq.max_passage_chars], cq.min_query_words, cq.max_query_words),
                max_tokens=max_tokens,
                language="en",
                instruction=cq.instruction,
                placeholders={"corpus": self.name, "doc_id": doc["doc_id"], "passage": doc["text"],
                              "min_words": cq.min_query_words, "max_words": cq.max_query_words},
                schema=schema if structured_output not in (None, False, "off") else None,
            ))
        return specs

    def ranks(self, queries: list[str], doc_ids: list[str]) -> np.ndarray:
        """The rank (1 = first) of each query's passage under the filter, over the passages held (the
        whole corpus up to ``max_corpus_docs``)."""
        if self._ranker is None:
            t0 = time.perf_counter()
            self._ranker = _Ranker(self.cq.filter, [d["text"] for d in self.docs], self.cq.instruction)
            logger.info("corpus-queries: %s filter over %d passages ready in %.1f s", self.cq.filter,
                        len(self.docs), time.perf_counter() - t0)
        return self._ranker.ranks(queries, [self.index_of[d] for d in doc_ids])


def _doc_bytes(d: dict[str, str]) -> bytes:
    return d["doc_id"].encode() + b"\x1f" + d["text"].encode() + b"\x1e"


def _chain(first, rest):
    yield first
    yield from rest


def query_prompt(passage: str, min_words: int, max_words: int) -> str:
    """No worked example: SmolLM2-135M answers every passage with the example's query instead
    (23 of 24 in a trial, each caught by the round-trip filter)."""
    return (
        "You are writing one search query for a retrieval training set.\n\n"
        f"Passage:\n{passage}\n\n"
        "Return a JSON object with one key:\n"
        f'- "query": a string; a search query of {min_words} to {max_words} words that a person would type '
        "to find this passage. Use the passage's key terms; do not copy a whole sentence from it.\n\n"
        "Reply with the JSON object only."
    )


class _Ranker:
    """Scores every passage for a query: BM25 (bm25s) or an embedder's inner products."""

    def __init__(self, how: str, texts: list[str], instruction: str):
        self.how = how
        if how == "bm25":
            import bm25s

            self.bm25 = bm25s.BM25()
            self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            self._n_docs = len(texts)
        else:
            from rayembed.modeling.embedder import Embedder

            self.emb = Embedder.from_pretrained(how)
            self.instruction = instruction
            self.vecs = self.emb.encode(texts).astype(np.float32)  # (n_docs, dim)

    def ranks(self, queries: list[str], targets: list[int]) -> np.ndarray:
        if not queries:
            return np.zeros(0, np.int64)
        if self.how == "bm25":
            import bm25s

            tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)
            # A query of stopwords or punctuation only has no BM25 token: it scores 0 everywhere,
            # so it finds nothing and is rejected (bm25s itself fails on an empty token list).
            scores = np.stack([self.bm25.get_scores(t) if t else np.zeros(self._n_docs, np.float32)
                               for t in tokens])  # (nq, n_docs)
        else:
            q = self.emb.encode([self.emb.format_query(x, self.instruction) for x in queries]).astype(np.float32)
            scores = q @ self.vecs.T  # (nq, n_docs)
        own = scores[np.arange(len(queries)), targets]
        # Ties count against the passage: a query every passage matches equally finds nothing.
        return 1 + (scores > own[:, None]).sum(axis=1) + ((scores == own[:, None]).sum(axis=1) - 1)

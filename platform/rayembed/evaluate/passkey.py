"""The personalised passkey retrieval test (E5-mistral, long context), generated synthetically.

Each candidate document is filler text of a given length in tokens with one sentence, at a
random position, giving a unique person's passkey. The query asks for that person's passkey;
the answer is the one document naming them. Accuracy is the share of queries whose top hit is
that document. The filler is identical across documents, so only the needle tells them apart,
and a model must carry one name through the whole context to succeed.

Example::

    data = make_passkey_data(256, num_docs=100, num_queries=20, count_tokens=len_in_tokens)
    accuracy = passkey_accuracy(retriever.search(data, k=1), data)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from rayembed.evaluate.datasets import RetrievalData
from rayembed.evaluate.instructions import instruction_for

logger = logging.getLogger(__name__)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_FIRST = ("Alice Bruno Chen Dalia Emeka Farah Goran Hana Ivan Jonas Kemal Lucia Mateo Nadia Oskar Priya "
          "Quentin Rosa Sven Tariq Ulla Viktor Wanda Xavier Yusuf Zofia").split()
_LAST = ("Abbott Bianchi Castillo Dubois Eriksen Fischer Garcia Horvath Ibrahim Jansen Kowalski Lindqvist "
         "Moreau Novak Okafor Petrov Quinn Rossi Schmidt Tanaka Ueda Varga Weber Xu Yilmaz Zhou").split()


def count_words(text: str) -> int:
    """A tokenizer-free length (whitespace words), for lexical models."""
    return len(text.split())


def make_passkey_data(
    length: int,
    *,
    num_docs: int = 100,
    num_queries: int = 20,
    seed: int = 0,
    count_tokens: Callable[[str], int] = count_words,
    instruction: str | None = None,
) -> RetrievalData:
    """A retrieval set of ``num_docs`` passkey documents of about ``length`` tokens each.

    ``count_tokens`` measures a text in the model's tokens, so lengths mean what the model sees.
    """
    if num_docs > len(_FIRST) * len(_LAST):
        raise ValueError(f"num_docs={num_docs} exceeds the {len(_FIRST) * len(_LAST)} unique names available.")
    rng = random.Random(f"{seed}-{length}")
    names = rng.sample([f"{f} {last}" for f in _FIRST for last in _LAST], num_docs)
    filler_tokens = max(1, count_tokens(FILLER + " "))
    corpus, queries, qrels = {}, {}, {}
    for i, name in enumerate(names):
        key = rng.randint(10_000, 99_999)
        needle = f"{name}'s passkey is {key}. Remember it. {key} is the passkey for {name}."
        units = max(0, (length - count_tokens(needle)) // filler_tokens)
        pos = rng.randint(0, units)
        text = " ".join([FILLER] * pos + [needle] + [FILLER] * (units - pos))
        corpus[f"d{i}"] = {"title": "", "text": text}
    for i in rng.sample(range(num_docs), num_queries):
        queries[f"q{i}"] = f"What is the passkey for {names[i]}?"
        qrels[f"q{i}"] = {f"d{i}": 1}
    return RetrievalData(
        name=f"passkey-{length}", corpus=corpus, queries=queries, qrels=qrels,
        instruction=instruction or instruction_for("passkey"),
    )


def passkey_accuracy(run: dict[str, dict[str, float]], data: RetrievalData) -> float:
    """Share of queries whose highest-scoring document is the one holding their passkey."""
    hits = 0
    for qid, rel in data.qrels.items():
        ranked = sorted(run.get(qid, {}).items(), key=lambda x: -x[1])
        hits += bool(ranked) and ranked[0][0] in rel
    return hits / max(len(data.qrels), 1)


def run_passkey(retriever, lengths: list[int], *, num_docs: int = 100, num_queries: int = 20,
                seed: int = 0, instruction: str | None = None) -> dict[str, dict]:
    """Accuracy per length for one retriever (dense or BM25): ``{str(length): {...}}``.

    Dense models encode at ``length`` plus a margin, capped at the model's position limit;
    a document longer than that is truncated and the result says ``truncated_to``.
    """
    from rayembed.evaluate.retrieval import DenseRetriever

    out: dict[str, dict] = {}
    for length in lengths:
        count, limit = count_words, None
        if isinstance(retriever, DenseRetriever):
            count, limit = _token_counter(retriever.embedder), _position_limit(retriever.embedder)
        data = make_passkey_data(length, num_docs=num_docs, num_queries=num_queries, seed=seed,
                                 count_tokens=count, instruction=instruction)
        saved = getattr(retriever, "max_length", None)
        want = length + 32  # the query template and special tokens
        effective = min(want, limit) if limit else want
        if isinstance(retriever, DenseRetriever):
            retriever.max_length = effective
        try:
            run = retriever.search(data, k=1)
        finally:
            if isinstance(retriever, DenseRetriever):
                retriever.max_length = saved
        acc = passkey_accuracy(run, data)
        row = {"accuracy": acc, "num_queries": num_queries, "num_docs": num_docs}
        if limit and limit < want:
            row["truncated_to"] = effective
        logger.info("passkey length %d: accuracy %.3f", length, acc)
        out[str(length)] = row
    return out


def _token_counter(embedder) -> Callable[[str], int]:
    tok = embedder.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def _position_limit(embedder) -> int | None:
    cfg = getattr(embedder.model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if limit else None

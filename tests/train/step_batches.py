"""The in-process step tests' batch, imported by name (conftest.py holds fixtures and data
writers: a module named ``conftest`` is whichever directory's conftest pytest imported last, so
tests never import it)."""

from __future__ import annotations

# Eight queries, their positives, then eight negatives: the in-process step tests' batch.
QUERIES = [f"question number {i} about topic {i % 3}" for i in range(8)]
DOCS = [f"passage {i} answers topic {i % 3} in detail" for i in range(8)]
NEGS = [f"unrelated text {i}" for i in range(8)]


def contrastive_batch(emb, queries=QUERIES, docs=DOCS + NEGS, query_len: int = 32, doc_len: int = 32) -> dict:
    """A training batch as the token stream delivers it: padded queries, then positives and
    negatives as one padded document group."""
    q = emb.tokenize(queries, max_length=query_len)
    d = emb.tokenize(docs, max_length=doc_len)
    return {
        "q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
        "d_input_ids": d["input_ids"], "d_attention_mask": d["attention_mask"],
        "id": [str(i) for i in range(len(queries))], "num_tokens": 0,
    }

"""MS MARCO passage ranking, in its official TSV release (or a BEIR folder).

Offline layout: ``collection.tsv`` (pid, passage), ``queries.train.tsv`` (qid, query),
``qrels.train.tsv`` (qid, 0, pid, 1). A folder with ``corpus.jsonl`` is read as BEIR instead.
"""

from rayembed.data.registry import (
    PublicDataset,
    find_file,
    read_beir_train,
    read_tsv_rows,
    register,
    rows_from_qrels,
)


def read_marco(ds, path, bad, collection, queries, qrels, text_cols, split="train", **kw):
    if (path / "corpus.jsonl").exists():
        yield from read_beir_train(ds, path, bad, split=split)
        return
    qrel_file = find_file(path, *qrels)
    qrel: dict[str, dict[str, int]] = {}
    for _, p in read_tsv_rows(qrel_file, bad, 4):
        qrel.setdefault(p[0], {})[p[2]] = int(p[3])
    needed = {d for v in qrel.values() for d in v}
    corpus = {}
    for _, p in read_tsv_rows(find_file(path, *collection), bad, max(text_cols) + 1):
        if p[0] in needed:
            corpus[p[0]] = "\n".join(p[c].strip() for c in text_cols if p[c].strip())
    qs = {p[0]: p[1] for _, p in read_tsv_rows(find_file(path, *queries), bad, 2) if p[0] in qrel}
    yield from rows_from_qrels(ds, corpus, qs, qrel, bad)


DATASET = register(PublicDataset(
    name="msmarco-passage",
    instruction="Given a web search query, retrieve relevant passages that answer the query",
    ratio=0.5,
    read_offline=lambda path, bad, **kw: read_marco(
        DATASET, path, bad, ("collection.tsv",), ("queries.train.tsv",), ("qrels.train.tsv",), (1,), **kw),
    layout="collection.tsv, queries.train.tsv, qrels.train.tsv (or a BEIR folder)",
    hub_id="sentence-transformers/msmarco-bm25",
    hub_config="triplet",
    hub_columns={"query": "query", "positive": "positive", "negative": "negative"},
))

"""T2Ranking: Chinese passage ranking, in its release's TSV files (with headers).

Offline layout: ``collection.tsv`` (pid, text), ``queries.train.tsv`` (qid, text) and
``qrels.retrieval.train.tsv`` (qid, pid): every listed pair is a positive.
"""

from rayembed.data.registry import PublicDataset, find_file, read_tsv_rows, register, rows_from_qrels


def _read(path, bad, **_):
    qrel: dict[str, dict[str, int]] = {}
    for _, p in read_tsv_rows(find_file(path, "qrels.retrieval.train.tsv", "qrels*.tsv"), bad, 2, header=True):
        qrel.setdefault(p[0], {})[p[1]] = 1
    needed = {d for v in qrel.values() for d in v}
    corpus = {p[0]: p[1] for _, p in read_tsv_rows(find_file(path, "collection.tsv"), bad, 2, header=True) if p[0] in needed}
    qs = {p[0]: p[1] for _, p in read_tsv_rows(find_file(path, "queries.train.tsv", "queries*.tsv"), bad, 2, header=True)}
    yield from rows_from_qrels(DATASET, corpus, qs, qrel, bad)


DATASET = register(PublicDataset(
    name="t2ranking",
    instruction="Given a Chinese search query, retrieve web passages that answer the question",
    ratio=0.5,
    read_offline=_read,
    layout="collection.tsv, queries.train.tsv, qrels.retrieval.train.tsv",
    hub_id="THUIR/T2Ranking",
    hub_columns={"query": "query", "positive": "positive"},
    language="zh",
))

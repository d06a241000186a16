"""DuReader-retrieval: Chinese web search, in the baseline's dual-encoder training file.

Offline layout: ``dual.train.tsv``, tab-separated: query, positive title, positive passage,
negative title, negative passage, label (titles are usually '-'). Lines sharing a query and
positive are merged, collecting their negatives.
"""

from rayembed.data.registry import PublicDataset, read_tsv_rows, register


def _read(path, bad, **_):
    f = path if path.is_file() else sorted(path.rglob("*.tsv"))[0]
    merged: dict[tuple[str, str], list[str]] = {}
    for where, p in read_tsv_rows(f, bad, 5):
        q, pos, neg = p[0].strip(), p[2].strip(), p[4].strip()
        if not q or not pos:
            bad.reject(where, "empty query or positive passage")
            continue
        negs = merged.setdefault((q, pos), [])
        if neg and neg not in negs:
            negs.append(neg)
    for (q, pos), negs in merged.items():
        yield DATASET.row(q, pos, negs)


DATASET = register(PublicDataset(
    name="dureader",
    instruction="Given a Chinese search query, retrieve web passages that answer the question",
    ratio=1.0,
    read_offline=_read,
    layout="DuReader-retrieval dual.train.tsv (query, title, passage, neg title, neg passage, label)",
    hub_id="Tevatron/dureader-retrieval",
    hub_columns={"query": "query", "positive": "positive_passages", "negatives": "negative_passages"},
    language="zh",
))

"""Natural Questions, in DPR's training release (``biencoder-nq-train.json``).

Offline layout: a JSON list of ``{"question", "answers", "positive_ctxs": [{"title", "text"}],
"negative_ctxs", "hard_negative_ctxs"}``; the hard negatives (BM25) are kept.
"""

from rayembed.data.registry import PublicDataset, read_dpr_json, register

DATASET = register(PublicDataset(
    name="nq",
    instruction="Given a question, retrieve Wikipedia passages that answer the question",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_dpr_json(DATASET, path, bad, **kw),
    layout="DPR biencoder-nq-train.json",
    hub_id="sentence-transformers/natural-questions",
    hub_columns={"query": "query", "positive": "answer"},
))

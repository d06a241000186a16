"""TriviaQA, in DPR's training release (``biencoder-trivia-train.json``).

Offline layout: a JSON list of ``{"question", "positive_ctxs", "hard_negative_ctxs", ...}``.
"""

from rayembed.data.registry import PublicDataset, read_dpr_json, register

DATASET = register(PublicDataset(
    name="triviaqa",
    instruction="Retrieve Wikipedia passages that answer the question",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_dpr_json(DATASET, path, bad, **kw),
    layout="DPR biencoder-trivia-train.json",
    hub_id="sentence-transformers/trivia-qa",
    hub_columns={"query": "query", "positive": "answer"},
))

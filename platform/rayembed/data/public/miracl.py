"""MIRACL: multilingual Wikipedia retrieval (18 languages).

Offline layout: the Tevatron-style training JSONL the MIRACL release ships per language
(``miracl-<lang>/train.jsonl`` or ``.jsonl.gz``): ``{"query", "positive_passages": [{"title",
"text"}], "negative_passages": [...]}``. The language comes from the folder or file name.
"""

from rayembed.data.registry import PublicDataset, read_tevatron_jsonl, register

DATASET = register(PublicDataset(
    name="miracl",
    instruction="Given a question, retrieve Wikipedia passages that answer the question",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_tevatron_jsonl(DATASET, path, bad, **kw),
    layout="Tevatron JSONL per language (query, positive_passages, negative_passages)",
    hub_id="miracl/miracl",
    hub_config="en",
    hub_columns={"query": "query", "positive": "positive_passages", "negatives": "negative_passages"},
    language="multi",
))

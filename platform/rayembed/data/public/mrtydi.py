"""Mr. TyDi: multilingual open-retrieval questions over Wikipedia (11 languages).

Offline layout: the release's Tevatron-style training JSONL per language
(``mrtydi-v1.1-<language>/train.jsonl`` or ``.jsonl.gz``): ``{"query_id", "query",
"positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}``.
"""

from rayembed.data.registry import PublicDataset, read_tevatron_jsonl, register

DATASET = register(PublicDataset(
    name="mrtydi",
    instruction="Given a question, retrieve Wikipedia passages that answer the question",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_tevatron_jsonl(DATASET, path, bad, **kw),
    layout="Tevatron JSONL per language (query, positive_passages, negative_passages)",
    hub_id="castorini/mr-tydi",
    hub_config="english",
    hub_columns={"query": "query", "positive": "positive_passages", "negatives": "negative_passages"},
    language="multi",
))

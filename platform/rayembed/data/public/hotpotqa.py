"""HotpotQA: multi-hop questions over Wikipedia, in the BEIR layout (train split).

Offline layout: a BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``.
"""

from rayembed.data.registry import PublicDataset, read_beir_train, register

DATASET = register(PublicDataset(
    name="hotpotqa",
    instruction="Given a multi-hop question, retrieve documents that can help answer the question",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_beir_train(DATASET, path, bad, **kw),
    layout="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv)",
    hub_id="sentence-transformers/hotpotqa",
    hub_config="triplet",
    hub_columns={"query": "anchor", "positive": "positive", "negative": "negative"},
))

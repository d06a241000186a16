"""FEVER: claims and the Wikipedia documents that support or refute them, in the BEIR layout.

Offline layout: a BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``.
"""

from rayembed.data.registry import PublicDataset, read_beir_train, register

DATASET = register(PublicDataset(
    name="fever",
    instruction="Given a claim, retrieve documents that support or refute the claim",
    ratio=1.0,
    read_offline=lambda path, bad, **kw: read_beir_train(DATASET, path, bad, **kw),
    layout="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv)",
    hub_id="sentence-transformers/fever",
    hub_config="triplet",
    hub_columns={"query": "anchor", "positive": "positive", "negative": "negative"},
))

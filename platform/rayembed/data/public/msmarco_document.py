"""MS MARCO document ranking, in its official TSV release.

Offline layout: ``msmarco-docs.tsv`` (docid, url, title, body), ``msmarco-doctrain-queries.tsv``
(qid, query), ``msmarco-doctrain-qrels.tsv`` (qid, 0, docid, 1). The document text is its
title and body. There is no online loader: download those files from the MS MARCO site
(https://microsoft.github.io/msmarco/) and give their folder as the path.
"""

from rayembed.data.public.msmarco_passage import read_marco
from rayembed.data.registry import PublicDataset, register

DATASET = register(PublicDataset(
    name="msmarco-document",
    instruction="Given a web search query, retrieve relevant documents that answer the query",
    ratio=0.2,
    read_offline=lambda path, bad, **kw: read_marco(
        DATASET, path, bad, ("msmarco-docs.tsv",), ("msmarco-doctrain-queries.tsv",),
        ("msmarco-doctrain-qrels.tsv",), (2, 3), **kw),
    layout="msmarco-docs.tsv, msmarco-doctrain-queries.tsv, msmarco-doctrain-qrels.tsv",
    # No hub dataset holds document-ranking training pairs (microsoft/ms_marco is the passage QA
    # set): online loading refuses and names the official files to download instead.
    hub_id=None,
))

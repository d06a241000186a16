"""SQuAD v1.1: questions and the Wikipedia paragraph holding the answer.

Offline layout: the official ``train-v1.1.json``: ``{"data": [{"title", "paragraphs":
[{"context", "qas": [{"id", "question", ...}]}]}]}``. The positive is the question's
paragraph; the other paragraphs of the same article are its hard negatives (up to 4).
"""

import json

from rayembed.data.registry import PublicDataset, register


def _read(path, bad, max_negatives=4, **_):
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))["data"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f} is not a SQuAD JSON file ({e!r}); expected {{'data': [...]}}.") from e
        for art in data:
            paras = [p.get("context", "") for p in art.get("paragraphs", [])]
            for pi, para in enumerate(art.get("paragraphs", [])):
                ctx = para.get("context", "")
                others = [c for j, c in enumerate(paras) if j != pi and c.strip()]
                for qa in para.get("qas", []):
                    q = qa.get("question", "")
                    if not q.strip() or not ctx.strip():
                        bad.skip(f"{f.name} {qa.get('id', '?')}", "empty question or context")
                        continue
                    bad.ok()
                    yield DATASET.row(q.strip(), ctx, others[:max_negatives])


DATASET = register(PublicDataset(
    name="squad",
    instruction="Retrieve Wikipedia passages that answer the question",
    ratio=1.0,
    read_offline=_read,
    layout="the official SQuAD v1.1 train-v1.1.json",
    hub_id="sentence-transformers/squad",
    hub_columns={"query": "question", "positive": "answer"},
))

"""NLI (SNLI + MultiNLI), in SimCSE's training file ``nli_for_simcse.csv``: sent0, sent1, hard_neg.

Each line holds a premise, an entailed hypothesis and a contradiction (the hard negative).
The rows fall into the paper's two splits by a stable hash of their content: split 1
("given a premise, retrieve a hypothesis", asymmetric) and split 2 ("semantically similar
text", symmetric: the documents get the instruction too).
"""

import csv

from rayembed.data.formats import _read_lines
from rayembed.data.registry import PublicDataset, register, split_two
from rayembed.data.schema import make_id


def _read(path, bad, **_):
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    for f in files:
        header = None
        for lineno, line in _read_lines(f, bad):
            parts = next(csv.reader([line]))
            if header is None:
                header = parts
                continue
            rec = dict(zip(header, parts))
            a, b, neg = rec.get("sent0", ""), rec.get("sent1", ""), rec.get("hard_neg", "")
            if not a.strip() or not b.strip():
                bad.skip(f"{f.name}:{lineno}", "empty premise or hypothesis")
                continue
            bad.ok()
            yield DATASET.row(a, b, [neg] if neg.strip() else [], split2=split_two(make_id(a, b)))


DATASET = register(PublicDataset(
    name="nli",
    instruction="Given a premise, retrieve a hypothesis that is entailed by the premise",
    ratio=1.0,
    read_offline=_read,
    layout="SimCSE nli_for_simcse.csv (sent0, sent1, hard_neg)",
    hub_id="sentence-transformers/all-nli",
    hub_config="triplet",
    hub_columns={"query": "anchor", "positive": "positive", "negative": "negative"},
    split2=("Retrieve semantically similar text", True),
))

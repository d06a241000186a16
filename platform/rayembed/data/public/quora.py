"""Quora duplicate questions: ``quora_duplicate_questions.tsv`` as released by Quora.

Columns: id, qid1, qid2, question1, question2, is_duplicate (with a header). Duplicate pairs
(is_duplicate = 1) become symmetric training pairs, split in two by a stable hash, with the
paper's two instructions.
"""

from rayembed.data.registry import PublicDataset, read_tsv_rows, register, split_two
from rayembed.data.schema import make_id


def _read(path, bad, **_):
    f = path if path.is_file() else sorted(path.glob("*.tsv"))[0]
    for where, parts in read_tsv_rows(f, bad, 6, header=True):
        q1, q2, dup = parts[3], parts[4], parts[5].strip()
        if dup != "1":
            continue
        if not q1.strip() or not q2.strip():
            bad.reject(where, "empty question")
            continue
        yield DATASET.row(q1, q2, split2=split_two(make_id(q1, q2)))


DATASET = register(PublicDataset(
    name="quora",
    instruction="Given a question, retrieve questions that are semantically equivalent to the given question",
    ratio=0.1,
    read_offline=_read,
    layout="quora_duplicate_questions.tsv (id, qid1, qid2, question1, question2, is_duplicate)",
    hub_id="sentence-transformers/quora-duplicates",
    hub_config="pair",
    hub_columns={"query": "anchor", "positive": "positive"},
    symmetric=True,
    split2=("Find questions that have the same meaning as the input question", True),
))

"""Evaluation fixtures: a tiny BEIR folder written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_DOCS = {
    "d1": ("Paris", "Paris is the capital and largest city of France."),
    "d2": ("Berlin", "Berlin is the capital of Germany."),
    "d3": ("", "The mitochondria is the powerhouse of the cell."),
    "d4": ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar."),
    "d5": ("", ""),  # empty documents occur (Cranfield has two); they must not break anything
    "d6": ("Rome", "Rome is the capital of Italy, founded on seven hills."),
}
TINY_QUERIES = {"q1": "capital of France", "q2": "how do plants make sugar", "q3": "capital of Italy",
                "q4": "unjudged query"}
TINY_QRELS = [("q1", "d1", 2), ("q1", "d2", 0), ("q2", "d4", 1), ("q3", "d6", 1)]


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    root = tmp_path / "tiny-beir"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i, (title, text) in TINY_DOCS.items():
            f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i, text in TINY_QUERIES.items():
            f.write(json.dumps({"_id": i, "text": text}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in TINY_QRELS)
    )
    return root

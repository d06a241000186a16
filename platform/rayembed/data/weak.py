"""Weakly supervised pairs from raw text: title-body pairs and Contriever-style random crops.

For corpora with no queries. Two crops of one passage are positives for each other (Izacard
et al., 2022: independent random spans of 10-50% of the words); a document's title is a query
for its body. Seeded, so the same corpus gives the same pairs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

from rayembed.data.schema import make_row

TITLE_INSTRUCTION = "Given a title, retrieve the passage it belongs to"
CROP_INSTRUCTION = "Retrieve semantically similar text"


def random_crop(words: list[str], rng: random.Random, low: float = 0.1, high: float = 0.5, min_words: int = 5) -> str:
    n = len(words)
    size = max(min(min_words, n), int(round(n * rng.uniform(low, high))))
    start = rng.randrange(0, n - size + 1)
    return " ".join(words[start : start + size])


def weak_pairs(docs: Iterable[dict[str, Any]], *, source: str = "weak", mode: str = "both", seed: int = 0,
               min_words: int = 20, language: str = "en") -> Iterator[dict[str, Any]]:
    """Schema rows from ``{"id", "title", "text"}`` documents.

    ``mode``: ``title`` (title -> body, where a title exists), ``crops`` (two random crops of a
    text of at least ``min_words`` words, symmetric) or ``both``.
    """
    for doc in docs:
        did = str(doc.get("id", ""))
        title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
        if not text:
            continue
        if mode in ("title", "both") and title and title.lower() != text.lower():
            yield make_row(instruction=TITLE_INSTRUCTION, query=title, positive=text, task_type="title-body",
                           source=source, language=language)
        words = text.split()
        if mode in ("crops", "both") and len(words) >= min_words:
            rng = random.Random(f"{seed}:{source}:{did}")
            a, b = random_crop(words, rng), random_crop(words, rng)
            if a != b:
                yield make_row(instruction=CROP_INSTRUCTION, query=a, positive=b, task_type="crops",
                               source=source, language=language, symmetric=True)

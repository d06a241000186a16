"""Worker side of the training stream: tokenised rows -> shuffled, grouped, padded torch batches.

Owns the row type (:class:`Row`), the seeded shuffle buffer, batching (one source per batch or
mixed), filling missing negatives from earlier positives (:class:`NegativeFiller`) and
collation into the batch layout :mod:`rayembed.data.stream` documents (:func:`collate`).
:func:`rayembed.data.stream.iter_train_batches` strings them together.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple


class Row(NamedTuple):
    """One tokenised training example as the tokenising actor wrote it."""

    id: str
    source: str
    q_ids: list[int]  # the (instructed) query
    p_ids: list[int]  # the positive
    n_ids: list[list[int]]  # at most num_negatives hard negatives


def buffer_shuffle(rows: Iterator[Row], size: int, rng: random.Random) -> Iterator[Row]:
    """A seeded shuffle buffer over rows: deterministic for a given row order."""
    buf: list[Row] = []
    for r in rows:
        if len(buf) < size:
            buf.append(r)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], r
        yield out
    rng.shuffle(buf)
    yield from buf


def group_rows(rows: Iterator[Row], batch_size: int, *, homogeneous: bool, drop_last: bool) -> Iterator[list[Row]]:
    """Batches of ``batch_size`` rows; one source per batch when ``homogeneous``.

    In one-source mode each source fills its own batch; at the end of the stream the partial
    per-source batches are merged, in first-seen source order, into mixed batches, so a
    worker yields ``rows // batch_size`` batches either way (equal across workers).
    """
    b = batch_size
    if not homogeneous:
        cur: list[Row] = []
        for r in rows:
            cur.append(r)
            if len(cur) == b:
                yield cur
                cur = []
        if cur and not drop_last:
            yield cur
        return
    pending: OrderedDict[str, list[Row]] = OrderedDict()
    for r in rows:
        lst = pending.setdefault(r.source, [])
        lst.append(r)
        if len(lst) == b:
            yield lst
            del pending[r.source]
    rest = [r for lst in pending.values() for r in lst]
    for i in range(0, len(rest), b):
        chunk = rest[i : i + b]
        if len(chunk) == b or not drop_last:
            yield chunk


class NegativeFiller:
    """Gives every row exactly ``n`` negatives, filling missing ones from earlier positives.

    The pool holds the last ``pool_size`` positives of this worker's stream. An empty slot takes
    a random pool entry that is not a document of the current batch and not the row's own
    positive; with no such entry, the row's own negatives repeat, or, with none, the empty
    document. The choice is seeded by ``(seed, rank, batch index)``.
    """

    def __init__(self, n: int, pool_size: int, *, seed: int, rank: int, empty_doc: Callable[[], list[int]]):
        self.n = n
        self.seed = seed
        self.rank = rank
        self.pool: deque[tuple[int, ...]] = deque(maxlen=max(1, pool_size))
        self._empty_doc = empty_doc
        self._empty: list[int] | None = None

    def prime(self, rows: list[Row]) -> None:
        """Before the first batch, the pool takes the next batch's positives (look-ahead)."""
        if self.n and not self.pool:
            self.pool.extend(tuple(r.p_ids) for r in rows)

    def remember(self, rows: list[Row]) -> None:
        """A batch's positives join the pool once the batch is done."""
        if self.n:
            self.pool.extend(tuple(r.p_ids) for r in rows)

    def fill(self, rows: list[Row], batch_index: int) -> tuple[list[list[int]], int]:
        """``(negatives row-major, n per row; how many were filled)``."""
        if not self.n:
            return [], 0
        n = self.n
        docs: list[list[int]] = []
        filled = 0
        rng = random.Random(f"fill:{self.seed}:{self.rank}:{batch_index}")
        in_batch = {tuple(r.p_ids) for r in rows}
        cands = [d for d in self.pool if d not in in_batch]
        for r in rows:
            negs = list(r.n_ids)[:n]
            own = tuple(r.p_ids)
            while len(negs) < n:
                filled += 1
                usable = [c for c in cands if c != own] if cands else []
                if usable:
                    negs.append(list(usable[rng.randrange(len(usable))]))
                elif r.n_ids:
                    negs.append(list(r.n_ids[len(negs) % len(r.n_ids)]))
                else:
                    if self._empty is None:
                        self._empty = self._empty_doc()
                    negs.append(list(self._empty))
            docs.extend(negs)
        return docs, filled


def collate(rows: list[Row], negatives: list[list[int]], filled: int, text: Any, device: Any = None) -> dict[str, Any]:
    """The padded batch of ``rows``: queries, then documents = positives + ``negatives``.

    ``text`` pads (a :class:`~rayembed.modeling.tokenization.TextTokenizer`).
    """
    q = text.pad([r.q_ids for r in rows])
    d = text.pad([r.p_ids for r in rows] + negatives)
    ntok = int(q["attention_mask"].sum()) + int(d["attention_mask"].sum())
    batch = {
        "q_input_ids": q["input_ids"],  # (B, Lq)
        "q_attention_mask": q["attention_mask"],  # (B, Lq)
        "d_input_ids": d["input_ids"],  # (B*(1+n), Ld)
        "d_attention_mask": d["attention_mask"],  # (B*(1+n), Ld)
        "source": [r.source for r in rows],
        "id": [r.id for r in rows],
        "num_filled": filled,
        "num_tokens": ntok,
    }
    if device is not None:
        for k in ("q_input_ids", "q_attention_mask", "d_input_ids", "d_attention_mask"):
            batch[k] = batch[k].to(device, non_blocking=True)
    return batch

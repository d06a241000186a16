"""Metadata filters: a field index over the id map's ``metadata`` and the filters it answers.

A filter is a JSON object, one condition per field, all of which must hold::

    {"lang": "en"}                                   # equality
    {"lang": {"in": ["en", "de"]}}                   # any of the values
    {"year": {"gte": 2000, "lt": 2010}}              # numeric range (gt, gte, lt, lte)
    {"lang": {"eq": "en"}, "year": {"gte": 2015}}    # several fields: AND

A metadata value that is a list (``"tags": ["a", "b"]``) matches when any element does.
Numbers compare as numbers (``3 == 3.0``); strings, booleans and numbers never equal each other.

:class:`FieldIndex` is built once per opened index (lazily, on the first filtered search) from
the Parquet id map: per field, value -> sorted ids for equality and ``in``, and the numeric
values sorted with their ids for ranges. :meth:`FieldIndex.mask` turns a filter into a bool mask
over internal ids, which :meth:`rayembed.index.ShardedIndex.search` hands to FAISS as an
``IDSelectorBitmap``: the filter is applied inside the search, never by over-fetching.

Metadata fields come from the corpus columns named in ``index.metadata_fields``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

OPS = ("eq", "in", "gt", "gte", "lt", "lte")
RANGE_OPS = {"gt", "gte", "lt", "lte"}
MAX_IN_VALUES = 1024


class FilterError(ValueError):
    """A filter the index cannot answer; ``field`` names the offending field (``None``: the filter itself)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def _key(v: Any) -> tuple[str, Any] | None:
    """A hashable, type-aware key for an equality value (None for values that cannot be compared)."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, (int, float)) and np.isfinite(v):
        return ("n", float(v))
    if isinstance(v, str):
        return ("s", v)
    return None


class FieldIndex:
    """Per-field equality postings and sorted numeric values over internal ids ``0..ntotal-1``."""

    def __init__(self, ntotal: int, eq: dict[str, dict[tuple[str, Any], np.ndarray]],
                 num: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.ntotal = int(ntotal)
        self._eq = eq  # field -> {key: sorted ids}
        self._num = num  # field -> (sorted values, their ids)

    @classmethod
    def from_rows(cls, ntotal: int, rows: list[tuple[int, str | None]]) -> FieldIndex:
        """Build from ``(internal id, metadata JSON or None)`` pairs."""
        eq: dict[str, dict[tuple[str, Any], list[int]]] = {}
        num: dict[str, tuple[list[float], list[int]]] = {}
        for gid, meta in rows:
            if not meta:
                continue
            obj = json.loads(meta) if isinstance(meta, str) else meta
            if not isinstance(obj, dict):
                continue
            for field, value in obj.items():
                postings = eq.setdefault(field, {})
                for v in value if isinstance(value, list) else [value]:
                    k = _key(v)
                    if k is None:
                        continue
                    postings.setdefault(k, []).append(gid)
                    if k[0] == "n":
                        vals, ids = num.setdefault(field, ([], []))
                        vals.append(k[1])
                        ids.append(gid)
        eq_np = {f: {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in d.items()} for f, d in eq.items()}
        num_np = {}
        for f, (vals, ids) in num.items():
            v = np.asarray(vals, dtype=np.float64)
            i = np.asarray(ids, dtype=np.int64)
            order = np.argsort(v, kind="stable")
            num_np[f] = (v[order], i[order])
        return cls(ntotal, eq_np, num_np)

    @property
    def fields(self) -> list[str]:
        return sorted(self._eq)

    def _field(self, field: str) -> dict[tuple[str, Any], np.ndarray]:
        if field not in self._eq:
            known = ", ".join(self.fields[:20]) or "none: the index has no metadata (index.metadata_fields)"
            raise FilterError(field, f"filter field {field!r} is not a metadata field of this index (known: {known}).")
        return self._eq[field]

    def _ids_eq(self, field: str, value: Any) -> np.ndarray:
        k = _key(value)
        if k is None:
            raise FilterError(field, f"filter field {field!r}: {value!r} is not a string, number or boolean; "
                                     "equality and 'in' compare scalar values.")
        return self._field(field).get(k, np.zeros(0, dtype=np.int64))

    def _ids_range(self, field: str, ops: dict[str, Any]) -> np.ndarray:
        self._field(field)
        for op, bound in ops.items():
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not np.isfinite(bound):
                raise FilterError(field, f"filter field {field!r}: range bound {op}={bound!r} must be a finite number.")
        if field not in self._num:
            raise FilterError(field, f"filter field {field!r} holds no numbers; ranges (gt, gte, lt, lte) apply to "
                                     "numeric fields. Use equality or 'in' on it.")
        vals, ids = self._num[field]
        lo, hi = 0, len(vals)
        if "gte" in ops:
            lo = max(lo, int(np.searchsorted(vals, ops["gte"], side="left")))
        if "gt" in ops:
            lo = max(lo, int(np.searchsorted(vals, ops["gt"], side="right")))
        if "lte" in ops:
            hi = min(hi, int(np.searchsorted(vals, ops["lte"], side="right")))
        if "lt" in ops:
            hi = min(hi, int(np.searchsorted(vals, ops["lt"], side="left")))
        return ids[lo:hi] if lo < hi else np.zeros(0, dtype=np.int64)

    def mask(self, flt: Mapping[str, Any]) -> np.ndarray:
        """``(ntotal,)`` bool: True where every condition of ``flt`` holds. Raises :class:`FilterError`."""
        if not isinstance(flt, Mapping) or not flt:
            raise FilterError(None, "filter must be a non-empty object of field conditions, e.g. "
                                    '{"lang": "en", "year": {"gte": 2000}}.')
        out = np.ones(self.ntotal, dtype=bool)
        for field, cond in flt.items():
            if not isinstance(field, str) or not field:
                raise FilterError(None, f"filter field names must be non-empty strings, got {field!r}.")
            m = np.zeros(self.ntotal, dtype=bool)
            if isinstance(cond, Mapping):
                unknown = [op for op in cond if op not in OPS]
                if unknown or not cond:
                    raise FilterError(field, f"filter field {field!r}: unknown operator {unknown[0] if unknown else '{}'!r}; "
                                             f"use one of {list(OPS)}.")
                ranges = {op: cond[op] for op in cond if op in RANGE_OPS}
                sets = []
                if "eq" in cond:
                    sets.append(self._ids_eq(field, cond["eq"]))
                if "in" in cond:
                    vals = cond["in"]
                    if not isinstance(vals, list) or not vals or len(vals) > MAX_IN_VALUES:
                        raise FilterError(field, f"filter field {field!r}: 'in' takes a list of 1..{MAX_IN_VALUES} values.")
                    sets.append(np.unique(np.concatenate([self._ids_eq(field, v) for v in vals])))
                if ranges:
                    sets.append(self._ids_range(field, ranges))
                m[sets[0]] = True
                for s in sets[1:]:
                    other = np.zeros(self.ntotal, dtype=bool)
                    other[s] = True
                    m &= other
            elif isinstance(cond, list):
                raise FilterError(field, f"filter field {field!r}: a list is ambiguous; write {{\"in\": [...]}}.")
            else:
                m[self._ids_eq(field, cond)] = True
            out &= m
        return out


def build_field_index(index: Any) -> FieldIndex:
    """The :class:`FieldIndex` of an opened :class:`~rayembed.index.ShardedIndex` (reads every id-map part)."""
    from rayembed.index.manifest import read_docs_part

    rows: list[tuple[int, str | None]] = []
    for shard in index.manifest["shards"]:
        table = read_docs_part(index.root, shard, ["id", "metadata"])
        rows.extend(zip(table.column("id").to_numpy().tolist(), table.column("metadata").to_pylist()))
    return FieldIndex.from_rows(index.ntotal, rows)

"""Turning raw LLM replies into training rows, or into a reject with a reason.

LLMs wrap JSON in code fences, add a sentence before or after it, stop mid-object when they
run out of tokens, forget keys, or return the query as its own positive. Each of those ends
here as a named reason, so a run summary says exactly what was thrown away and why.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rayembed.synth.languages import NO_SPACE_LANGUAGES
from rayembed.synth.prompts import OUTPUT_KEYS, SYMMETRIC_INSTRUCTIONS

_FENCE = re.compile(r"```(?:json|JSON|python)?\s*\n?(.*?)```", re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(\d+\))\s+(.*\S)\s*$")


class Rejected(Exception):
    """A reply that cannot become a row; ``reason`` is a short stable key for summaries."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _candidates(text: str, opener: str, closer: str) -> list[str]:
    """Balanced ``opener...closer`` spans in ``text``, outermost first, respecting strings."""
    spans = []
    i = 0
    n = len(text)
    while i < n:
        start = text.find(opener, i)
        if start < 0:
            break
        depth, j, in_str, esc = 0, start, False, False
        while j < n:
            c = text[j]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == opener:
                depth += 1
            elif c == closer:
                depth -= 1
                if depth == 0:
                    spans.append(text[start : j + 1])
                    break
            j += 1
        else:
            # Ran off the end inside the value: the reply was cut short.
            spans.append(text[start:] + "\x00TRUNCATED")
            break
        i = j + 1
    return spans


def extract_json(text: str, want: type = dict) -> Any:
    """The first JSON value of type ``want`` (dict or list) in ``text``.

    Looks inside code fences first, then anywhere in the text. Raises :class:`Rejected` with
    reason ``empty_reply``, ``truncated_json`` or ``no_json``.
    """
    if not text or not text.strip():
        raise Rejected("empty_reply")
    opener, closer = ("{", "}") if want is dict else ("[", "]")
    sources = [m.group(1) for m in _FENCE.finditer(text)]
    # An unterminated fence (cut-off reply) still holds the start of the value.
    if text.count("```") % 2 == 1:
        sources.append(text.rsplit("```", 1)[1].split("\n", 1)[-1])
    sources.append(text)
    truncated = False
    for src in sources:
        for cand in _candidates(src, opener, closer):
            if cand.endswith("\x00TRUNCATED"):
                truncated = True
                continue
            try:
                value = json.loads(cand)
            except json.JSONDecodeError:
                try:
                    value = json.loads(_relax(cand))
                except json.JSONDecodeError:
                    continue
            if isinstance(value, want):
                return value
    if truncated:
        raise Rejected("truncated_json", "the reply ends inside a JSON value")
    raise Rejected("no_json", f"no parsable JSON {want.__name__} in the reply")


def _relax(s: str) -> str:
    """Common near-JSON: trailing commas and Python-style single-quoted lists."""
    s = re.sub(r",\s*([}\]])", r"\1", s)
    if "'" in s and '"' not in s:
        s = s.replace("'", '"')
    return s


def parse_task_list(text: str, finish_reason: str | None = None) -> list[str]:
    """Task definitions from a brainstorm reply: a JSON list, {"tasks": [...]}, or a bulleted list."""
    items: list[Any] | None = None
    try:
        items = extract_json(text, list)
    except Rejected as e:
        try:
            obj = extract_json(text, dict)
            lists = [v for v in obj.values() if isinstance(v, list)]
            items = lists[0] if lists else None
        except Rejected:
            pass
        if items is None:
            lines = [m.group(1) for line in text.splitlines() if (m := _LIST_ITEM.match(line))]
            if len(lines) >= 2:
                items = lines
            elif e.reason == "truncated_json" or finish_reason == "length":
                raise Rejected("truncated_json", "brainstorm list cut off") from None
            else:
                raise
    tasks = []
    for it in items:
        if isinstance(it, dict):
            it = next((v for v in it.values() if isinstance(v, str)), None)
        if not isinstance(it, str):
            continue
        t = " ".join(it.split()).strip().strip('"').strip()
        if len(t.split()) >= 4 and len(t) <= 400:
            tasks.append(t)
    if not tasks:
        raise Rejected("brainstorm_empty", "no usable one-sentence task in the list")
    return tasks


def word_count(text: str, language: str = "en") -> int:
    words = len(text.split())
    langs = set(language.split("-"))
    if langs & NO_SPACE_LANGUAGES:
        words = max(words, len(text) // 2)
    return words


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def reply_to_row(
    spec: dict[str, Any],
    text: str,
    *,
    finish_reason: str | None,
    source: str,
    long_long_min_words: int,
    min_document_words: int,
    max_text_chars: int,
) -> dict[str, Any]:
    """Validate one generation reply against its spec; return a unified-schema row.

    Raises :class:`Rejected` naming the first problem found.
    """
    from rayembed.data.schema import make_id

    task_type = spec["task_type"]
    try:
        obj = extract_json(text, dict)
    except Rejected as e:
        if e.reason == "no_json" and finish_reason == "length":
            raise Rejected("truncated_json", "hit max_tokens before the JSON object closed") from None
        raise
    if task_type == "corpus-queries":
        return corpus_query_row(spec, obj)
    qk, pk, nk = OUTPUT_KEYS[task_type]
    vals = {}
    for k in (qk, pk, nk):
        if k not in obj:
            raise Rejected("missing_key", k)
        v = obj[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and task_type == "long-short":
            v = str(v)
        if not isinstance(v, str):
            raise Rejected("not_a_string", k)
        v = v.strip()
        if not v:
            raise Rejected("empty_value", k)
        if len(v) > max_text_chars:
            raise Rejected("too_long", f"{k} has {len(v)} characters (max {max_text_chars})")
        vals[k] = v
    q, p, n = vals[qk], vals[pk], vals[nk]
    if _norm(q) == _norm(p):
        raise Rejected("query_equals_positive")
    if _norm(p) == _norm(n):
        raise Rejected("positive_equals_negative")
    if _norm(q) == _norm(n):
        raise Rejected("query_equals_negative")
    lang = spec.get("language", "en")
    if task_type == "long-long":
        for k in (qk, pk, nk):
            if word_count(vals[k], lang) < long_long_min_words:
                raise Rejected("too_short", f"{k} has fewer than {long_long_min_words} words")
    elif task_type == "short-long":
        for k in (pk, nk):
            if word_count(vals[k], lang) < min_document_words:
                raise Rejected("too_short", f"{k} has fewer than {min_document_words} words")
    elif task_type == "long-short":
        if word_count(q, lang) < min_document_words:
            raise Rejected("too_short", f"{qk} has fewer than {min_document_words} words")
    elif task_type == "sts":
        scores = {}
        for k in ("S2_score", "S3_score"):
            if k in obj:
                v = obj[k]
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise Rejected("score_out_of_range", f"{k}={obj[k]!r} is not a number") from None
                if not 0.0 <= v <= 5.0:
                    raise Rejected("score_out_of_range", f"{k}={v} is outside [0, 5]")
                scores[k] = v
        if len(scores) == 2 and scores["S2_score"] <= scores["S3_score"]:
            raise Rejected("score_order", "S2_score must exceed S3_score")
    instruction = SYMMETRIC_INSTRUCTIONS.get(task_type) or spec["instruction"]
    return {
        "id": make_id(task_type, q, p, n),
        "instruction": instruction,
        "query": q,
        "positive": p,
        "negatives": [n],
        "task_type": task_type,
        "source": source,
        "language": lang,
        "symmetric": task_type in SYMMETRIC_INSTRUCTIONS,
    }


def corpus_query_row(spec: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """A validated row from a ``corpus-queries`` reply (``obj`` already parsed): the query, its
    passage as the positive, no negatives (``data build`` mines them); raises :class:`Rejected`."""
    ph = spec["placeholders"]
    q = obj.get("query")
    if "query" not in obj:
        raise Rejected("missing_key", "query")
    if not isinstance(q, str):
        raise Rejected("not_a_string", "query")
    q = " ".join(q.split())
    n = len(q.split())
    if not q:
        raise Rejected("empty_value", "query")
    if not ph["min_words"] <= n <= ph["max_words"]:
        raise Rejected("query_length", f"{n} words, outside {ph['min_words']}-{ph['max_words']}")
    if q.lower() in ph["passage"].lower() and n >= 8:
        raise Rejected("copied_from_passage", "the query is a span of the passage")
    return {
        "id": f"{ph['corpus']}/{ph['doc_id']}",
        "instruction": spec["instruction"],
        "query": q,
        "positive": ph["passage"],
        "negatives": [],
        "task_type": "corpus-queries",
        "source": f"corpus-queries:{ph['corpus']}",
        "language": spec.get("language", "en"),
        "symmetric": False,
    }

"""JSON extraction and per-type sanity checks."""

from __future__ import annotations

import json

import pytest

from rayembed.synth.validate import Rejected, extract_json, parse_task_list, reply_to_row

OK = {"S1": "A cat sleeps on the mat.", "S2": "A cat is asleep on a rug.", "S3": "Dogs bark at night."}
SPEC = {"id": "s1", "task_type": "sts", "language": "en", "instruction": "Retrieve semantically similar text."}
V = {"source": "synth:test", "long_long_min_words": 20, "min_document_words": 3, "max_text_chars": 2000}


def row(text, spec=SPEC, finish="stop"):
    return reply_to_row(spec, text, finish_reason=finish, **V)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(OK),
        "```json\n" + json.dumps(OK, indent=2) + "\n```",
        "Sure! Here is the example:\n" + json.dumps(OK) + "\nHope this helps {not json}.",
        "```\n" + json.dumps(OK) + "\n```\nThe braces } in prose are fine.",
        json.dumps(OK)[:-1] + ",}",  # trailing comma
    ],
)
def test_json_is_found_in_fences_and_prose(text):
    r = row(text)
    assert (r["query"], r["positive"], r["negatives"]) == (OK["S1"], OK["S2"], [OK["S3"]])
    assert r["symmetric"] is True and r["task_type"] == "sts" and r["source"] == "synth:test"


def test_extract_json_failures_have_reasons():
    with pytest.raises(Rejected, match="empty_reply"):
        extract_json("   ")
    with pytest.raises(Rejected, match="truncated_json"):
        extract_json('Here: {"S1": "a", "S2": "b')
    with pytest.raises(Rejected, match="no_json"):
        extract_json("I cannot help with that.")
    with pytest.raises(Rejected, match="truncated_json"):
        row("Let me think about this carefully and", finish="length")


@pytest.mark.parametrize(
    "obj,reason",
    [
        ({"S1": "a b c", "S2": "d e f"}, "missing_key"),
        ({**OK, "S2": OK["S1"]}, "query_equals_positive"),
        ({**OK, "S3": OK["S2"].upper()}, "positive_equals_negative"),
        ({**OK, "S2": ["not", "a", "string"]}, "not_a_string"),
        ({**OK, "S3": "   "}, "empty_value"),
        ({**OK, "S2_score": 7, "S3_score": 1}, "score_out_of_range"),
        ({**OK, "S2_score": 2, "S3_score": 3}, "score_order"),
        ({**OK, "S1": "x" * 3000}, "too_long"),
    ],
)
def test_sanity_checks(obj, reason):
    with pytest.raises(Rejected) as e:
        row(json.dumps(obj))
    assert e.value.reason == reason


def test_type_specific_lengths_and_mapping():
    ll = {"id": "x", "task_type": "long-long", "language": "en", "instruction": "Find related essays."}
    short = {"input": "one two three", "positive_document": "four five six", "hard_negative_document": "seven"}
    with pytest.raises(Rejected, match="too_short"):
        row(json.dumps(short), spec=ll)
    long = {k: " ".join(f"{k}{i}" for i in range(25)) for k in short}
    r = row(json.dumps(long), spec=ll)
    assert r["instruction"] == "Find related essays." and r["symmetric"] is False
    ls = {"id": "y", "task_type": "long-short", "language": "de", "instruction": "Classify reviews."}
    r = row(json.dumps({"input_text": "Das Essen war sehr gut heute", "label": "positive", "misleading_label": "negative"}), spec=ls)
    assert (r["query"], r["positive"], r["negatives"], r["language"]) == (
        "Das Essen war sehr gut heute", "positive", ["negative"], "de")


def test_task_lists_parse_leniently():
    tasks = ["Given a recipe name, find the full recipe.", "Classify emails by the product they mention."]
    assert parse_task_list(json.dumps(tasks)) == tasks
    assert parse_task_list("```json\n" + json.dumps({"tasks": tasks}) + "\n```") == tasks
    assert parse_task_list("Here you go:\n1. " + tasks[0] + "\n2) " + tasks[1]) == tasks
    with pytest.raises(Rejected, match="brainstorm_empty"):
        parse_task_list('["a", "b c"]')
    with pytest.raises(Rejected, match="truncated_json"):
        parse_task_list('["Given a recipe name, find the full recipe.", "Classify', "length")

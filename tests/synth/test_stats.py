"""SynthStats adds up as the markers and the summary need, and the summary keeps its keys."""

from __future__ import annotations

from types import SimpleNamespace

from rayembed.synth.stats import RunStats, SynthStats, build_summary

MARKER_KEYS = ["specs", "requests", "retries", "retry_reasons", "failed_requests", "prompt_tokens",
               "completion_tokens", "cost_usd", "accepted", "rejected", "rejected_by_reason", "rows_by_task_type",
               "rows_by_language", "tasks", "peak_in_flight", "elapsed_s"]
SUMMARY_KEYS = ["output_dir", "model", "seed", "requests", "retries", "retry_reasons", "failed_requests",
                "failed_by_reason", "accepted", "rejected", "rejected_by_reason", "prompt_tokens", "completion_tokens",
                "cost_usd", "rows_by_task_type", "rows_by_language", "brainstorm", "planned_generation_specs",
                "chunks_resumed", "chunks_new", "stopped_early", "peak_in_flight", "elapsed_s", "this_run", "base_url"]


def test_stats_add_up_and_read_back():
    a = SynthStats(specs=2, requests=3, retry_reasons={"5xx": 1}, rows_by_language={"en": 2}, peak_in_flight=4,
                   cost_usd=0.5)
    b = SynthStats(specs=1, requests=1, retry_reasons={"429": 1, "5xx": 2}, rows_by_language={"de": 1, "en": 1},
                   peak_in_flight=2, cost_usd=0.25)
    s = a + b
    assert (s.specs, s.requests, s.cost_usd, s.peak_in_flight) == (3, 4, 0.75, 4)
    assert list(s.retry_reasons.items()) == [("5xx", 3), ("429", 1)]
    assert list(s.rows_by_language.items()) == [("en", 3), ("de", 1)]
    assert a.retry_reasons == {"5xx": 1}  # the operands are left as they were
    assert list(s.to_dict()) == MARKER_KEYS
    assert SynthStats.from_dict({**s.to_dict(), "unknown": 1}) == s
    # A chunk sent again: counts add up, specs stay the chunk's, failed_requests is what is left.
    again = SynthStats(specs=1, requests=1, failed_requests=0).after(a, still_failed=0)
    assert (again.specs, again.requests, again.failed_requests) == (2, 4, 0)
    first = SynthStats(specs=2, failed_requests=1).after(None, still_failed=1)
    assert (first.specs, first.failed_requests) == (2, 1)


def test_summary_keys_and_totals():
    run = RunStats(output_dir="/x/synth", seed=3, endpoint="http://127.0.0.1:1/v1",
                   brainstorm=SynthStats(requests=2, tasks=6, rejected_by_reason={"no_json": 1}, peak_in_flight=5),
                   generate=SynthStats(requests=7, accepted=4, rejected_by_reason={"duplicate": 2},
                                       rows_by_task_type={"sts": 3, "bitext": 1}, rows_by_language={"en": 1, "de": 3}),
                   unique_tasks={"short-long": 6}, planned_specs=8, cost_usd=0.1234567)
    run.this_run.commit_times["generate"] = [1.0, 3.0]
    run.this_run.chunk_requests["generate"] = [4, 3]
    s = build_summary(run, SimpleNamespace(model="m"))
    assert list(s) == SUMMARY_KEYS
    assert (s["requests"], s["accepted"], s["rejected"], s["peak_in_flight"], s["cost_usd"]) == (9, 4, 3, 5, 0.123457)
    assert list(s["rejected_by_reason"].items()) == [("duplicate", 2), ("brainstorm:no_json", 1)]
    assert list(s["rows_by_task_type"]) == ["bitext", "sts"] and list(s["rows_by_language"]) == ["de", "en"]
    assert s["brainstorm"] == {"requests": 2, "tasks": 6, "unique_tasks": {"short-long": 6}}
    assert s["this_run"]["generate_steady_requests_per_s"] == 1.5

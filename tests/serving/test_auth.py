"""The bearer-key check on its own: key resolution, constant-time compare, the ASGI middleware."""

from __future__ import annotations

import logging

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from rayembed.serving.auth import (
    ApiKeyMiddleware,
    check_bearer,
    require_api_key,
    resolve_api_key,
    warn_if_exposed,
)

KEY = "s3cret-key-for-tests-42"


def _app(key):
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, key_provider=lambda: key)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/search")
    def search():
        return {"ok": True}

    return app


def test_resolve_key_env_then_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYEMBED_TEST_KEY", raising=False)
    assert resolve_api_key("RAYEMBED_TEST_KEY", None) is None
    f = tmp_path / "key"
    f.write_text(f"  {KEY}\n")
    assert resolve_api_key("RAYEMBED_TEST_KEY", f) == KEY
    monkeypatch.setenv("RAYEMBED_TEST_KEY", "from-the-environment")
    assert resolve_api_key("RAYEMBED_TEST_KEY", f) == "from-the-environment"


def test_resolve_key_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYEMBED_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_file .* cannot be read"):
        resolve_api_key("RAYEMBED_TEST_KEY", tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty; write the key"):
        resolve_api_key("RAYEMBED_TEST_KEY", tmp_path / "empty")
    monkeypatch.setenv("RAYEMBED_TEST_KEY", "short")
    with pytest.raises(ValueError, match="shorter than 8 characters") as e:
        resolve_api_key("RAYEMBED_TEST_KEY", None)
    assert "short" not in str(e.value).replace("shorter", "")


def test_key_is_redacted_from_logs(tmp_path, monkeypatch):
    from rayembed.security import redact_text

    monkeypatch.delenv("RAYEMBED_TEST_KEY", raising=False)
    f = tmp_path / "key"
    f.write_text("zz-planted-key-98765")
    resolve_api_key("RAYEMBED_TEST_KEY", f)
    assert "zz-planted-key-98765" not in redact_text("header was zz-planted-key-98765")


def test_check_bearer():
    assert check_bearer(None, None)
    assert check_bearer("Bearer " + KEY, KEY)
    assert check_bearer("bearer " + KEY, KEY)
    assert not check_bearer(None, KEY)
    assert not check_bearer("Bearer wrong", KEY)
    assert not check_bearer(KEY, KEY)
    assert not check_bearer("Basic " + KEY, KEY)
    assert not check_bearer("Bearer " + KEY + "x", KEY)


def test_middleware_open_without_key():
    client = TestClient(_app(None))
    assert client.post("/search").status_code == 200


def test_middleware_requires_key():
    client = TestClient(_app(KEY))
    assert client.get("/healthz").status_code == 200
    r = client.post("/search")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/search", headers={"Authorization": "Bearer not-the-key-123"})
    assert r.status_code == 401 and "not-the-key-123" not in r.text
    assert client.post("/search", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_dependency_variant():
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(require_api_key(lambda: KEY))])
    def x():
        return {"ok": True}

    client = TestClient(app)
    assert client.get("/x").status_code == 401
    assert client.get("/x", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_warning_when_exposed_without_key(caplog):
    with caplog.at_level(logging.WARNING, logger="rayembed.serving.auth"):
        assert not warn_if_exposed("127.0.0.1", None)
        assert not warn_if_exposed("0.0.0.0", KEY)
        assert warn_if_exposed("0.0.0.0", None)
    assert "WITHOUT an API key" in caplog.text

"""Optional bearer-key authentication for the HTTP endpoints.

The key comes from an environment variable or from a secret file, never from a config value,
so recipes can be committed without it. When a key is set, every route except the exempt ones
(``/healthz``) needs ``Authorization: Bearer <key>``: the header the ``openai`` client sends.
Comparison is constant-time (``hmac.compare_digest``); a missing or wrong key gets a 401 with an
OpenAI-style JSON error that never echoes what was sent.

Any ASGI app can use it::

    from rayembed.serving.auth import ApiKeyMiddleware, resolve_api_key

    key = resolve_api_key("RAYEMBED_API_KEY", key_file=None)
    app.add_middleware(ApiKeyMiddleware, key_provider=lambda: key)

or, per route, in FastAPI: ``Depends(require_api_key(lambda: key))``.
"""

# No postponed annotations: FastAPI reads the dependency signature below at runtime.
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from rayembed.security import register_secret

logger = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "RAYEMBED_API_KEY"
DEFAULT_EXEMPT = ("/healthz",)
_UNAUTHORIZED = {
    "error": {
        "message": "Missing or invalid API key. Send the header 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error",
        "param": "authorization",
        "code": "invalid_api_key",
    }
}
_UNAUTHORIZED_BODY = json.dumps(_UNAUTHORIZED).encode()


def resolve_api_key(env_var: str = DEFAULT_KEY_ENV, key_file: str | os.PathLike | None = None) -> str | None:
    """The configured key: ``$env_var`` if non-empty, else the stripped contents of ``key_file``.

    Returns None when neither is set (the endpoint is then open). A ``key_file`` that is named
    but unreadable or empty raises, because silently serving without the intended key is worse
    than not starting. The key is registered with :mod:`rayembed.security` so logs redact it.
    """
    key = os.environ.get(env_var, "").strip() if env_var else ""
    if not key and key_file:
        path = Path(key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ValueError(
                f"serve.api_key_file '{path}' cannot be read ({e.strerror}). Point it at a file "
                "holding only the key, or unset it."
            ) from None
        if not key:
            raise ValueError(f"serve.api_key_file '{path}' is empty; write the key into it.")
    if not key:
        return None
    if len(key) < 8:
        raise ValueError(
            f"The API key from {'$' + env_var if os.environ.get(env_var) else 'serve.api_key_file'} "
            "is shorter than 8 characters; use a long random key (e.g. `openssl rand -hex 32`)."
        )
    register_secret(key)
    return key


def check_bearer(authorization: str | None, key: str | None) -> bool:
    """True when no key is required, or ``authorization`` is exactly ``Bearer <key>``.

    Both sides are compared as bytes with ``hmac.compare_digest``, so timing does not reveal
    how much of a guess was right.
    """
    if key is None:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8"))


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 JSON for HTTP requests without the right bearer key.

    ``key_provider`` is called per request, so an app can resolve its key after it is built
    (in a Serve replica's constructor, say); when it returns None every request passes.
    """

    def __init__(
        self,
        app,
        key_provider: Callable[[], str | None],
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT,
    ) -> None:
        self.app = app
        self.key_provider = key_provider
        self.exempt = tuple(exempt_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self.key_provider()
        if key is None or _path_in(scope, self.exempt):
            return await self.app(scope, receive, send)
        auth = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if check_bearer(auth, key):
            return await self.app(scope, receive, send)
        await send_json(send, 401, _UNAUTHORIZED_BODY, extra_headers=[(b"www-authenticate", b"Bearer")])


def require_api_key(key_provider: Callable[[], str | None]):
    """A FastAPI dependency doing the same check per route (for apps that prefer ``Depends``)."""
    from fastapi import HTTPException, Request

    async def dependency(request: Request) -> None:
        if not check_bearer(request.headers.get("authorization"), key_provider()):
            raise HTTPException(status_code=401, detail=_UNAUTHORIZED["error"], headers={"WWW-Authenticate": "Bearer"})

    return dependency


def _path_in(scope, paths: tuple[str, ...]) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path in paths or path.rstrip("/") in paths


async def send_json(send, status: int, body: bytes, extra_headers: list | None = None) -> None:
    """Send a complete JSON response from raw ASGI."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def warn_if_exposed(host: str, key: str | None, env_var: str = DEFAULT_KEY_ENV) -> bool:
    """Log a clear warning when binding a non-loopback address with no key; True if warned."""
    from rayembed.config.serve import host_is_loopback

    if key is None and not host_is_loopback(host):
        logger.warning(
            "Serving on %s WITHOUT an API key: anyone who can reach this address can query the "
            "endpoint. Set $%s (or serve.api_key_file) to require a key, or bind 127.0.0.1.",
            host, env_var,
        )
        return True
    return False

"""HTTP plumbing of the retrieval endpoint: the FastAPI app, its ASGI middlewares, its errors.

Owns what happens around a route: the bearer-key check, the body-size limit (counted as the
body streams in, so a chunked body is held to it too and never buffered past it), admission
control (a bounded number of requests at work and waiting; beyond that a fast 503 with
``Retry-After``, and a 503 for a request that runs past ``serve.request_timeout_s``), and JSON
rendering that cannot fail (lone surrogates are escaped, non-finite floats never reach the
encoder). Every error is OpenAI-shaped and never carries a path or a traceback.
"""

# No ``from __future__ import annotations``: FastAPI reads the handler annotations at runtime.
import asyncio
import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayembed import __version__
from rayembed.serving.auth import ApiKeyMiddleware, send_json
from rayembed.serving.schemas import InvalidRequest, error_body, validation_error_to_body

logger = logging.getLogger(__name__)

# Routes that do model or index work; /healthz, /stats and /v1/models bypass admission control
# so that probes answer while the replica is saturated.
HEAVY_PATHS = ("/search", "/v1/embeddings", "/rerank")

_PATH = re.compile(r"(?<![\w.])(?:file://)?/(?:[\w.@+-]+/)+[\w.@+-]*")


def scrub_paths(message: str) -> str:
    """``message`` with absolute file paths replaced, for errors a client will read."""
    return _PATH.sub("<path>", message)


class Unavailable(InvalidRequest):
    """503: the replica is overloaded or a part it needs is down; the client should retry later."""

    def __init__(self, message: str, code: str = "overloaded", retry_after_s: int = 1) -> None:
        super().__init__(None, message, status=503, code=code)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (Unavailable, (self.message, self.code, self.retry_after_s))


# ----------------------------------------------------------------------------- JSON that always renders


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(content: Any) -> bytes:
    """Strict JSON bytes of ``content``: no NaN/Infinity tokens, lone surrogates escaped."""
    try:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite float: JSON has no token for it
        logger.warning("A response held a non-finite number; it is sent as null.")
        text = json.dumps(_finite(content), ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a client's JSON escape): \uXXXX it
        return json.dumps(json.loads(text), ensure_ascii=True, separators=(",", ":")).encode("ascii")


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(exc: InvalidRequest) -> SafeJSONResponse:
    headers = {"Retry-After": str(getattr(exc, "retry_after_s", 1))} if exc.status == 503 else None
    type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
    return SafeJSONResponse(
        error_body(exc.message, exc.param, exc.code, type_), status_code=exc.status, headers=headers
    )


# ----------------------------------------------------------------------------- replica-local settings


class ReplicaState:
    """Settings the middlewares read per request; each Serve replica is its own process."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 32
    max_waiting: int = 96
    queue_timeout_s: float = 5.0
    request_timeout_s: float = 30.0

    def __init__(self) -> None:
        self.active = 0
        self.waiting = 0
        self.rejected = 0
        self.timed_out = 0
        self._slots: asyncio.Semaphore | None = None

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # made on the replica's own event loop, on first use
            self._slots = asyncio.Semaphore(self.max_concurrent)
        return self._slots

    def snapshot(self) -> dict[str, Any]:
        return {
            "active": self.active, "waiting": self.waiting, "rejected": self.rejected, "timed_out": self.timed_out,
            "max_concurrent": self.max_concurrent, "max_waiting": self.max_waiting,
        }


STATE = ReplicaState()


def _too_large(limit: int) -> bytes:
    return dumps(error_body(
        f"The request body is larger than {limit} bytes (serve.max_body_bytes); send fewer or shorter texts "
        "per request.",
        "body",
        "body_too_large",
    ))


def _overloaded(message: str) -> bytes:
    return dumps(error_body(message, None, "overloaded", "server_error"))


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or, for chunked bodies, by counting.

    A body without Content-Length is read here, chunk by chunk, up to the limit: the first
    chunk past it answers 413 and the rest is never read, so memory holds at most the limit.
    """

    def __init__(self, app, state: ReplicaState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.max_body_bytes
        length = None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await send_json(send, 400, dumps(error_body(
                        "The Content-Length header is not a number.", "body", "invalid_body")))
                break
        if length is not None:
            if length > limit:
                return await send_json(send, 413, _too_large(limit), extra_headers=[(b"connection", b"close")])
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                chunks.clear()
                return await send_json(send, 413, _too_large(limit), extra_headers=[(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class AdmissionMiddleware:
    """Bounded work per replica: ``max_concurrent`` requests run, ``max_waiting`` wait for a slot.

    Beyond that, or after ``queue_timeout_s`` in the queue, a request gets 503 with Retry-After
    at once instead of waiting without bound; a request still running after
    ``request_timeout_s`` is cancelled and answered 503 too. Only :data:`HEAVY_PATHS` count.
    """

    def __init__(self, app, state: ReplicaState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        st = self.state
        if scope["type"] != "http" or scope.get("path", "").rstrip("/") not in HEAVY_PATHS:
            return await self.app(scope, receive, send)
        slots = st.slots()
        retry = [(b"retry-after", b"1")]
        if slots.locked() and st.waiting >= st.max_waiting:
            st.rejected += 1
            return await send_json(send, 503, _overloaded(
                f"The server is at capacity ({st.max_concurrent} requests running, {st.max_waiting} waiting); "
                "retry after a second."), extra_headers=retry)
        st.waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), timeout=st.queue_timeout_s)
        except TimeoutError:
            st.rejected += 1
            return await send_json(send, 503, _overloaded(
                f"The request waited {st.queue_timeout_s:g} s for a free slot; the server is overloaded. "
                "Retry after a second."), extra_headers=retry)
        finally:
            st.waiting -= 1
        st.active += 1
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracked_send), timeout=st.request_timeout_s)
        except TimeoutError:
            st.timed_out += 1
            if not started:
                await send_json(send, 503, _overloaded(
                    f"The request took longer than {st.request_timeout_s:g} s (serve.request_timeout_s) and was "
                    "stopped; the server is overloaded. Retry later, or send fewer texts per request."),
                    extra_headers=retry)
        finally:
            st.active -= 1
            slots.release()


# ----------------------------------------------------------------------------- the FastAPI app


def make_api(state: ReplicaState = STATE) -> FastAPI:
    api = FastAPI(
        title="rayembed retrieval",
        version=__version__,
        description="Dense and hybrid retrieval over a sharded index, reranking, and OpenAI-compatible embeddings.",
        default_response_class=SafeJSONResponse,
    )
    # Starlette runs the last-added middleware first: auth, then the body limit, then admission.
    api.add_middleware(AdmissionMiddleware, state=state)
    api.add_middleware(BodyLimitMiddleware, state=state)
    api.add_middleware(ApiKeyMiddleware, key_provider=lambda: state.api_key)

    @api.exception_handler(InvalidRequest)
    async def _invalid_request(request: Request, exc: InvalidRequest):
        return error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        _, body = validation_error_to_body(list(exc.errors()))
        return SafeJSONResponse(body, status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            detail = f"No route {request.method} {request.url.path}; see /docs for the API."
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the API."
        return SafeJSONResponse(
            error_body(detail, None, f"http_{exc.status_code}"), status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        from rayembed.security import redact_text

        logger.error("Unhandled error on %s: %s", request.url.path, redact_text(repr(exc)), exc_info=exc)
        return SafeJSONResponse(
            error_body("Internal server error; the server log has the details.", None, "internal_error",
                       "server_error"),
            status_code=500,
        )

    return api

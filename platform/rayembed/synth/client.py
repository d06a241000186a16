"""An asynchronous chat-completions client with the traffic control long runs need.

Built on the official ``openai`` SDK (``AsyncOpenAI``) with the SDK's own retries turned off,
because the policy here is explicit and counted: retries with capped exponential backoff and
jitter on 429, 5xx, timeouts and connection errors; ``Retry-After`` honoured; any other 4xx
fails at once. A semaphore caps requests in flight; token buckets cap requests and tokens per
minute. Every attempt, retry and token is counted so a run summary can report them.

What the reply must look like is sent as ``response_format``, per ``structured_output``:
``json_schema`` sends the request's own JSON schema (OpenAI's ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}``, which vLLM and ``rayembed serve-llm`` enforce by
constrained decoding), ``json_object`` asks for any JSON object, ``off`` sends nothing.

The API key is held in a :class:`Secret`, whose repr never shows it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rayembed.security import redact_text, register_secret

logger = logging.getLogger(__name__)


class Secret:
    """A string that does not print itself (Ray error messages and logs show args' reprs)."""

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __reduce__(self):
        return (Secret, (self._value,))


class TokenBucket:
    """A token bucket holding one second's worth of a per-minute rate.

    Over any window of ``t`` seconds at most ``rate/60 * (t + 1)`` units pass. A request larger
    than the bucket waits for a full bucket and then goes, leaving the bucket in debt.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0  # units per second
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until ``amount`` units are available; return the seconds waited."""
        need = min(amount, self.capacity)
        waited = 0.0
        async with self.lock:
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return waited
                delay = (need - self.level) / self.rate
                waited += delay
                await asyncio.sleep(delay)

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) units after the fact."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)


@dataclass
class ClientSettings:
    """What one client needs; built from ``SynthConfig`` by :func:`settings_from_config`."""

    model: str
    base_url: str | None
    temperature: float = 1.0
    top_p: float = 1.0
    structured_output: str = "off"  # json_schema | json_object | off
    max_in_flight: int = 64
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    request_timeout_s: float = 120.0
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    price_in: float | None = None  # USD per 1M prompt tokens
    price_out: float | None = None  # USD per 1M completion tokens


@dataclass
class Completion:
    """The outcome of one logical request, after retries."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error: str | None = None  # reason key when every attempt failed
    error_detail: str = ""
    latency_s: float = 0.0
    retry_reasons: list[str] = field(default_factory=list)
    cost_usd: float = 0.0


@dataclass
class UsageStats:
    """Counters of one client (one actor), merged across actors by the pipeline."""

    requests: int = 0  # HTTP attempts sent
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    peak_in_flight: int = 0
    rate_wait_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retries": self.retries,
            "retry_reasons": dict(self.retry_reasons),
            "failure_reasons": dict(self.failure_reasons),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 8),
            "peak_in_flight": self.peak_in_flight,
            "rate_wait_s": round(self.rate_wait_s, 3),
        }


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return float(ra)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for rate limiting before the reply is known."""
    return max(1, len(text) // 4)


class ChatClient:
    """Chat completions with retries, rate limits and usage accounting. Use inside one event loop."""

    def __init__(self, settings: ClientSettings, api_key: Secret | str | None, *, rng_seed: int | None = None):
        import openai

        try:  # openai >= 3 is built on httpx2; older releases on httpx
            import httpx2 as httpx
        except ImportError:
            import httpx

        # One INFO line per request would drown a 10k-request run.
        for name in ("httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.s = settings
        key = api_key.get() if isinstance(api_key, Secret) else api_key
        register_secret(key)
        limits = httpx.Limits(max_connections=settings.max_in_flight + 8, max_keepalive_connections=settings.max_in_flight + 8)
        self._client = openai.AsyncOpenAI(
            api_key=key or "unused",
            base_url=settings.base_url,
            max_retries=0,
            timeout=settings.request_timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=settings.request_timeout_s),
        )
        self._sem = asyncio.Semaphore(settings.max_in_flight)
        self._rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self._tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._rng = random.Random(rng_seed)
        self._in_flight = 0
        self.stats = UsageStats()

    async def close(self) -> None:
        await self._client.close()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.s.price_in is None and self.s.price_out is None:
            return 0.0
        return (prompt_tokens * (self.s.price_in or 0.0) + completion_tokens * (self.s.price_out or 0.0)) / 1e6

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff, capped; never shorter than the server's Retry-After."""
        expo = min(self.s.backoff_max_s, self.s.backoff_base_s * (2 ** (attempt - 1)))
        delay = expo * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.s.max_retry_after_s))
        return delay

    def response_format(self, schema: dict[str, Any] | None, name: str = "reply") -> dict[str, Any] | None:
        """The ``response_format`` to send for a request whose reply should match ``schema``."""
        mode = self.s.structured_output
        if mode == "json_schema" and schema is not None:
            return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        if mode in ("json_schema", "json_object"):
            return {"type": "json_object"}
        return None

    async def complete(self, prompt: str, max_tokens: int, schema: dict[str, Any] | None = None,
                       schema_name: str = "reply") -> Completion:
        """One logical request: retried as the policy says; never raises for HTTP trouble.

        ``schema`` is the reply's JSON schema, sent when ``structured_output`` is json_schema.
        """
        import openai

        messages = [{"role": "user", "content": prompt}]
        extra: dict[str, Any] = {}
        fmt = self.response_format(schema, schema_name)
        if fmt is not None:
            extra["response_format"] = fmt
        t0 = time.monotonic()
        attempt = 0
        retried: list[str] = []
        while True:
            attempt += 1
            estimate = estimate_tokens(prompt) + max_tokens
            reason: str | None = None
            retry_after: float | None = None
            detail = ""
            async with self._sem:
                # Rate tokens are taken once a slot is held, right before sending: taken
                # earlier, requests queued on the slot would bunch up at the server.
                if self._rpm is not None:
                    self.stats.rate_wait_s += await self._rpm.acquire(1.0)
                if self._tpm is not None:
                    self.stats.rate_wait_s += await self._tpm.acquire(estimate)
                self._in_flight += 1
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
                self.stats.requests += 1
                try:
                    # Raw response: the reply JSON is read directly, skipping the SDK's
                    # pydantic models (a third of the client's CPU per request).
                    raw = await self._client.chat.completions.with_raw_response.create(
                        model=self.s.model,
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=self.s.temperature,
                        top_p=self.s.top_p,
                        **extra,
                    )
                    resp = raw.http_response.json()
                except openai.APITimeoutError as e:
                    reason, detail = "timeout", str(e)
                except openai.APIConnectionError as e:
                    reason, detail = "connection", str(e)
                except openai.APIStatusError as e:
                    code = e.status_code
                    detail = f"HTTP {code}: {e.message}"
                    if code == 429:
                        reason = "429"
                        retry_after = _retry_after(e.response.headers)
                    elif code >= 500:
                        reason = "5xx"
                        retry_after = _retry_after(e.response.headers)
                    else:
                        self._fail(f"http_{code}")
                        if self._tpm is not None:
                            self._tpm.adjust(-estimate)
                        return Completion(None, attempts=attempt, error=f"http_{code}",
                                          error_detail=redact_text(detail), latency_s=time.monotonic() - t0,
                                          retry_reasons=retried)
                except (openai.OpenAIError, ValueError) as e:
                    self._fail("bad_response")
                    return Completion(None, attempts=attempt, error="bad_response",
                                      error_detail=redact_text(str(e)), latency_s=time.monotonic() - t0,
                                      retry_reasons=retried)
                finally:
                    self._in_flight -= 1
            if reason is None:
                return self._success(resp, attempt, estimate, t0, retried)
            if self._tpm is not None:
                self._tpm.adjust(-estimate)
            if attempt >= self.s.max_attempts:
                self._fail(reason)
                return Completion(None, attempts=attempt, error=f"gave_up_{reason}",
                                  error_detail=redact_text(detail), latency_s=time.monotonic() - t0,
                                  retry_reasons=retried)
            self.stats.retries += 1
            self.stats.retry_reasons[reason] += 1
            retried.append(reason)
            delay = self._backoff(attempt, retry_after)
            logger.debug("retrying after %s in %.2fs (attempt %d)", reason, delay, attempt)
            await asyncio.sleep(delay)

    def _fail(self, reason: str) -> None:
        self.stats.failed += 1
        self.stats.failure_reasons[reason] += 1

    def _success(self, resp: Any, attempt: int, estimate: int, t0: float, retried: list[str]) -> Completion:
        choices = resp.get("choices") or [{}] if isinstance(resp, dict) else [{}]
        choice = choices[0] or {}
        text = (choice.get("message") or {}).get("content") or ""
        usage = (resp.get("usage") if isinstance(resp, dict) else None) or {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        if self._tpm is not None:
            self._tpm.adjust(pt + ct - estimate)
        self.stats.succeeded += 1
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        cost = self.cost(pt, ct)
        self.stats.cost_usd += cost
        return Completion(
            text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=pt,
            completion_tokens=ct,
            attempts=attempt,
            latency_s=time.monotonic() - t0,
            retry_reasons=retried,
            cost_usd=cost,
        )

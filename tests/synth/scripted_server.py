"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol.

Replies are scripted: by default a deterministic, valid answer derived from a hash of the
prompt (so two runs of the same prompts get the same replies, whatever the order); a test
can install ``script(prompt, attempt) -> Reply | None`` to inject faults. Every request is
logged with its arrival time, so tests can check rate limits and what was (not) re-sent.

Used by tests/synth/conftest.py and by bench/synth.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORDS = (
    "river stone market signal lantern orbit harvest canvas ledger meadow circuit vessel "
    "quartz thunder garden compass archive velvet summit beacon prairie cipher harbor ember "
    "glacier mosaic nectar pulse quarry ripple saddle timber umbrella vortex willow yonder"
).split()


@dataclass
class Reply:
    """One scripted answer: a 200 with ``content``, or an HTTP error ``status``."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"
    error_message: str = "scripted error"


def _words(seed: str, n: int) -> str:
    h = hashlib.sha256(seed.encode()).digest()
    out = []
    for i in range(n):
        if i % 32 == 0 and i:
            h = hashlib.sha256(h).digest()
        out.append(WORDS[h[i % 32] % len(WORDS)])
    return " ".join(out)


def default_reply(prompt: str) -> str:
    """A valid answer to one of our prompts, deterministic in the prompt text."""
    if prompt.startswith("Think up"):
        n = int(re.search(r"Think up (\d+)", prompt).group(1))
        return json.dumps([f"Given a {_words(prompt + str(i), 3)} request, find the matching {_words(str(i) + prompt, 2)} text." for i in range(n)])
    keys = re.findall(r'^- "([A-Za-z0-9_]+)"', prompt, flags=re.M)
    m = re.search(r"at least (\d+) words", prompt)
    long_n = int(m.group(1)) if m else 40
    obj: dict[str, Any] = {}
    for k in keys:
        if k in ("user_query", "input", "S1", "label", "misleading_label"):
            n = long_n if (m and k == "input") else 4
            obj[k] = _words(prompt + k, n)
        else:
            obj[k] = _words(prompt + k, long_n)
    if "S2_score" in prompt:
        obj["S2_score"], obj["S3_score"] = 4.5, 2.5
    return json.dumps(obj)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # a burst of 64+ new connections must not be refused


class ScriptedLLM:
    """Start with :meth:`start` (returns the base URL), stop with :meth:`stop`."""

    def __init__(self, latency_s: float = 0.0, script: Callable[[str, int], Reply | None] | None = None,
                 model: str = "scripted"):
        self.latency_s = latency_s
        self.script = script
        self.model = model
        self.log: list[dict[str, Any]] = []
        self.attempts: Counter = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle
    def start(self) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/v1/models"):
                    owner._send(self, 200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
                else:
                    owner._send(self, 404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                owner._handle(self, body)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.attempts.clear()
            self.peak_in_flight = 0

    # -- request handling
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(obj).encode()
        try:
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _handle(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt = body["messages"][-1]["content"]
        with self._lock:
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.log.append({"t": time.monotonic(), "prompt": prompt, "attempt": attempt, "body": body,
                             "auth": h.headers.get("authorization", "")})
        try:
            reply = self.script(prompt, attempt) if self.script else None
            if reply is None:
                reply = Reply(default_reply(prompt))
            delay = reply.delay_s + self.latency_s
            if delay:
                time.sleep(delay)
            if reply.status != 200:
                self._send(h, reply.status, {"error": {"message": reply.error_message, "type": "scripted"}},
                           reply.headers)
                return
            pt, ct = len(prompt) // 4, max(1, len(reply.content or "") // 4)
            self._send(h, 200, {
                "id": f"chatcmpl-{attempt}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                             "message": {"role": "assistant", "content": reply.content}}],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }, reply.headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    # -- helpers for assertions
    def prompts(self) -> list[str]:
        with self._lock:
            return [r["prompt"] for r in self.log]

    def times(self) -> list[float]:
        with self._lock:
            return [r["t"] for r in self.log]

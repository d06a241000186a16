"""Keeping secrets out of logs, configs, reports and error messages."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "***REDACTED***"

# Config keys whose values are secrets wherever they appear.
SECRET_KEY_PATTERN = re.compile(
    r"^((.*_)?(api_?key|secret|password|passwd)|(auth_|access_|api_|hf_|bearer_)?token|authorization)$",
    re.IGNORECASE,
)
# Environment variables whose values must never be written anywhere.
SECRET_ENV_VARS = ("OPENAI_API_KEY", "RAYEMBED_API_KEY", "RAYEMBED_LLM_API_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN")
# Shapes of common keys, caught even when they land in free text.
_TOKEN_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,})\b")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.IGNORECASE)

_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so :func:`redact_text` removes it from any text."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def _known_secrets() -> list[str]:
    vals = set(_extra_secrets)
    for name in SECRET_ENV_VARS:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            vals.add(v)
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Replace every known secret and key-shaped token in ``text``."""
    if not text:
        return text
    for s in _known_secrets():
        text = text.replace(s, REDACTED)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def redact_config(obj: Any) -> Any:
    """A copy of a nested dict/list with secret-named keys blanked and secrets removed."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_KEY_PATTERN.search(k) and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(obj, list):
        return [redact_config(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception as e:  # noqa: BLE001 - a bad format string must not carry its arguments out unredacted
            # The handler would fail the same way and print the raw arguments to stderr; replace
            # the record with a redacted message that says what went wrong instead.
            record.msg = redact_text(
                f"{record.msg} [unformattable log call ({type(e).__name__}: {e}); arguments: {record.args!r}]"
            )
            record.args = None
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True

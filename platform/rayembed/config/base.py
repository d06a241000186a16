"""The two pieces every config section imports: the error type and ``option``."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field carrying help text (listed by ``rayembed config --keys``).

    Say the unit in the help text where there is one (tokens, MB, seconds).
    """
    meta = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)

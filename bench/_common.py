"""What every benchmark sets before it imports Ray, transformers or rayembed: nothing from a hub,
no Ray usage stats or token auth, and rayembed's and torch's caches inside the checkout.

Benchmarks run from the repository root as ``python bench/NAME.py`` (so this folder is on the
import path) and take ``REPO`` from here. Each setting is a default: the caller's environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAYEMBED_CACHE": str(REPO / ".cache" / "rayembed"),
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}
for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)

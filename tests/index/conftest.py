"""Fixtures for the index tests: random unit vectors."""

from __future__ import annotations

import numpy as np
import pytest
from index_helpers import unit


@pytest.fixture(scope="session")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    """3,000 corpus vectors and 50 queries, 32-d, unit length."""
    rng = np.random.default_rng(0)
    return unit(rng, 3000, 32), unit(rng, 50, 32)

"""Ray Train fits need the session Ray's CPUs: drop Serve apps earlier tests may have left."""

import pytest


@pytest.fixture(autouse=True)
def _no_leftover_serve_apps():
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - nothing to shut down
            pass
    yield

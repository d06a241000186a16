"""The package installs, imports cleanly, and does not shadow the standard library."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_shadowed():
    import platform

    import rayembed  # noqa: F401

    assert platform.system()  # would fail if platform/ were a package
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_is_light():
    # `rayembed --help` must not pay for torch.
    code = "import sys, rayembed, rayembed.cli; rayembed.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_is_the_pinned_cpu_build():
    import torch

    assert torch.__version__.startswith("2.13.0")
    # The CPU wheel: built without CUDA (a CUDA build would pass the version check alone).
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build ({torch.version.cuda})"


def test_cli_help_at_every_level():
    import argparse

    from rayembed.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = subprocess.run([sys.executable, "-m", "rayembed.cli", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "embed" in top.stdout
    for name in sub.choices:
        sub_run = subprocess.run([sys.executable, "-m", "rayembed.cli", name, "--help"], capture_output=True, text=True)
        assert sub_run.returncode == 0, sub_run.stderr
        assert "usage:" in sub_run.stdout

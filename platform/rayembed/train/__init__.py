"""Distributed contrastive training on Ray Train (DDP or DeepSpeed ZeRO), with resume.

Entry points::

    from rayembed.train import run_training
    model_dir = run_training(cfg, train_paths=["runs/demo/data"])   # -> saved embedder folder

Modules: ``engine`` (DDP / DeepSpeed behind one interface, DeepSpeed JSON generation),
``gradcache`` (chunked large-batch InfoNCE), ``tasks`` (contrastive, SimCSE, MNTP),
``loop`` (the per-worker loop), ``trainer`` (the driver: TorchTrainer, outputs, loss curve),
``evaluation`` (optional nDCG@10 during training).
"""

from __future__ import annotations

from typing import Any


def run_training(cfg: Any, train_paths: Any = None, **kwargs: Any):
    """Train as ``cfg`` says; returns the Path of the saved embedder (see trainer.run_training)."""
    from rayembed.train.trainer import run_training as _run

    return _run(cfg, train_paths, **kwargs)


__all__ = ["run_training"]

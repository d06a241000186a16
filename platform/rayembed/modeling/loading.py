"""Loading and preparing the models the embedder and the reranker are built on.

Owns: the device and dtype choice, gradient checkpointing on a (possibly LoRA-wrapped) model.
"""

from __future__ import annotations

import torch


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing on ``model`` (the base model under a peft wrapper), KV cache off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false."
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False

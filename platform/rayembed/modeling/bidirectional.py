"""Bidirectional attention for decoder-only models (LLM2Vec, step 1).

A decoder's attention is causal: token i sees tokens <= i. LLM2Vec drops the causal mask (but
keeps padding masking) so every token sees the whole input. transformers' masking utilities
build a bidirectional mask when ``config.is_causal`` is False; the sdpa kernel additionally
reads ``is_causal`` from each attention module when no mask is materialised, so we set both,
and callers pass ``is_causal=False`` per call as well. Setting only the modules' flag is not
enough: eager attention, and sdpa with padding, stay causal.

Only architectures whose masking goes through ``create_causal_mask`` are accepted; anything
else is refused rather than silently left causal.
"""

from __future__ import annotations

import torch

SUPPORTED = ("llama", "mistral", "qwen2")


def check_supported(model_type: str) -> None:
    if model_type not in SUPPORTED:
        raise ValueError(
            f"Bidirectional attention is supported for {', '.join(SUPPORTED)} models, not "
            f"'{model_type}'. Set model.attention=causal, or use one of those architectures."
        )


def enable_bidirectional(model: torch.nn.Module, model_type: str) -> torch.nn.Module:
    """Make ``model`` (a HF decoder, or a peft wrapper around one) attend bidirectionally."""
    check_supported(model_type)
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and not isinstance(cfg, dict):
            cfg.is_causal = False
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False
    return model

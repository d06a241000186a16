"""The FLOP estimate behind the training metrics' model_flops_per_s (train/flops.py)."""

from __future__ import annotations

import torch

from rayembed.config.model import LoRAConfig
from rayembed.modeling.embedder import Embedder
from rayembed.train.flops import step_flops


def _linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_full_training_is_six_n_and_lora_on_the_top_layers_much_less():
    full = Embedder.from_pretrained("tiny-llama")
    n = _linear_weights(full)
    f = step_flops(full)
    assert (f.all_params, f.backward_params, f.trained_params) == (n, n, n)
    assert f.per_token == 6 * n
    assert step_flops(full, checkpointing=True).per_token == 8 * n

    lora = Embedder.from_pretrained("tiny-llama", lora=LoRAConfig(enabled=True, r=4, top_layers=1))
    g = step_flops(lora)
    layers = lora.model.config.num_hidden_layers
    assert g.all_params > n  # the base weights plus the adapters
    # Backward runs through the top layer only; its weight gradients are the adapters'.
    assert 0 < g.backward_params < g.all_params / (layers - 1)
    assert 0 < g.trained_params < g.backward_params
    assert g.per_token == 2 * (g.all_params + g.backward_params + g.trained_params) < 6 * g.all_params

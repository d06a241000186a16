"""Model FLOPs of a training step, for FLOP/s and MFU next to examples/s.

The estimate counts the matrix multiplies of the linear layers, the usual ``6N`` rule taken
apart so that it holds for partial training (LoRA, ``model.lora.top_layers``):

- forward: ``2 * P_all`` per token, every linear layer;
- backward, input gradients: ``2 * P_back`` per token, the linear layers the gradient passes
  through (from the first layer holding a trainable parameter upward; frozen layers below it
  get no backward at all);
- backward, weight gradients: ``2 * P_trained`` per token, the trainable weights only (LoRA
  matrices);
- gradient checkpointing recomputes the forward of the ``P_back`` layers: ``+ 2 * P_back``.

Attention scores (``4 * L * d`` per token and layer, about 3% at the 96-token documents of the
CPU demo) and element-wise work are left out, as in most MFU figures. Tokens are the
non-padding tokens of a batch, so padding lowers the reported FLOP/s rather than raising it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepFlops:
    """Linear-layer parameter counts of a model, and the FLOPs per token they imply."""

    all_params: int  # every linear layer's weight (the forward)
    backward_params: int  # the linear layers the gradient flows through
    trained_params: int  # trainable linear weights (weight gradients)
    checkpointing: bool = False

    @property
    def per_token(self) -> int:
        recompute = 2 * self.backward_params if self.checkpointing else 0
        return 2 * self.all_params + 2 * self.backward_params + 2 * self.trained_params + recompute


def step_flops(model: torch.nn.Module, *, checkpointing: bool = False) -> StepFlops:
    """Count ``model``'s linear layers in module order (a decoder's modules come in forward order)."""
    all_p = back_p = trained_p = 0
    seen_trainable = False
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        # Under ZeRO-3 a rank holds an empty placeholder; DeepSpeed keeps the full size in ds_numel.
        n = getattr(module.weight, "ds_numel", None) or module.weight.numel()
        seen_trainable = seen_trainable or any(p.requires_grad for p in module.parameters(recurse=False))
        all_p += n
        if seen_trainable:
            back_p += n
        if module.weight.requires_grad:
            trained_p += n
    return StepFlops(all_p, back_p, trained_p, checkpointing)

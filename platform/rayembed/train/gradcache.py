"""GradCache: a contrastive loss over a batch far larger than fits through the model at once.

Gao et al. (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
The loss couples every embedding in the batch (in-batch negatives), so plain gradient
accumulation would shrink the negative pool. GradCache instead:

1. embeds the batch in chunks with no autograd graph (memory: one chunk of activations);
2. computes the loss over the whole batch from those embeddings, detached, with requires_grad,
   and takes its gradient with respect to each embedding (cheap: the graph is only the loss);
3. replays each chunk with the graph, and back-propagates ``sum(embedding * cached_grad)``,
   whose gradient with respect to the weights is exactly the chunk's share of the full one.

The replay must see the same dropout masks as step 1, so each chunk's RNG state is recorded and
restored (:class:`RandContext`). The result equals the unchunked gradient up to float rounding
(``tests/train/test_gradcache.py``).

Combining with engines: every replayed chunk's backward runs inside ``engine.accumulate``,
non-boundary for all but the last chunk, so DDP reduces once (``no_sync``) and DeepSpeed ZeRO
(stages 1-3) reduces into its partitioned gradient buffers and steps once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class RandContext:
    """Records the CPU and CUDA RNG states now; ``with ctx:`` replays them."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.devices = devices
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        self._fork = None

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for d, s in zip(self.devices, self.cuda_states):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)
        self._fork = None


Inputs = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


def _chunks(inputs: Inputs, size: int) -> list[Inputs]:
    ids, mask = inputs
    return [(ids[i : i + size], mask[i : i + size]) for i in range(0, ids.shape[0], size)]


def gradcache_step(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    groups: Sequence[Inputs],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    backward: Callable[[torch.Tensor], None],
    accumulate: Callable[[bool], object],
) -> torch.Tensor:
    """One GradCache forward/backward; returns the (detached) loss.

    Args:
        encode: ``(ids, mask) -> (n, D)`` embeddings, differentiable (the engine's module).
        groups: input groups, e.g. ``[queries, documents]``; ``loss_fn`` gets one (N_g, D)
            tensor per group, in this order.
        loss_fn: the full-batch loss (it may gather across workers).
        chunk_size: rows per chunk.
        backward: ``loss -> None``, the engine's backward.
        accumulate: ``is_last -> context manager``, the engine's accumulation marker.
    """
    # 1. no-grad embeddings, chunk by chunk, remembering each chunk's RNG state.
    plan: list[tuple[int, Inputs, RandContext]] = []
    reps: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for g, inputs in enumerate(groups):
            group_reps = []
            for chunk in _chunks(inputs, chunk_size):
                rnd = RandContext(*chunk)
                group_reps.append(encode(*chunk))  # (c, D)
                plan.append((g, chunk, rnd))
            reps.append(group_reps)
    # 2. loss on the full batch from detached embeddings; gradients w.r.t. each embedding.
    leaves = [torch.cat(r, dim=0).detach().requires_grad_() for r in reps]  # (N_g, D) each
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)  # (N_g, D) each
    cached = [list(gr.split([r.shape[0] for r in rs], dim=0)) for gr, rs in zip(grads, reps)]
    # 3. replay each chunk with the graph and push its cached gradient through the model.
    seen = [0] * len(groups)
    for k, (g, chunk, rnd) in enumerate(plan):
        grad = cached[g][seen[g]]
        seen[g] += 1
        with accumulate(k == len(plan) - 1):
            with rnd:
                emb = encode(*chunk)  # (c, D)
            surrogate = torch.dot(emb.flatten().float(), grad.flatten().float())
            backward(surrogate)
    return loss.detach()

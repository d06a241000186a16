"""InfoNCE over in-batch and hard negatives, optionally gathered across workers.

What it optimises: for query i, the softmax over cosine similarities (divided by a temperature
tau) to every document in the pool must put its mass on document i, its positive:

    loss = -1/B * sum_i log( exp(s(q_i, d_i+)/tau) / sum_j exp(s(q_i, d_j)/tau) )

The pool is this batch's positives, then its hard negatives, and, with a gather, every other
worker's positives and negatives too: the E5 recipe's large negative pool. Gradient accumulation
does not enlarge the pool; the gather (and GradCache chunking in training) does.

Example::

    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)       # (B, D) queries
    d = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)       # (B*(1+1), D): 4 pos, 4 neg
    loss = info_nce(q, d, tau=0.02)

Matryoshka Representation Learning (Kusupati et al., 2022) trains nested vectors: the same
InfoNCE on the first ``k`` coordinates of each vector, re-normalised, for each ``k`` in a list,
plus the full vector, weighted and summed (sentence-transformers' ``MatryoshkaLoss``)::

    loss, parts = matryoshka_info_nce(q, d, [2, 4], tau=0.02)      # parts: {2: .., 4: .., 8: ..}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def gather_documents(d: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' documents, (sum_w M_w, D), and where this worker's block starts.

    This worker's slice keeps its autograd graph; the others arrive as constants. Each worker's
    loss thus trains its own encoder pass, and data-parallel gradient averaging combines them.
    Workers may hold different numbers of documents (a short last batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return d, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([d.shape[0]], device=d.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, d.shape[1]), device=d.device, dtype=d.dtype)  # (M_max, D)
    padded[: d.shape[0]] = d.detach()
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    parts = [blocks[w][: counts[w]] for w in range(world)]
    parts[rank] = d  # keep the graph for our own documents
    return torch.cat(parts, dim=0), sum(counts[:rank])  # (sum M_w, D)


def info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    tau: float = 0.02,
    gather: bool | GatherFn | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE loss.

    Args:
        q: (B, D) query embeddings, L2-normalised.
        d: (M, D) document embeddings, M >= B; rows 0..B-1 are the positives of queries
           0..B-1, the rest (hard negatives) follow in any order.
        tau: temperature; the paper uses 0.02.
        gather: None/False: this worker's documents only. True: gather across the
           torch.distributed group (no-op when it is not initialised). A callable
           ``d -> (all_docs, offset)``: custom gather (offset = where ``d`` starts).
    """
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"info_nce expects q (B, D) and d (M, D) with equal D; got {tuple(q.shape)} and {tuple(d.shape)}.")
    if d.shape[0] < q.shape[0]:
        raise ValueError(f"info_nce needs at least one document per query: {q.shape[0]} queries, {d.shape[0]} documents.")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    offset = 0
    if gather is True:
        d, offset = gather_documents(d)
    elif callable(gather):
        d, offset = gather(d)
    scores = q @ d.T / tau  # (B, M_total)
    labels = torch.arange(q.shape[0], device=q.device) + offset  # (B,)
    return F.cross_entropy(scores.float(), labels, reduction=reduction)


def truncate_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` coordinates of each row, L2-normalised again: (n, D) -> (n, dim)."""
    return F.normalize(x[:, :dim], p=2, dim=-1)


def matryoshka_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    dims: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    tau: float = 0.02,
    gather: bool | GatherFn | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """InfoNCE on nested prefixes of the vectors: ``sum_k w_k * InfoNCE(q[:, :k], d[:, :k])``.

    Each prefix is L2-normalised again before scoring; the full vectors (``D = q.shape[1]``)
    are always the last term and are scored as given (the embedder normalises them already).
    The documents are gathered across workers once and sliced for every size.

    Args:
        q, d, tau, gather: as :func:`info_nce`.
        dims: the truncated sizes, strictly increasing, each in ``1 .. D-1``.
        weights: one per entry of ``dims`` and one more for the full vectors; None: all 1.
    Returns:
        ``(loss, parts)``: the weighted sum and each size's (unweighted) InfoNCE, keyed by size.
    """
    dims = [int(k) for k in dims]
    full = q.shape[1]
    if any(k < 1 or k >= full for k in dims) or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(
            f"matryoshka dims must be strictly increasing and between 1 and {full - 1} (the full size {full} "
            f"is always trained); got {dims}."
        )
    sizes = [*dims, full]
    w = [1.0] * len(sizes) if weights is None else [float(x) for x in weights]
    if len(w) != len(sizes):
        raise ValueError(
            f"matryoshka weights: need {len(sizes)} (one per dim in {dims}, then one for the full size {full}), "
            f"got {len(w)}."
        )
    offset = 0
    if gather is True:
        d, offset = gather_documents(d)
    elif callable(gather):
        d, offset = gather(d)
    parts: dict[int, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for k, wk in zip(sizes, w):
        qk, dk = (q, d) if k == full else (truncate_normalize(q, k), truncate_normalize(d, k))
        parts[k] = info_nce(qk, dk, tau=tau, gather=lambda docs: (docs, offset))
        term = wk * parts[k]  # a 0 weight still keeps the term in the graph
        total = term if total is None else total + term
    assert total is not None
    return total, parts


def multi_head_info_nce(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    tau: float = 0.02,
    offsets: Mapping[str, int] | None = None,
    num_local: int | None = None,
    self_distill: bool = False,
    self_distill_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE on several score matrices at once (BGE-M3: dense, sparse, multi-vector).

    ``loss = sum_h w_h * InfoNCE(s_h / tau)``; with ``self_distill``, BGE-M3's self-knowledge
    distillation adds ``self_distill_weight * sum_h w_h * CE(p, softmax(s_h / tau))`` where the
    teacher ``p = softmax(sum_h w_h * s_h / tau)`` is detached: every head learns towards the
    ensemble of all heads. (BGE-M3 averages the two parts and adds an InfoNCE on the ensemble;
    here the parts are summed and weighted, which differs only by constant factors.)

    Args:
        scores: name -> (B, M_h) similarities (not yet divided by tau). Query i's positive is
            column ``offsets[name] + i``; the rest are in-batch and hard negatives.
        weights: name -> weight; every name in ``scores`` needs one.
        offsets: where this worker's documents start in a gathered matrix (0 if absent).
        num_local: this worker's document count; the teacher and the distillation use
            columns ``offset .. offset + num_local`` of every matrix, so that all heads score the
            same documents. Default: the narrowest matrix's width.
    Returns:
        ``(loss, parts)``: the total and each head's InfoNCE (and ``distill_<name>`` terms).
    """
    if not scores:
        raise ValueError("multi_head_info_nce needs at least one score matrix.")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    missing = [name for name in scores if name not in weights]
    if missing:
        raise ValueError(f"multi_head_info_nce: no weight for {missing}; weights given for {sorted(weights)}.")
    offsets = dict(offsets or {})
    parts: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for name, s in scores.items():
        labels = torch.arange(s.shape[0], device=s.device) + offsets.get(name, 0)  # (B,)
        parts[name] = F.cross_entropy((s / tau).float(), labels)
        term = weights[name] * parts[name]  # a 0 weight still connects the head (DDP needs it)
        total = term if total is None else total + term
    assert total is not None
    if self_distill:
        width = num_local if num_local is not None else min(s.shape[1] for s in scores.values())
        local = {
            name: (s[:, offsets.get(name, 0) : offsets.get(name, 0) + width] / tau).float()  # (B, width)
            for name, s in scores.items()
        }
        teacher_logits = sum(weights[name] * logits for name, logits in local.items())
        teacher = torch.softmax(teacher_logits.detach(), dim=-1)  # (B, width)
        for name, logits in local.items():
            parts[f"distill_{name}"] = -(teacher * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            total = total + self_distill_weight * weights[name] * parts[f"distill_{name}"]
    return total, parts

"""BGE-M3-style extra outputs of one backbone: sparse lexical weights and multi-vector tokens.

Beside the pooled dense vector, an :class:`~rayembed.modeling.embedder.Embedder` may carry

- a **sparse head**: ``w = relu(Linear(hidden_size -> 1)(h))`` per token; a text's weight for
  token id ``t`` is the max of ``w`` over the positions holding ``t``. Two texts score
  ``sum over shared ids of w_q[t] * w_d[t]`` (:func:`sparse_scores`), a learned BM25.
- a **multi-vector head**: ``normalize(Linear(hidden_size -> multivector_dim)(h))`` per token
  (ColBERT). Two texts score by MaxSim (:func:`maxsim`): for every query token the best dot
  product with any document token, averaged over query tokens.

Padding and special tokens (pad, bos, eos, cls, sep, ...) get no sparse weight and no token
vector. The numpy functions score what ``Embedder.encode_sparse`` / ``encode_multivector``
return (indexing and search); their ``*_torch`` twins score batches in training.

Example::

    emb = Embedder.from_pretrained("tiny-llama", sparse=True, multivector=True)
    q, d = emb.encode_sparse(["wing lift"]), emb.encode_sparse(["Lift comes from the wings."])
    sparse_scores(q, d)                                         # (1, 1)
    maxsim(emb.encode_multivector(["wing lift"])[0], emb.encode_multivector(["Lift ..."])[0])
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

HEADS_FILE = "heads.safetensors"


def _seeded_linear(in_features: int, out_features: int, seed: int) -> torch.nn.Linear:
    """A Linear layer initialised from its own seeded generator: the same head everywhere,
    without touching the global RNG (dropout masks, data order)."""
    layer = torch.nn.Linear(in_features, out_features)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
        layer.bias.zero_()
    return layer


class SparseHead(torch.nn.Module):
    """Per-token lexical weight: ``relu(Linear(hidden_size -> 1)(h))``.

    A new head starts with zero weights and a small positive bias: every token is alive (a ReLU
    that is negative for all tokens never receives a gradient) and weighs the same, so the
    first scores count shared tokens, and training moves on from plain lexical overlap.
    """

    INIT_BIAS = 0.1

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(self.INIT_BIAS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L) float32 weights, >= 0."""
        w = self.linear(hidden.to(self.linear.weight.dtype))  # (B, L, 1)
        return torch.relu(w.squeeze(-1)).float()  # (B, L)


class MultiVectorHead(torch.nn.Module):
    """Per-token vector: ``normalize(Linear(hidden_size -> dim)(h))``."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.linear = _seeded_linear(hidden_size, dim, seed=2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, dim) float32, each row L2-normalised."""
        v = self.linear(hidden.to(self.linear.weight.dtype)).float()  # (B, L, dim)
        return torch.nn.functional.normalize(v, p=2, dim=-1)


def special_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """(B, L) bool: real tokens that are not special (pad, bos, eos, cls, sep, ...)."""
    keep = attention_mask.bool()
    ids = sorted({int(i) for i in special_ids})
    if ids:
        keep = keep & ~torch.isin(input_ids, torch.tensor(ids, device=input_ids.device, dtype=input_ids.dtype))
    return keep


# ----------------------------------------------------------------------------- numpy scoring


def sparse_scores(q, d) -> np.ndarray:
    """Lexical match scores, ``q @ d.T``: (nq, vocab) x (nd, vocab) -> (nq, nd) float32.

    ``q`` and ``d`` are scipy sparse matrices (``Embedder.encode_sparse`` output) over the
    same vocabulary; a pair scores the sum over shared token ids of ``w_q * w_d``.
    """
    import scipy.sparse as sp

    if not (sp.issparse(q) and sp.issparse(d)):
        raise TypeError(
            f"sparse_scores expects scipy sparse matrices (Embedder.encode_sparse output), got "
            f"{type(q).__name__} and {type(d).__name__}."
        )
    if q.shape[1] != d.shape[1]:
        raise ValueError(
            f"sparse_scores: query vocabulary {q.shape[1]} != document vocabulary {d.shape[1]}; "
            "both sides must come from the same embedder."
        )
    out = (sp.csr_matrix(q) @ sp.csr_matrix(d).T).toarray()  # (nq, nd)
    return np.asarray(out, dtype=np.float32)


def maxsim(q_vecs: np.ndarray, d_vecs: np.ndarray) -> float:
    """ColBERT MaxSim: mean over query tokens of the max dot product with any document token.

    ``q_vecs`` (Lq, D) and ``d_vecs`` (Ld, D) are ``Embedder.encode_multivector`` items.
    Returns 0.0 when either side has no tokens.
    """
    q = np.asarray(q_vecs, dtype=np.float32)
    d = np.asarray(d_vecs, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2:
        raise ValueError(f"maxsim expects two (tokens, dim) arrays, got shapes {q.shape} and {d.shape}.")
    if q.shape[0] == 0 or d.shape[0] == 0:
        return 0.0
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"maxsim: query dim {q.shape[1]} != document dim {d.shape[1]}; use one embedder.")
    sim = q @ d.T  # (Lq, Ld)
    return float(sim.max(axis=1).mean())


# ----------------------------------------------------------------------------- torch scoring (training)


def sparse_scores_torch(
    q_weights: torch.Tensor,
    q_ids: torch.Tensor,
    d_weights: torch.Tensor,
    d_ids: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched, differentiable twin of :func:`sparse_scores` on token weights.

    Args:
        q_weights: (B, Lq) per-token weights (>= 0), q_ids: (B, Lq) their token ids.
        d_weights: (M, Ld), d_ids: (M, Ld).
        q_mask, d_mask: (B, Lq), (M, Ld) tokens that count; others weigh 0.
    Returns:
        (B, M): for each pair, sum over shared ids of (max weight of the id in q) * (in d).

    Only the ids present in the batch get a column (no vocabulary-sized tensor).
    """
    if q_mask is not None:
        q_weights = q_weights * q_mask.to(q_weights.dtype)
    if d_mask is not None:
        d_weights = d_weights * d_mask.to(d_weights.dtype)
    b, m = q_ids.shape[0], d_ids.shape[0]
    uniq, inverse = torch.unique(torch.cat([q_ids.reshape(-1), d_ids.reshape(-1)]), return_inverse=True)
    n_q = q_ids.numel()
    q_col = inverse[:n_q].reshape(q_ids.shape)  # (B, Lq) compact column per token
    d_col = inverse[n_q:].reshape(d_ids.shape)  # (M, Ld)
    u = uniq.numel()
    q_vocab = torch.zeros((b, u), dtype=q_weights.dtype, device=q_weights.device).scatter_reduce(
        1, q_col, q_weights, reduce="amax", include_self=True
    )  # (B, U)
    d_vocab = torch.zeros((m, u), dtype=d_weights.dtype, device=d_weights.device).scatter_reduce(
        1, d_col, d_weights, reduce="amax", include_self=True
    )  # (M, U)
    return q_vocab @ d_vocab.T  # (B, M)


def maxsim_torch(
    q_vecs: torch.Tensor,
    q_mask: torch.Tensor,
    d_vecs: torch.Tensor,
    d_mask: torch.Tensor,
    *,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """Batched, differentiable twin of :func:`maxsim`.

    Args:
        q_vecs: (B, Lq, D), q_mask: (B, Lq) tokens that count.
        d_vecs: (M, Ld, D), d_mask: (M, Ld).
        max_elements: documents are scored in slices so that one (B, m, Lq, Ld) similarity
            block stays under this many elements.
    Returns:
        (B, M) MaxSim scores; 0 where either side has no token.
    """
    qm = q_mask.bool()
    dm = d_mask.bool()
    b, lq = qm.shape
    m, ld = dm.shape
    n_q = qm.sum(dim=1).clamp(min=1).to(q_vecs.dtype)  # (B,)
    step = max(1, max_elements // max(1, b * lq * ld))
    out = []
    for start in range(0, m, step):
        dv, dmask = d_vecs[start : start + step], dm[start : start + step]  # (m, Ld, D), (m, Ld)
        sim = torch.einsum("bid,mjd->bmij", q_vecs, dv)  # (B, m, Lq, Ld)
        sim = sim.masked_fill(~dmask[None, :, None, :], float("-inf"))
        best = sim.max(dim=-1).values  # (B, m, Lq)
        valid = qm[:, None, :] & dmask.any(dim=1)[None, :, None]  # (B, m, Lq)
        best = torch.where(valid, best, torch.zeros_like(best))
        out.append(best.sum(dim=-1) / n_q[:, None])  # (B, m)
    return torch.cat(out, dim=1)  # (B, M)

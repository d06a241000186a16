"""The Embedder's heads side: adding and dropping the sparse and multi-vector heads, and
encoding through them.

:class:`HeadsMixin` is a base of :class:`~rayembed.modeling.embedder.Embedder`: it builds the
heads ``config.sparse`` / ``config.multivector`` ask for, gives every output of one backbone
pass (:meth:`HeadsMixin.forward_all`, used in training) and encodes texts into lexical weights
(:meth:`HeadsMixin.encode_sparse`), token vectors (:meth:`HeadsMixin.encode_multivector`) or
all outputs at once (:meth:`HeadsMixin.encode_all`). The heads themselves and their scoring are
:mod:`rayembed.modeling.heads`; saving and loading them is the embedder's folder format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayembed.modeling.heads import MultiVectorHead, SparseHead, special_token_mask

if TYPE_CHECKING:
    from rayembed.modeling.embedder import Embedder


class HeadsMixin:
    """Heads methods of :class:`~rayembed.modeling.embedder.Embedder` (see the module docstring)."""

    sparse_head: SparseHead | None
    multivector_head: MultiVectorHead | None

    def _build_heads(self) -> None:
        """Create the heads ``self.config`` asks for (fresh, seeded) and drop the others."""
        cfg = self.config
        hidden = int(self._hidden_size())
        if cfg.multivector_dim is not None and int(cfg.multivector_dim) <= 0:
            raise ValueError(f"multivector_dim must be positive, got {cfg.multivector_dim}.")
        device = next(self.model.parameters()).device
        if cfg.sparse and self.sparse_head is None:
            self.sparse_head = SparseHead(hidden).to(device)
        elif not cfg.sparse:
            self.sparse_head = None
        dim = int(cfg.multivector_dim or hidden)
        if cfg.multivector and self.multivector_head is None:
            self.multivector_head = MultiVectorHead(hidden, dim).to(device)
        elif not cfg.multivector:
            self.multivector_head = None

    def set_heads(
        self, *, sparse: bool | None = None, multivector: bool | None = None, multivector_dim: int | None = None
    ) -> Embedder:
        """Add (True) or drop (False) heads; None leaves a head as it is. New heads are untrained."""
        cfg = self.config
        if multivector_dim is not None:
            current = cfg.multivector_dim or int(self._hidden_size())
            if self.multivector_head is not None and multivector is not False and int(multivector_dim) != current:
                raise ValueError(
                    f"This embedder's multi-vector head has dim {current}, but multivector_dim={multivector_dim} "
                    "was asked for. Leave model.heads.multivector_dim empty to keep the trained head, or start "
                    "from a model without one."
                )
            if self.multivector_head is None and multivector:
                cfg.multivector_dim = int(multivector_dim)
        if sparse is not None:
            cfg.sparse = bool(sparse)
        if multivector is not None:
            cfg.multivector = bool(multivector)
            if not multivector:
                cfg.multivector_dim = None
        self._build_heads()
        return self

    @property
    def has_sparse(self) -> bool:
        return self.sparse_head is not None

    @property
    def has_multivector(self) -> bool:
        return self.multivector_head is not None

    @property
    def has_heads(self) -> bool:
        return self.has_sparse or self.has_multivector

    @property
    def multivector_dim(self) -> int | None:
        if self.multivector_head is None:
            return None
        return int(self.multivector_head.linear.out_features)

    @property
    def vocab_size(self) -> int:
        """Columns of :meth:`encode_sparse` output: the tokenizer's ids, added tokens included."""
        return len(self.tokenizer)

    @property
    def special_token_ids(self) -> set[int]:
        """Ids that never get a sparse weight or a token vector (pad, bos, eos, cls, sep, ...)."""
        tok = self.tokenizer
        ids = set(getattr(tok, "all_special_ids", []) or [])
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "cls_token_id", "sep_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                ids.add(int(value))
        return ids

    def _heads_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for prefix, head in (("sparse_head", self.sparse_head), ("multivector_head", self.multivector_head)):
            if head is not None:
                for key, value in head.state_dict().items():
                    state[f"{prefix}.{key}"] = value.detach().float().cpu().contiguous()
        return state

    def _require_head(self, kind: str) -> None:
        present = self.has_sparse if kind == "sparse" else self.has_multivector
        if not present:
            raise ValueError(
                f"This embedder ({self.config.base_model}) has no {kind} head. Train one with "
                f"model.heads.{kind}=true first, and load the embedder that training saved."
            )

    def token_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the tokens the heads speak for (real and not special)."""
        return special_token_mask(input_ids, attention_mask, self.special_token_ids)

    def forward_all(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output from one backbone pass, differentiable, float32.

        Returns ``dense`` (B, D) exactly as :meth:`forward`, ``mask`` (B, L) bool of the tokens
        the heads speak for, and per present head ``sparse`` (B, L) token weights (0 outside the
        mask) and ``multivector`` (B, L, Dm) unit token vectors (0 outside the mask).
        """
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, L, H)
        pooled = self.pool(hidden, attention_mask).float()  # (B, H)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        mask = self.token_mask(input_ids, attention_mask)  # (B, L)
        out: dict[str, torch.Tensor] = {"dense": pooled, "mask": mask}
        if self.sparse_head is not None:
            out["sparse"] = self.sparse_head(hidden) * mask.float()  # (B, L)
        if self.multivector_head is not None:
            out["multivector"] = self.multivector_head(hidden) * mask.unsqueeze(-1).float()  # (B, L, Dm)
        return out

    def _token_batches(self, texts: str | Sequence[str], instruction: str | None, batch_size: int,
                       max_length: int | None):
        """Yield (input positions, input_ids, mask, hidden, attention) per length-sorted batch, no grad."""
        ids, order = self.text.length_sorted(texts, instruction, batch_size, max_length)
        if not ids:
            return
        was_training = self.training
        self.eval()
        device = self.device
        try:
            with torch.inference_mode(), self.inference_autocast():
                for start in range(0, len(ids), batch_size):
                    idx = order[start : start + batch_size]
                    batch = self.pad([ids[i] for i in idx])
                    input_ids = batch["input_ids"].to(device)
                    attention = batch["attention_mask"].to(device)
                    hidden = self.hidden_states(input_ids, attention)  # (b, L, H)
                    yield idx, input_ids, self.token_mask(input_ids, attention), hidden, attention
        finally:
            self.train(was_training)

    def encode_sparse(
        self,
        texts: str | Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ):
        """Lexical weights: a scipy ``csr_matrix`` (n, vocab_size) float32, rows in input order.

        Row i holds, per token id of text i, the max sparse-head weight over its positions;
        special and padding tokens, and zero weights, are left out. With ``instruction`` texts
        are formatted as queries, as :meth:`encode` does.
        """
        return self.encode_all(texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                               dense=False, sparse=True)["sparse"]

    def _sparse_rows(self, rows: list, idx: np.ndarray, input_ids: torch.Tensor, keep: torch.Tensor,
                     hidden: torch.Tensor) -> None:
        """Fill ``rows[i]`` with (token ids, max weight per id) of each text ``i`` of one batch."""
        weights = self.sparse_head(hidden).cpu().numpy()  # (b, L)
        ids_np, keep_np = input_ids.cpu().numpy(), keep.cpu().numpy()
        for r, i in enumerate(idx):
            tok, w = ids_np[r][keep_np[r]], weights[r][keep_np[r]]
            uniq, inv = np.unique(tok, return_inverse=True)
            best = np.zeros(len(uniq), dtype=np.float32)
            np.maximum.at(best, inv, w.astype(np.float32))
            nz = best > 0
            rows[i] = (uniq[nz].astype(np.int64), best[nz])

    def _csr(self, rows: list):
        import scipy.sparse as sp

        n = len(rows)
        indptr = np.zeros(n + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r[0]) for r in rows])
        indices = np.concatenate([r[0] for r in rows]) if n else np.zeros(0, np.int64)
        data = np.concatenate([r[1] for r in rows]) if n else np.zeros(0, np.float32)
        return sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n, self.vocab_size), dtype=np.float32)

    def encode_all(
        self,
        texts: str | Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        dense: bool = True,
        sparse: bool = False,
        multivector: bool = False,
    ) -> dict[str, Any]:
        """Every asked-for output from one forward pass per batch: ``dense`` (n, dim) float32 as
        :meth:`encode`, ``sparse`` as :meth:`encode_sparse`, ``multivector`` as
        :meth:`encode_multivector`. The index build uses it so a model with heads is run once."""
        for head, wanted in (("sparse", sparse), ("multivector", multivector)):
            if wanted:
                self._require_head(head)
        n = len(self._check_texts(texts))
        out: dict[str, Any] = {}
        vecs = np.zeros((n, self.dim), dtype=np.float32) if dense else None
        sp_rows: list = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * n
        dim = int(self.multivector_dim or 0) if multivector else 0
        mv: list[np.ndarray] = [np.zeros((0, dim), dtype=np.float32) for _ in range(n)] if multivector else []
        for idx, input_ids, keep, hidden, attention in self._token_batches(texts, instruction, batch_size, max_length):
            if dense:
                pooled = self.pool(hidden, attention).float()  # (b, H), as forward()
                if self.config.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                vecs[idx] = pooled.cpu().numpy()
            if sparse:
                self._sparse_rows(sp_rows, idx, input_ids, keep, hidden)
            if multivector:
                tok = self.multivector_head(hidden).cpu().numpy()  # (b, L, Dm)
                keep_np = keep.cpu().numpy()
                for r, i in enumerate(idx):
                    mv[i] = np.ascontiguousarray(tok[r][keep_np[r]], dtype=np.float32)
        if dense:
            out["dense"] = vecs
        if sparse:
            out["sparse"] = self._csr(sp_rows)
        if multivector:
            out["multivector"] = mv
        return out

    def encode_multivector(
        self,
        texts: str | Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> list[np.ndarray]:
        """Token vectors: item i is (n_tokens_i, multivector_dim) float32, rows L2-normalised,
        one per real non-special token of text i, in token order."""
        return self.encode_all(texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                               dense=False, multivector=True)["multivector"]

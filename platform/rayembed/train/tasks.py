"""Training modes on one machinery: supervised contrastive (E5), unsupervised SimCSE, MNTP.

A task owns the trainable ``model`` (an ``nn.Module`` handed to the engine), computes one
step's loss and backward from a stream batch, and exports the result as a saved embedder.

- :class:`ContrastiveTask` (``train.mode=contrastive``): InfoNCE of instructed queries against
  positives, hard negatives and, through the gather, every worker's documents. With
  ``model.heads`` (BGE-M3), the sparse and multi-vector heads get their own InfoNCE terms,
  weighted by ``train.heads_loss_weights``, plus optional self-distillation.
  With ``train.matryoshka_dims``, the dense InfoNCE is also taken on each listed prefix of the
  vectors, re-normalised (Matryoshka), and the export records those sizes.
- :class:`SimCSETask` (``simcse``, LLM2Vec step 3): each document goes through twice with
  dropout; the two views are each other's positives, the rest of the global batch negatives.
- :class:`MNTPTask` (``mntp``, LLM2Vec step 2): bidirectional attention, a fraction of tokens
  replaced by the mask token, and token i predicted from the output at position i-1 (the
  decoder's LM head keeps its next-token alignment). Exported merged, bidirectional, mean
  pooled: the starting point for SimCSE or supervised training (``model.name_or_path`` = it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayembed.losses import info_nce, matryoshka_info_nce
from rayembed.modeling.loading import enable_checkpointing, pretrained_kwargs
from rayembed.train.gradcache import gradcache_step

logger = logging.getLogger(__name__)


class MultiEncoder(torch.nn.Module):
    """Encodes several (ids, mask) groups in ONE forward call.

    DDP expects one forward per backward; queries and documents have different lengths, so
    they go through the embedder as separate calls inside this single module call.
    """

    def __init__(self, embedder: torch.nn.Module, all_outputs: bool = False, length_buckets: int = 1):
        super().__init__()
        self.embedder = embedder
        self.all_outputs = all_outputs  # heads: each group gives Embedder.forward_all's dict
        # Dense vectors only: heads return per-token outputs whose length a bucket would change.
        self.length_buckets = 1 if all_outputs else length_buckets
        self.tokens_fed = 0  # (rows x columns) that went through the model, padding included

    def forward(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        if self.all_outputs:
            self.tokens_fed += sum(tensors[i].numel() for i in range(0, len(tensors), 2))
            return tuple(self.embedder.forward_all(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2))
        return tuple(self._encode(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2))  # (n_g, D)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One group's vectors, (n, D): through the model in length buckets, back in row order."""
        plan = length_buckets(mask, self.length_buckets)
        self.tokens_fed += sum(rows.numel() * (cols.stop - cols.start) for rows, cols in plan)
        if len(plan) == 1:
            rows, cols = plan[0]
            return self.embedder(ids[:, cols], mask[:, cols])  # rows: all, in order
        parts, order = [], []
        for rows, cols in plan:
            parts.append(self.embedder(ids[rows][:, cols], mask[rows][:, cols]))  # (n_b, D)
            order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


def length_buckets(mask: torch.Tensor, k: int) -> list[tuple[torch.Tensor, slice]]:
    """Split a padded group's rows into at most ``k`` runs of similar length that together carry
    the fewest padded tokens (exact, by dynamic programming over the rows sorted by length), each
    with the column span its rows use. Left and right padding alike: a bucket keeps the columns
    where any of its rows has a token. Causal and bidirectional models give the same vectors for a
    row cut this way: a left-padded row's positions count from its first token
    (``Embedder.hidden_states``), so removing padding columns shifts nothing.
    ``k`` = 1 keeps the group whole (all rows, all columns)."""
    n, width = mask.shape
    whole = [(torch.arange(n, device=mask.device), slice(0, width))]
    if k <= 1 or n < 2:
        return whole
    lengths = mask.sum(dim=1)  # (n,)
    if bool((lengths == lengths[0]).all()):
        return whole
    order = torch.argsort(lengths, descending=True, stable=True)
    ls = np.asarray(lengths[order].tolist(), dtype=np.float64)  # longest first
    k = min(k, n)
    # best[i]: fewest padded tokens for the first i sorted rows in j buckets; a bucket of rows
    # a..i-1 costs (i - a) * ls[a] (its longest row comes first). cost[a, i] adds one bucket.
    a_idx, i_idx = np.arange(n)[:, None], np.arange(n + 1)[None, :]
    span = np.where(i_idx > a_idx, (i_idx - a_idx) * ls[:, None], np.inf)  # (n, n + 1)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cuts, totals = [], []
    for _ in range(k):
        cost = best[:n, None] + span  # (n, n + 1)
        cut = cost.argmin(axis=0)  # (n + 1,)
        best = cost[cut, np.arange(n + 1)]
        best[0] = np.inf
        cuts.append(cut)
        totals.append(best[n])
    j = int(np.argmin(totals))  # the fewest buckets among the cheapest (argmin takes the first)
    bounds, i = [], n
    while j >= 0:
        a = int(cuts[j][i])
        bounds.append((a, i))
        i, j = a, j - 1
    plan = []
    for a, b in reversed(bounds):
        rows = order[a:b]
        used = mask[rows].any(dim=0).nonzero().flatten()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, width)
        plan.append((rows, slice(lo, hi)))
    return plan


def _set_dropout(model: torch.nn.Module, p: float) -> None:
    """Attention dropout for SimCSE views (Llama-style decoders read it per module)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "attention_dropout"):
            cfg.attention_dropout = p
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p
        if isinstance(module, torch.nn.Dropout):
            module.p = max(module.p, p)


def _lora_base_fixup(emb: Any) -> None:
    """A LoRA adapter trained on a saved full-weight embedder (say, merged MNTP) must name that
    folder as its base, not the model that folder was once made from."""
    src = getattr(emb, "source", None)
    if src and (Path(src) / "embedder_config.json").is_file():
        emb.config.base_model = str(Path(src).resolve())


class ContrastiveTask:
    """Supervised InfoNCE (E5 recipe) with optional GradCache chunking."""

    num_negatives_in_stream = True

    def __init__(self, cfg: Any, device: torch.device):
        from rayembed.modeling.embedder import Embedder

        mc, tc = cfg.model, cfg.train
        self.train = tc
        saved = (Path(str(mc.name_or_path)) / "embedder_config.json").is_file()
        # A saved embedder (a merged MNTP model, say) keeps its own attention mode unless the
        # config asks for bidirectional explicitly; "causal" is only the default.
        attention = None if saved and mc.attention == "causal" else mc.attention
        # Every model setting as configured; heads only where asked (a saved embedder keeps its own).
        self.embedder = Embedder.from_pretrained(
            mc.name_or_path,
            **pretrained_kwargs(
                mc, settings="all", attention=attention,
                dtype="float32",  # engines cast (DeepSpeed) or autocast; master weights stay fp32
                autocast=None,  # train.precision rules here; the probe vectors are exact fp32
                device=str(device),
            ),
        )
        _lora_base_fixup(self.embedder)
        if mc.lora.enabled:
            self.embedder.add_lora(mc.lora)  # wraps the backbone only: the heads stay trainable
        if tc.mode == "simcse":
            _set_dropout(self.embedder.model, tc.simcse_dropout)
        if tc.gradient_checkpointing:
            enable_checkpointing(self.embedder.model)
        self.heads = self.embedder.has_heads
        _check_heads_options(tc, self.heads)
        self.matryoshka_dims = _check_matryoshka(tc, self.embedder.dim)
        # The folder records the sizes this stage trained (none: an earlier stage's no longer hold).
        self.embedder.config.matryoshka_dims = self.matryoshka_dims or None
        if tc.mode == "contrastive":  # evaluation and serving then encode queries as trained
            self.embedder.config.query_instructions = bool(cfg.data.stream.instructions)
        self._parts: dict[str, float] = {}  # the last step's per-size losses (Matryoshka)
        self.embedder.train()
        buckets = tc.length_buckets
        if buckets is None:  # see train.length_buckets
            buckets = 4 if device.type == "cpu" and tc.engine == "ddp" else 1
        self.model = MultiEncoder(self.embedder, all_outputs=self.heads, length_buckets=buckets)

    def _groups(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (batch["q_input_ids"], batch["q_attention_mask"]),  # (B, Lq)
            (batch["d_input_ids"], batch["d_attention_mask"]),  # (B*(1+n), Ld)
        ]

    def _loss(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.matryoshka_dims:
            loss, parts = matryoshka_info_nce(
                q, d, self.matryoshka_dims, weights=self.train.matryoshka_weights or None,
                tau=self.train.temperature, gather=True,
            )
            self._parts = {f"loss_dim{k}": float(v.detach()) for k, v in parts.items()}
            return loss
        return info_nce(q, d, tau=self.train.temperature, gather=True)

    def _heads_loss(
        self, q: dict[str, torch.Tensor], d: dict[str, torch.Tensor], q_ids: torch.Tensor, d_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted InfoNCE of every head (+ self-distillation): BGE-M3's joint objective.

        The dense scores use the cross-worker gather as :meth:`_loss` does. The sparse and
        multi-vector scores are over this worker's documents only: gathering (B, L) token
        weights with their ids and (B, L, Dm) token vectors of varying L would cost far more
        traffic than the dense vectors, and each head still sees B*(1+n) candidates. With one
        worker both are the same pool. Self-distillation uses the local documents of every head.
        """
        from rayembed.losses import gather_documents, multi_head_info_nce
        from rayembed.modeling.heads import maxsim_torch, sparse_scores_torch

        tc = self.train
        w = tc.heads_loss_weights
        d_dense, offset = gather_documents(d["dense"])  # (sum M_w, D)
        scores = {"dense": q["dense"] @ d_dense.T}  # (B, sum M_w)
        weights = {"dense": w.dense}
        if "sparse" in q:
            scores["sparse"] = sparse_scores_torch(q["sparse"], q_ids, d["sparse"], d_ids, q["mask"], d["mask"])  # (B, M)
            weights["sparse"] = w.sparse
        if "multivector" in q:
            scores["multivector"] = maxsim_torch(q["multivector"], q["mask"], d["multivector"], d["mask"])  # (B, M)
            weights["multivector"] = w.multivector
        return multi_head_info_nce(
            scores, weights, tau=tc.temperature, offsets={"dense": offset}, num_local=d["dense"].shape[0],
            self_distill=tc.self_distill, self_distill_weight=tc.self_distill_weight,
        )

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        """Forward and backward of one batch (the engine's step() applies the update)."""
        groups = self._groups(batch)
        self.model.tokens_fed = 0
        if self.heads:
            with engine.autocast():
                q, d = engine.module(*[t for g in groups for t in g])  # dicts of forward_all outputs
                loss, parts = self._heads_loss(q, d, groups[0][0], groups[1][0])
                engine.backward(loss)
            out = {"loss": float(loss.detach()), "local_docs": groups[1][0].shape[0],
                   "tokens_fed": self.model.tokens_fed}
            out.update({f"loss_{name}": float(v.detach()) for name, v in parts.items()})
            return out
        with engine.autocast():
            if self.train.chunk_size:
                loss = gradcache_step(
                    lambda ids, mask: engine.module(ids, mask)[0],
                    groups,
                    self._loss,
                    self.train.chunk_size,
                    engine.backward,
                    engine.accumulate,
                )
            else:
                flat = [t for g in groups for t in g]
                q, d = engine.module(*flat)  # (B, D), (M, D)
                loss = self._loss(q, d)
                engine.backward(loss)
        docs = groups[1][0].shape[0]
        # GradCache encodes every chunk twice (without gradients, then the replay): count it once.
        fed = self.model.tokens_fed // 2 if self.train.chunk_size else self.model.tokens_fed
        out = {"loss": float(loss.detach()), "local_docs": docs, "tokens_fed": fed}
        out.update(self._parts)  # Matryoshka: each size's InfoNCE
        return out

    def export(self, path: Path, merge_lora: bool = False) -> Path:
        was_training = self.embedder.training
        self.embedder.eval()
        out = self.embedder.save_pretrained(path, merge_lora=merge_lora)
        self.embedder.train(was_training)
        return out


def _check_heads_options(tc: Any, heads: bool) -> None:
    from rayembed.config.base import ConfigError

    if heads and tc.chunk_size:
        raise ConfigError(
            "train.chunk_size (GradCache) does not support model.heads (sparse / multi-vector token "
            "outputs are not cached); set train.chunk_size=0, or train without heads."
        )
    if heads and tc.matryoshka_dims:
        raise ConfigError(
            "train.matryoshka_dims nests the dense vectors of a model without heads; with model.heads "
            "(sparse / multi-vector) it is not supported. Set train.matryoshka_dims=[], or train without heads."
        )
    if tc.self_distill and not heads:
        raise ConfigError(
            "train.self_distill distils the ensemble of several heads into each; it needs "
            "model.heads.sparse=true and/or model.heads.multivector=true (or set train.self_distill=false)."
        )


def _check_matryoshka(tc: Any, dim: int) -> list[int]:
    from rayembed.config.base import ConfigError

    dims = [int(k) for k in tc.matryoshka_dims]
    if not dims:
        return []
    too_big = [k for k in dims if k >= dim]
    if too_big:
        raise ConfigError(
            f"train.matryoshka_dims={dims}: {too_big} not below the model's dimension {dim} (the full {dim} "
            f"is always trained); keep sizes under {dim}, e.g. {[k for k in dims if k < dim] or [dim // 4]}."
        )
    return dims


class SimCSETask(ContrastiveTask):
    """Unsupervised SimCSE: two dropout views of each text are positives for each other."""

    def _groups(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        b = batch["q_input_ids"].shape[0]
        view = (batch["d_input_ids"][:b], batch["d_attention_mask"][:b])  # (B, Ld): the positives
        return [view, view]


class _MNTPModule(torch.nn.Module):
    """Causal LM with bidirectional attention returning the MNTP loss."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, is_causal=False).logits  # (B, L, V)
        # Token i is predicted from position i-1: shift the logits right by one.
        pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(L-1), V)
        target = labels[:, 1:].reshape(-1)  # (B*(L-1),)
        if not bool((target != -100).any()):
            return pred.sum() * 0.0
        return torch.nn.functional.cross_entropy(pred, target, ignore_index=-100)


def mntp_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    rate: float,
    special_ids: set[int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``rate`` of the real, non-special tokens that have a real token before them.

    Returns ``(masked_ids, labels)``; labels hold the original id at masked positions and -100
    elsewhere. At least one token per row is masked when the row has a candidate.
    """
    real = attention_mask.bool()  # (B, L)
    prev_real = torch.zeros_like(real)
    prev_real[:, 1:] = real[:, :-1]
    cand = real & prev_real  # (B, L): position i-1 exists, so i can be predicted
    for sid in special_ids:
        cand &= input_ids != sid
    noise = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)  # (B, L)
    chosen = cand & (noise < rate)
    # Rows where chance picked nothing: mask their best-scoring candidate so each row teaches.
    empty = ~chosen.any(dim=1) & cand.any(dim=1)  # (B,)
    if empty.any():
        score = torch.where(cand, -noise, torch.full_like(noise, float("inf")))  # lower is better
        first = score.argmin(dim=1)  # (B,)
        rows = torch.nonzero(empty).flatten()
        chosen[rows, first[rows]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))  # (B, L)
    masked = torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)  # (B, L)
    return masked, labels


class MNTPTask:
    """Masked next-token prediction with bidirectional attention (LLM2Vec step 2)."""

    num_negatives_in_stream = False

    def __init__(self, cfg: Any, device: torch.device):
        from rayembed.modeling import backbones
        from rayembed.modeling.bidirectional import enable_bidirectional

        mc, tc = cfg.model, cfg.train
        if mc.heads.sparse or mc.heads.multivector:
            from rayembed.config.base import ConfigError

            raise ConfigError(
                "train.mode=mntp trains the backbone only and exports no heads; set model.heads.sparse=false "
                "and model.heads.multivector=false, and add the heads in a later contrastive stage."
            )
        self.cfg = cfg
        self.train = tc
        name = str(mc.name_or_path)
        self.base_name = name
        if name in backbones.TINY_NAMES:
            lm, tok = backbones.build_tiny(name, causal_lm=True)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            where = backbones.resolve_checkpoint(name, gguf_file=mc.gguf_file, cache=mc.cache_dir)
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=mc.trust_remote_code)
            lm = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, trust_remote_code=mc.trust_remote_code
            )
        self.model_type = lm.config.model_type
        enable_bidirectional(lm, self.model_type)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.mask_id = self._mask_id(tok, tc.mntp_mask_token)
        self.special_ids = {i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if i is not None}
        if mc.lora.enabled:
            from peft import LoraConfig, get_peft_model

            targets: Any = mc.lora.target_modules
            if list(targets) == ["all-linear"]:
                targets = "all-linear"
            lm = get_peft_model(
                lm, LoraConfig(r=mc.lora.r, lora_alpha=mc.lora.alpha, lora_dropout=mc.lora.dropout, target_modules=targets)
            )
            enable_bidirectional(lm, self.model_type)
        if tc.gradient_checkpointing:
            enable_checkpointing(lm)
        lm.to(device)
        lm.train()
        self.lm = lm
        self.model = _MNTPModule(lm)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @staticmethod
    def _mask_id(tok: Any, text: str) -> int:
        if getattr(tok, "mask_token_id", None) is not None:
            return int(tok.mask_token_id)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"train.mntp_mask_token={text!r} encodes to no token; pick a visible character like '_'.")
        return int(ids[-1])

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        b = batch["q_input_ids"].shape[0]
        ids, mask = batch["d_input_ids"][:b], batch["d_attention_mask"][:b]  # (B, L)
        masked, labels = mntp_mask(ids, mask, self.mask_id, self.train.mntp_mask_rate, self.special_ids, self.generator)
        with engine.autocast():
            loss = engine.module(masked, mask, labels)
            engine.backward(loss)
        return {"loss": float(loss.detach()), "masked_tokens": int((labels != -100).sum())}

    def export(self, path: Path, merge_lora: bool = True) -> Path:
        """Save the encoder (LM head dropped), LoRA merged, bidirectional, mean pooled."""
        import copy

        from rayembed.modeling.embedder import Embedder, EmbedderConfig

        lm = copy.deepcopy(self.lm)
        if hasattr(lm, "merge_and_unload"):
            lm = lm.merge_and_unload()
        if hasattr(lm, "gradient_checkpointing_disable"):
            lm.gradient_checkpointing_disable()
        encoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        ecfg = EmbedderConfig(
            base_model=self.base_name,
            model_type=self.model_type,
            is_decoder=True,
            pooling="mean",
            normalize=True,
            max_length=self.cfg.model.max_length,
            query_template=self.cfg.model.query_template,
            attention="bidirectional",
            padding_side=self.cfg.model.padding_side,
            append_eos=True,
        )
        emb = Embedder(encoder.eval(), self.tokenizer, ecfg)
        return emb.save_pretrained(path)


def make_task(cfg: Any, device: torch.device):
    mode = cfg.train.mode
    if mode == "mntp":
        return MNTPTask(cfg, device)
    if mode == "simcse":
        return SimCSETask(cfg, device)
    if mode == "rerank":
        from rayembed.rerank.task import RerankTask

        return RerankTask(cfg, device)
    return ContrastiveTask(cfg, device)

"""The training task of ``train.mode=rerank``: fine-tune a causal LM as a listwise reranker
(RankLLaMA recipe). :func:`rayembed.train.tasks.make_task` picks it; the trainer runs it.

For each query of a batch, its positive and its hard negatives are scored by the
:class:`~rayembed.rerank.llm.LLMReranker` (logit(yes) - logit(no) of one prompt per pair), and
the loss is the cross-entropy of the positive within its group: a softmax over the ``1 + n``
scores with the positive as the label. The result is exported as a reranker folder
(``LLMReranker.from_pretrained(<train.output_dir>/model)``), not as an embedder.

How prompts are made: the training stream yields token ids (``q_*``, ``d_*``, tokenised with
the same base model's tokenizer, see :mod:`rayembed.data.stream`). The task decodes each row
back to text, takes a row's instruction out of the query template the stream applied
(``Instruct: {instruction}\\nQuery: {text}``), and builds every prompt with the reranker's own
:meth:`~rayembed.rerank.llm.LLMReranker.prompts`, the function that scores at inference. Training
and serving prompts are therefore the same by construction (instruction line, template,
truncation that keeps the answer cue). The joint prompt's length is ``model.max_length``.

Settings used: ``model.*`` (the causal LM, or a full-weight reranker folder to continue from;
LoRA; max_length), ``train.num_negatives`` (hard negatives per query, at least 1), and the usual
optimiser settings. GradCache (``train.chunk_size``) and training evaluation
(``train.eval_every``) are for embedders and are refused here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rayembed.modeling.loading import enable_checkpointing
from rayembed.modeling.tokenization import query_template_parser

logger = logging.getLogger(__name__)


class RerankTask:
    """Listwise cross-entropy of the positive among its hard negatives, on an LLMReranker."""

    num_negatives_in_stream = True

    def __init__(self, cfg: Any, device: torch.device):
        from rayembed.data.stream import load_text_encoder
        from rayembed.rerank.llm import CONFIG_NAME, LLMReranker

        mc, tc = cfg.model, cfg.train
        self.train = tc
        if tc.chunk_size:
            raise ValueError("train.chunk_size (GradCache) is for embedders; set it to 0 for train.mode=rerank.")
        if tc.eval_every:
            raise ValueError(
                "train.eval_every evaluates an embedder's retrieval; set it to 0 for train.mode=rerank "
                "and evaluate the exported reranker afterwards."
            )
        src = Path(str(mc.name_or_path))
        if (src / CONFIG_NAME).is_file() and not (src / "config.json").is_file():
            raise ValueError(
                f"model.name_or_path={src} is a LoRA reranker; the training stream needs a model folder with "
                "its own config.json. Continue from a merged copy (LLMReranker.save_pretrained(..., "
                "merge_lora=True), or train.merge_lora=true) or start again from its base model."
            )
        self.reranker = LLMReranker.from_pretrained(
            mc.name_or_path,
            gguf_file=mc.gguf_file,
            max_length=mc.max_length,
            dtype="float32",  # engines cast (DeepSpeed) or autocast; master weights stay fp32
            device=str(device),
            trust_remote_code=mc.trust_remote_code,
            cache=mc.cache_dir,
        )
        if (src / CONFIG_NAME).is_file() and self.reranker.config.weights == "full":
            # A new adapter on a saved full-weight reranker names that folder as its base.
            self.reranker.config.base_model = str(src.resolve())
        if mc.lora.enabled:
            self.reranker.add_lora(mc.lora)
        if tc.gradient_checkpointing:
            enable_checkpointing(self.reranker.model)
        self.reranker.train()
        self.model = self.reranker
        # The stream formats queries with its encoder's template; read it back from the same one.
        enc = load_text_encoder(str(mc.name_or_path))
        self._query_re = query_template_parser(enc.config.query_template)

    def _texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        tok = self.reranker.tokenizer
        return [
            tok.decode(row[m.bool()].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for row, m in zip(ids.cpu(), mask.cpu())
        ]

    def split_query(self, text: str) -> tuple[str | None, str]:
        """``(instruction, query)`` of a query as the stream formatted it."""
        m = self._query_re.fullmatch(text)
        if m is None:
            return None, text
        return (m.group("instruction") or None), m.group("text")

    def prompts(self, batch: dict[str, Any]) -> tuple[list[list[int]], int]:
        """Prompt ids grouped per query (positive first, then its negatives), and the group size."""
        b = batch["q_input_ids"].shape[0]
        n_docs = batch["d_input_ids"].shape[0]
        n = (n_docs - b) // b
        if n < 1 or n_docs != b * (1 + n):
            raise ValueError(
                "train.mode=rerank ranks each query's positive among its hard negatives, but the batch "
                f"holds {n_docs} documents for {b} queries. Set train.num_negatives (or "
                "data.stream.num_negatives) to at least 1."
            )
        queries = self._texts(batch["q_input_ids"], batch["q_attention_mask"])
        docs = [self.split_query(d)[1] for d in self._texts(batch["d_input_ids"], batch["d_attention_mask"])]
        out: list[list[int]] = []
        for i, q in enumerate(queries):
            instruction, query = self.split_query(q)
            group = [docs[i]] + [docs[b + i * n + j] for j in range(n)]
            out.extend(self.reranker.prompts(query, group, instruction))
        return out, 1 + n

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        """Forward and backward of one batch (the engine's step() applies the update)."""
        prompts, group = self.prompts(batch)
        padded = self.reranker.pad(prompts)
        ids = padded["input_ids"].to(engine.device)  # (B*(1+n), L)
        mask = padded["attention_mask"].to(engine.device)  # (B*(1+n), L)
        with engine.autocast():
            scores = engine.module(ids, mask).float().view(-1, group)  # (B, 1+n)
            labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # (B,)
            loss = torch.nn.functional.cross_entropy(scores, labels)
            engine.backward(loss)
        accuracy = float((scores.detach().argmax(dim=1) == 0).float().mean())
        return {"loss": float(loss.detach()), "local_docs": len(prompts), "accuracy": accuracy}

    def export(self, path: Path, merge_lora: bool = False) -> Path:
        was_training = self.reranker.training
        self.reranker.eval()
        try:
            return self.reranker.save_pretrained(path, merge_lora=merge_lora)
        finally:
            self.reranker.train(was_training)

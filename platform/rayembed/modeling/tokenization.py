"""An embedder's text side: the query template, exactly one EOS, truncation and padding.

:class:`TextTokenizer` needs a tokenizer and the embedder's settings (``query_template``,
``max_length``, ``append_eos``, ``padding_side``: an
:class:`~rayembed.modeling.embedder.EmbedderConfig`), never the weights. The
:class:`~rayembed.modeling.embedder.Embedder` tokenises through one, and so does the training
stream (:mod:`rayembed.data.stream`), so training and inference cannot tokenise differently.

Example::

    text = TextTokenizer(tokenizer, embedder_config)
    ids = text.tokenize_ids([text.format_query("how do planes fly", "Retrieve answers")])
    batch = text.pad(ids)          # {"input_ids": (B, L), "attention_mask": (B, L)}
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """``texts`` as a list of strings (one string is a list of one); anything else is refused."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) and not hasattr(texts, "__iter__"):
        raise TypeError(f"Expected a string or a list of strings, got {type(texts).__name__}.")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(
                f"Text {i} is a {type(t).__name__}, not a string: {t!r:.80}. Convert it with str() or drop it."
            )
    return out


def pad_ids(batch_ids: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Id lists padded with ``pad_id`` on ``side`` ("left" or "right") into ``input_ids`` and
    ``attention_mask`` (B, L), L the longest list."""
    longest = max((len(x) for x in batch_ids), default=1)
    ids = torch.full((len(batch_ids), longest), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)  # (B, L)
    for i, row in enumerate(batch_ids):
        n = len(row)
        if side == "left":
            ids[i, longest - n :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, longest - n :] = 1
        else:
            ids[i, :n] = torch.tensor(list(row), dtype=torch.long)
            mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def query_template_parser(template: str) -> re.Pattern[str]:
    """A regex that takes a query formatted with ``template`` apart into ``instruction`` and ``text``."""
    parts = re.split(r"(\{instruction\}|\{text\})", template)
    pattern = ""
    for p in parts:
        if p == "{instruction}":
            pattern += r"(?P<instruction>.*?)"
        elif p == "{text}":
            pattern += r"(?P<text>.*)"
        else:
            pattern += re.escape(p)
    return re.compile(pattern, re.DOTALL)


class TextTokenizer:
    """Texts -> token ids -> padded tensors, by an embedder's rules (see the module docstring)."""

    def __init__(self, tokenizer: Any, config: Any):
        self.tokenizer = tokenizer
        self.config = config  # shared with the embedder: its overrides apply here too
        self._warned_truncation = False
        if config.append_eos and tokenizer.eos_token_id is None:
            raise ValueError(
                f"Tokenizer of '{config.base_model}' has no EOS token, but last-token pooling needs one. "
                "Set the tokenizer's eos_token, or use pooling=mean."
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def format_query(self, text: str, instruction: str) -> str:
        return self.config.query_template.format(instruction=instruction, text=text)

    def tokenize_ids(self, texts: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids per text, unpadded. Decoders get exactly one trailing EOS, always.

        Truncation keeps room for the EOS. Some tokenizers add EOS themselves and some
        releases stopped doing so: trailing EOS tokens are stripped and one is appended.
        """
        texts = check_texts(texts)
        limit = int(max_length or self.config.max_length)
        empty = sum(1 for t in texts if not t.strip())
        if empty:
            logger.warning("%d of %d texts are empty; they are embedded as empty input.", empty, len(texts))
        if not self.config.append_eos:
            enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
            return [list(x) for x in enc]
        eos = self.tokenizer.eos_token_id
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        out, truncated = [], 0
        for ids in enc:
            ids = list(ids)
            while ids and ids[-1] == eos:
                ids.pop()
            if len(ids) > limit - 1:
                ids = ids[: limit - 1]
                truncated += 1
            ids.append(eos)
            out.append(ids)
        if truncated and not self._warned_truncation:
            logger.warning("%d of %d texts were truncated to %d tokens.", truncated, len(texts), limit)
            self._warned_truncation = True
        return out

    def pad(self, batch_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad id lists on the configured side into ``input_ids`` and ``attention_mask``."""
        return pad_ids(batch_ids, self.tokenizer.pad_token_id, self.config.padding_side)

    def tokenize(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.pad(self.tokenize_ids(texts, max_length))

    def length_sorted(self, texts: str | Sequence[str], instruction: str | None, batch_size: int,
                      max_length: int | None) -> tuple[list[list[int]], np.ndarray]:
        """``(ids, order)`` for encoding in batches: each text's token ids (formatted as a query
        when ``instruction`` is given) and the positions longest first, so batches carry little
        padding. No texts: no tokenizer call, ``([], [])``."""
        texts = check_texts(texts)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if instruction is not None:
            texts = [self.format_query(t, instruction) for t in texts]
        if not texts:
            return [], np.zeros(0, dtype=np.int64)
        ids = self.tokenize_ids(texts, max_length)
        return ids, np.argsort([-len(x) for x in ids], kind="stable")

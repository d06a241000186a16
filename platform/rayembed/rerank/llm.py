"""A decoder LLM as a pointwise reranker: relevance = logit(" yes") - logit(" no") (RankLLaMA / E5 style).

Each (query, document) pair becomes one prompt, by default::

    Query: {query}
    Document: {document}
    Is the document relevant to the query? Answer yes or no.
    Answer:

and the score is the difference of the next-token logits of the two answer tokens at the
last position. Any causal LM the backbones registry loads works (``smollm2-135m``, a Hugging
Face folder, the deterministic ``tiny-llama``); fine-tuning (``train.mode=rerank``) makes the
score meaningful, a pretrained instruction model gives a usable zero-shot one.

Prompts are built from token ids, piece by piece: the template's literal pieces, the query and
the document are tokenised separately and joined. Training and inference use this one builder,
so they cannot disagree. Truncation only ever shortens the query (to at most half the room when
the document needs the rest) and the document; the instruction, the template and the answer cue
at the end always stay whole, so the answer position is always the question's.

A saved reranker is a folder::

    reranker_config.json                      base model, template, answer tokens and ids,
                                              max length, weights (full | lora)
    model.safetensors + config.json           (weights: full)
    adapter_model.safetensors + adapter_config.json   (weights: lora; base_model names the base)
    tokenizer files

Example::

    rr = LLMReranker.from_pretrained("smollm2-135m")
    rr.score("what do bees make", ["Bees make honey.", "Paris is in France."])  # array([ 2.1, -1.3])
    rr.save_pretrained("runs/x/reranker"); LLMReranker.from_pretrained("runs/x/reranker")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayembed.modeling.loading import (
    base_model_id,
    load_hf_model,
    peft_lora_config,
    pick_device,
    pick_dtype,
    save_model_folder,
    split_base_model,
)
from rayembed.modeling.tokenization import pad_ids

logger = logging.getLogger(__name__)

CONFIG_NAME = "reranker_config.json"
FORMAT_VERSION = 1
DEFAULT_TEMPLATE = (
    "Query: {query}\nDocument: {document}\nIs the document relevant to the query? Answer yes or no.\nAnswer:"
)
DEFAULT_INSTRUCTION_TEMPLATE = "Instruction: {instruction}\n"
# Tried in order when the answer tokens are "auto": the first pair that the tokenizer encodes
# as one token each. Byte-level tokenizers (the tiny test models) end at "y"/"n".
ANSWER_CANDIDATES = ((" yes", " no"), ("yes", "no"), (" Yes", " No"), ("Yes", "No"), ("y", "n"))
MIN_CONTENT_TOKENS = 2


@dataclass
class RerankerConfig:
    """What ``reranker_config.json`` holds: everything needed to score exactly as in training."""

    base_model: str
    model_type: str
    template: str = DEFAULT_TEMPLATE
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    yes_token: str = " yes"
    no_token: str = " no"
    yes_token_id: int = -1
    no_token_id: int = -1
    max_length: int = 512
    weights: str = "full"  # full | lora
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _split_template(template: str) -> tuple[str, str, str]:
    """``(prefix, middle, suffix)`` around ``{query}`` and ``{document}``, checked."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if sorted(fields) != ["document", "query"] or template.index("{query}") > template.index("{document}"):
        raise ValueError(
            f"The reranker template must hold {{query}} then {{document}}, once each, and no other "
            f"field; got {template!r}. The default is {DEFAULT_TEMPLATE!r}."
        )
    prefix, rest = template.split("{query}")
    middle, suffix = rest.split("{document}")
    unescape = [p.replace("{{", "{").replace("}}", "}") for p in (prefix, middle, suffix)]
    return unescape[0], unescape[1], unescape[2]


def _check_instruction_template(template: str) -> None:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if fields != ["instruction"]:
        raise ValueError(
            f"The reranker instruction_template must hold {{instruction}} once and no other field; got "
            f"{template!r}. The default is {DEFAULT_INSTRUCTION_TEMPLATE!r}."
        )


def _single_token(tok: Any, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def resolve_answer_tokens(tok: Any, yes_token: str = "auto", no_token: str = "auto") -> tuple[str, str, int, int]:
    """``(yes, no, yes_id, no_id)``; "auto" picks the first single-token pair of ANSWER_CANDIDATES.

    Explicit words must each encode to exactly one token: the score reads one logit per word.
    """
    if (yes_token == "auto") != (no_token == "auto"):
        raise ValueError("Set both yes_token and no_token, or leave both 'auto'.")
    if yes_token == "auto":
        for yes, no in ANSWER_CANDIDATES:
            y, n = _single_token(tok, yes), _single_token(tok, no)
            if y is not None and n is not None and y != n:
                return yes, no, y, n
        raise ValueError(
            "No yes/no answer pair is a single token each in this tokenizer (tried "
            f"{', '.join(f'{a!r}/{b!r}' for a, b in ANSWER_CANDIDATES)}); pass yes_token= and no_token= "
            "with words that encode to one token each."
        )
    out = []
    for name, word in (("yes_token", yes_token), ("no_token", no_token)):
        tid = _single_token(tok, word)
        if tid is None:
            ids = tok(word, add_special_tokens=False)["input_ids"]
            raise ValueError(
                f"{name}={word!r} encodes to {len(ids)} tokens ({ids}), not one; the score reads a single "
                "next-token logit. Pick a word that is one token (e.g. ' yes'/' no' for most LLM "
                "tokenizers, 'y'/'n' for byte-level ones) or leave both 'auto'."
            )
        out.append(tid)
    if out[0] == out[1]:
        raise ValueError(f"yes_token={yes_token!r} and no_token={no_token!r} are the same token; pick two.")
    return yes_token, no_token, out[0], out[1]


# ----------------------------------------------------------------------------- loading causal LMs


def load_causal_lm(
    name: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    cache: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A causal LM with its LM head, and its tokenizer, from a registered name, folder or hub id."""
    from rayembed.modeling import backbones

    if name in backbones.TINY_NAMES:
        if name == "tiny-bert":
            raise ValueError("tiny-bert is an encoder; an LLM reranker needs a decoder such as tiny-llama.")
        model, tok = backbones.build_tiny(name, causal_lm=True)
        return model.to(dtype), tok
    path = Path(name)
    if (path / "embedder_config.json").is_file():
        raise ValueError(
            f"'{name}' is a saved embedder: its backbone was saved without the LM head a reranker scores "
            "with. Give the causal LM it came from (its embedder_config.json names it as base_model), "
            "or a saved reranker folder."
        )
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        saved = RerankerConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        if saved.weights != "full":
            return _load_saved(path, saved, dtype, trust_remote_code, cache)

    def check_decoder(config: Any) -> None:
        if not backbones.is_decoder_config(config):
            raise ValueError(
                f"'{name}' is a {config.model_type} model, not a decoder; an LLM reranker needs a causal LM "
                "(smollm2-135m, tiny-llama, a Llama/Mistral/Qwen folder)."
            )

    model, tok, _, _ = load_hf_model(
        name, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code, cache=cache, causal_lm=True,
        check_config=check_decoder, what="causal LM", saved="a saved reranker folder",
    )
    return model, tok


def _load_saved(
    path: Path, rcfg: RerankerConfig, dtype: torch.dtype, trust_remote_code: bool, cache: str | None
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if rcfg.weights == "lora":
        from peft import PeftModel

        base_name, gguf = split_base_model(rcfg.base_model)
        base, _ = load_causal_lm(base_name, gguf_file=gguf, dtype=dtype,
                                 trust_remote_code=trust_remote_code, cache=cache)
        return PeftModel.from_pretrained(base, path), tok
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tok


# ----------------------------------------------------------------------------- the reranker


class LLMReranker(torch.nn.Module):
    """A causal LM that scores (query, document) pairs. ``forward`` is differentiable."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: RerankerConfig, source: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ValueError(f"Tokenizer of '{config.base_model}' has neither a pad nor an EOS token; set one.")
        tokenizer.padding_side = "left"  # the answer position is the last column of every row
        self._prefix, self._middle, self._suffix = _split_template(config.template)
        _check_instruction_template(config.instruction_template)
        vocab = int(self._lm_config().vocab_size)
        for name in ("yes_token_id", "no_token_id"):
            tid = getattr(config, name)
            if not 0 <= tid < vocab:
                raise ValueError(f"{name}={tid} is outside the vocabulary (size {vocab}); re-resolve the answer tokens.")
        self._lead = self._leading_special_ids()
        self._prefix_ids, q_pad = self._literal(self._prefix)
        self._middle_ids, d_pad = self._literal(self._middle)
        self._suffix_ids, _ = self._literal(self._suffix)
        # Whitespace that closes a literal piece travels with the text after it (" what", not
        # " " + "what"), so pieces tokenise as the whole prompt would.
        self._query_lead, self._doc_lead = q_pad, d_pad
        fixed = len(self._lead) + len(self._prefix_ids) + len(self._middle_ids) + len(self._suffix_ids)
        if config.max_length - fixed < MIN_CONTENT_TOKENS:
            raise ValueError(
                f"max_length={config.max_length} leaves no room for a query and a document: the template "
                f"alone takes {fixed} tokens. Raise max_length or shorten the template."
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        max_length: int | None = None,
        template: str | None = None,
        instruction_template: str | None = None,
        yes_token: str | None = None,
        no_token: str | None = None,
        gguf_file: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        lora: Any = None,
        cache: str | None = None,
    ) -> LLMReranker:
        """Load a saved reranker folder, or start one from a causal LM (registered name, folder, hub id).

        Keyword arguments override a saved ``reranker_config.json``; changing the template or the
        answer tokens of a trained reranker discards what it learned, so do it only for a backbone.
        ``lora`` (a :class:`~rayembed.config.model.LoRAConfig`) wraps the model in a new adapter.
        """
        name = str(name_or_path)
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        path = Path(name)
        saved = path / CONFIG_NAME
        if saved.is_file():
            rcfg = RerankerConfig.from_dict(json.loads(saved.read_text()))
            if rcfg.format_version > FORMAT_VERSION:
                raise ValueError(
                    f"{saved} has format_version {rcfg.format_version}; this rayembed reads up to "
                    f"{FORMAT_VERSION}. Upgrade rayembed."
                )
            model, tok = _load_saved(path, rcfg, torch_dtype, trust_remote_code, cache)
            source = str(path.resolve())
            if yes_token is not None or no_token is not None:
                y, n, yid, nid = resolve_answer_tokens(tok, yes_token or rcfg.yes_token, no_token or rcfg.no_token)
                rcfg.yes_token, rcfg.no_token, rcfg.yes_token_id, rcfg.no_token_id = y, n, yid, nid
        else:
            if path.is_dir() and not (path / "config.json").is_file() and not (path / "embedder_config.json").is_file():
                raise FileNotFoundError(
                    f"'{path}' is a folder but holds neither {CONFIG_NAME} (a saved reranker) nor config.json "
                    "(a Hugging Face model)."
                )
            model, tok = load_causal_lm(name, gguf_file=gguf_file, dtype=torch_dtype,
                                        trust_remote_code=trust_remote_code, cache=cache)
            y, n, yid, nid = resolve_answer_tokens(tok, yes_token or "auto", no_token or "auto")
            base = base_model_id(name, gguf_file)
            if path.exists():
                base = str(path.resolve())
            rcfg = RerankerConfig(
                base_model=base, model_type=str(model.config.model_type),
                yes_token=y, no_token=n, yes_token_id=yid, no_token_id=nid,
            )
            source = None
        for key, value in (("max_length", max_length), ("template", template),
                           ("instruction_template", instruction_template)):
            if value is not None:
                setattr(rcfg, key, value)
        model.to(dev)
        model.eval()
        rr = cls(model, tok, rcfg, source=source)
        if lora is not None:
            rr.add_lora(lora)
        return rr

    def add_lora(self, lora: Any) -> LLMReranker:
        """Wrap the model in a peft LoRA adapter (``LoRAConfig``); only adapter weights train."""
        from peft import get_peft_model

        peft_cfg = peft_lora_config(self.model, lora, self.config.base_model)
        self.model = get_peft_model(self.model, peft_cfg)
        self.config.weights = "lora"
        return self

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def _lm_config(self):
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text -> prompt ids

    def _leading_special_ids(self) -> list[int]:
        """What the tokenizer puts before any text (BOS for Llama, nothing for SmolLM2)."""
        tok = self.tokenizer
        bare = tok("x", add_special_tokens=False)["input_ids"]
        full = tok("x", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if list(full[i : i + len(bare)]) == list(bare):
                return [int(t) for t in full[:i]]
        return []

    def _literal(self, piece: str) -> tuple[list[int], str]:
        """Ids of a template piece without its trailing whitespace, and that whitespace."""
        core = piece.rstrip(" ")
        trail = piece[len(core):]
        return self._ids(core), trail

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, query: str, document: str, instruction: str | None = None) -> list[int]:
        """Token ids of one prompt, truncated to ``max_length`` with the answer cue intact."""
        return self.prompts(query, [document], instruction)[0]

    def query_ids(self, query: str, instruction: str | None = None) -> tuple[list[int], list[int]]:
        """``(head, query)``: the fixed head (BOS, instruction, template prefix) and the query's ids."""
        head = list(self._lead)
        if instruction:
            head += self._ids(self.config.instruction_template.format(instruction=instruction))
        return head + self._prefix_ids, self._ids(self._query_lead + query)

    def _join(self, head_query: tuple[list[int], list[int]], doc: list[int]) -> list[int]:
        head, q = head_query
        avail = self.config.max_length - len(head) - len(self._middle_ids) - len(self._suffix_ids)
        if avail < MIN_CONTENT_TOKENS:
            raise ValueError(
                f"The instruction leaves no room for the query and document within max_length="
                f"{self.config.max_length} tokens; shorten the instruction or raise max_length."
            )
        q_keep = min(len(q), max(avail // 2, avail - len(doc)))
        d_keep = min(len(doc), avail - q_keep)
        return head + q[:q_keep] + self._middle_ids + doc[:d_keep] + self._suffix_ids

    def pad(self, batch_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-pad id lists into ``input_ids`` and ``attention_mask`` (the last column is the answer)."""
        return pad_ids(batch_ids, self.tokenizer.pad_token_id, "left")

    # ------------------------------------------------------------------ ids -> scores

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of left-padded prompts: logit(yes) - logit(no) at the last position.

        Position ids count real tokens only, so a prompt scores the same whatever padding its
        batch adds.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
        )
        last = out.logits[:, -1, :]  # (B, V)
        return (last[:, self.config.yes_token_id] - last[:, self.config.no_token_id]).float()  # (B,)

    @staticmethod
    def _check_text(value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a string, got {type(value).__name__}: {value!r:.80}.")
        return value

    @torch.no_grad()
    def score(
        self, query: str, documents: Sequence[str], *, instruction: str | None = None, batch_size: int = 8
    ) -> np.ndarray:
        """Relevance of each document to ``query`` (float32, one per document, input order)."""
        self._check_text(query, "query")
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string; wrap it in a list.")
        docs = [self._check_text(d, f"documents[{i}]") for i, d in enumerate(documents)]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not docs:
            return np.zeros(0, dtype=np.float32)
        return self.score_ids(self.prompts(query, docs, instruction), batch_size=batch_size)

    def prompts(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[list[int]]:
        """Prompt ids of ``query`` with each document (the query is tokenised once)."""
        hq = self.query_ids(query, instruction)
        return [self._join(hq, self._ids(self._doc_lead + d)) for d in documents]

    @torch.no_grad()
    def score_ids(self, prompts: Sequence[Sequence[int]], *, batch_size: int = 8) -> np.ndarray:
        """Scores of prompts given as ids (from :meth:`prompt_ids`), batched by length."""
        was_training = self.training
        self.eval()
        try:
            order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
            out = np.zeros(len(prompts), dtype=np.float32)
            for s in range(0, len(order), batch_size):
                rows = order[s : s + batch_size]
                batch = {k: v.to(self.device) for k, v in self.pad([prompts[i] for i in rows]).items()}
                out[rows] = self(batch["input_ids"], batch["attention_mask"]).cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | os.PathLike, *, merge_lora: bool = False) -> Path:
        """Write the folder format of the module docstring, atomically as a whole."""
        from rayembed.io import atomic_write_json

        def finish(folder: Path, weights: str) -> None:
            atomic_write_json(folder / CONFIG_NAME, dataclasses.asdict(dataclasses.replace(self.config, weights=weights)))

        target = save_model_folder(self.model, self.tokenizer, path, merge_lora=merge_lora, finish=finish)
        self.source = str(target.resolve())
        return target

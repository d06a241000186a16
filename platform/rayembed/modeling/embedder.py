"""The Embedder: text in, L2-normalised float32 vectors out, the same way in every stage.

Owns pooling, dense ``encode``, the folder it saves and loads (``embedder_config.json``, heads
file) and its identity hashes. Tokenisation rules live in :mod:`rayembed.modeling.tokenization`;
device, dtype, backbone loading, LoRA and the atomic folder write in
:mod:`rayembed.modeling.loading`; the heads' outputs (``encode_sparse``, ``encode_multivector``,
``encode_all``, ``forward_all``) in :mod:`rayembed.modeling.embedder_heads`.

A saved embedder is a folder::

    embedder_config.json      pooling, normalisation, max length, query template, attention
                              mode, padding side, EOS handling, base model identity, and the
                              Matryoshka sizes it was trained for (matryoshka_dims), if any
    model.safetensors + config.json          (weights: full)
    adapter_model.safetensors + adapter_config.json   (weights: lora; base_model names the base)
    heads.safetensors         optional BGE-M3-style heads (embedder_config.json: sparse,
                              multivector, multivector_dim), saved in both weight modes
    tokenizer files

Training, indexing, serving and evaluation all load it with :meth:`Embedder.from_pretrained`,
so their embeddings cannot silently disagree.

Example::

    emb = Embedder.from_pretrained("tiny-llama")
    q = emb.encode(["how do planes fly"], instruction="Given a question, retrieve answers")
    d = emb.encode(["Lift comes from the wings."])
    score = q @ d.T                                        # cosine similarity

With heads (``sparse=True``, ``multivector=True``), :meth:`Embedder.encode_sparse` and
:meth:`Embedder.encode_multivector` give lexical weights and token vectors, scored by
:func:`rayembed.modeling.heads.sparse_scores` and :func:`rayembed.modeling.heads.maxsim`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayembed.config.model import DEFAULT_QUERY_TEMPLATE, LoRAConfig, ModelConfig
from rayembed.modeling import backbones
from rayembed.modeling.bidirectional import check_supported, enable_bidirectional
from rayembed.modeling.embedder_heads import HeadsMixin
from rayembed.modeling.heads import HEADS_FILE, MultiVectorHead, SparseHead
from rayembed.modeling.loading import (
    base_model_id,
    load_hf_model,
    peft_lora_config,
    pick_autocast,
    pick_device,
    pick_dtype,
    pretrained_kwargs,
    require_safetensors,
    save_model_folder,
    split_base_model,
)
from rayembed.modeling.tokenization import TextTokenizer, check_texts

logger = logging.getLogger(__name__)

CONFIG_NAME = "embedder_config.json"
FORMAT_VERSION = 1
# Files of a saved folder that never change what it computes (embedder_config.json is hashed
# on its own as config_sha256); hidden files and the object-storage completion marker are skipped too.
IDENTITY_SKIP = {CONFIG_NAME, "README.md", "_COMPLETE.json"}


def identity_files(folder: Path) -> list[Path]:
    """The files whose bytes define what a saved embedder folder computes, in a fixed order."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.name not in IDENTITY_SKIP
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@functools.cache
def _takes_position_ids(model_class: type) -> bool:
    """Whether a backbone's forward takes ``position_ids`` (decoders and BERT-likes do)."""
    return "position_ids" in inspect.signature(model_class.forward).parameters


def check_matryoshka_dims(dims: Sequence[int] | None, dim: int, where: str = CONFIG_NAME) -> None:
    """Matryoshka sizes must be strictly increasing and below the full ``dim``."""
    if not dims:
        return
    sizes = list(dims)
    if (any(not isinstance(k, int) or isinstance(k, bool) or not 0 < k < dim for k in sizes)
            or any(b <= a for a, b in zip(sizes, sizes[1:]))):
        raise ValueError(
            f"{where}: matryoshka_dims={sizes} must be strictly increasing sizes between 1 and {dim - 1} "
            f"(the model makes {dim}-d vectors; the full size is always trained). Fix or remove the entry."
        )


@dataclass
class EmbedderConfig:
    """What ``embedder_config.json`` holds: everything needed to embed exactly as in training."""

    base_model: str
    model_type: str
    is_decoder: bool
    pooling: str = "last"
    normalize: bool = True
    max_length: int = 512
    query_template: str = DEFAULT_QUERY_TEMPLATE
    attention: str = "causal"
    padding_side: str = "left"
    append_eos: bool = True
    weights: str = "full"  # full | lora
    dim: int | None = None
    sparse: bool = False  # sparse lexical head (heads.safetensors)
    multivector: bool = False  # multi-vector (ColBERT) head (heads.safetensors)
    multivector_dim: int | None = None  # None: hidden size
    # Matryoshka: the truncated sizes it was trained for (train.matryoshka_dims), increasing and
    # below dim; a prefix of that length, re-normalised, is a usable vector. None: full size only.
    matryoshka_dims: list[int] | None = None
    # Whether contrastive training put the task instruction on its queries (data.stream.instructions).
    # None: not recorded (a base model, an older folder); then decoders take one, encoders not.
    query_instructions: bool | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Embedder(HeadsMixin, torch.nn.Module):
    """A backbone plus pooling. ``forward`` is differentiable; ``encode`` is for inference."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: EmbedderConfig, source: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source  # the folder this was loaded from, if any
        self.uri: str | None = None  # the storage URI it was downloaded from, if any
        # Encoding runs under torch.autocast to this dtype when set (model.autocast); None: no autocast.
        self.autocast_dtype: torch.dtype | None = None
        if config.attention == "bidirectional":
            enable_bidirectional(self.model, config.model_type)
        self.text = TextTokenizer(tokenizer, config)  # template, EOS and padding rules
        if config.dim is None:
            config.dim = int(self._hidden_size())
        check_matryoshka_dims(config.matryoshka_dims, int(config.dim))
        self.sparse_head: SparseHead | None = None
        self.multivector_head: MultiVectorHead | None = None
        self._build_heads()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Embedder:
        """Build from the ``model`` config section (LoRA added when ``cfg.lora.enabled``).

        Only keys changed from their defaults override what the model brings: a saved
        embedder keeps its own pooling, attention, template and padding, and an encoder keeps
        its right padding, unless the config asks otherwise.
        """
        return cls.from_pretrained(cfg.name_or_path, **pretrained_kwargs(cfg, settings="changed", lora=True))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        gguf_file: str | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        query_template: str | None = None,
        attention: str | None = None,
        padding_side: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        lora: LoRAConfig | None = None,
        cache: str | None = None,
        sparse: bool | None = None,
        multivector: bool | None = None,
        multivector_dim: int | None = None,
        autocast: str | None = None,
    ) -> Embedder:
        """Load a saved embedder folder, a HF folder or hub id, a GGUF file, or a registered name.

        Keyword arguments override what a saved ``embedder_config.json`` says (use with care:
        an index built with one max length and queried with another still works, but pooling
        or attention changes make vectors incomparable).

        ``sparse`` / ``multivector``: None keeps the heads the model has (a saved folder's
        ``heads.safetensors``); True adds a freshly initialised head where there is none;
        False drops it. ``multivector_dim`` sizes a new multi-vector head (None: hidden size).
        ``autocast``: "bfloat16" or "float16" runs encoding under ``torch.autocast`` in that dtype
        (the weights keep ``dtype``); None or "none": no autocast.
        """
        name = str(name_or_path)
        uri = None
        from rayembed.cluster.storage import is_remote

        if is_remote(name) or name.startswith("file://"):
            from rayembed.cluster.storage import localize

            # A folder in object storage: a verified copy in the local cache, keyed by its marker.
            uri, name = name, str(localize(name, what="embedder folder"))
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        path = Path(name)
        saved = path / CONFIG_NAME
        if path.exists() and path.is_dir() and not saved.exists() and not (path / "config.json").exists():
            raise FileNotFoundError(
                f"'{path}' is a folder but holds neither {CONFIG_NAME} (a saved rayembed embedder) nor "
                "config.json (a Hugging Face model). Point model.name_or_path at a saved embedder."
            )
        if saved.exists():
            ecfg = EmbedderConfig.from_dict(json.loads(saved.read_text()))
            model, tok = _load_saved(path, ecfg, torch_dtype, trust_remote_code, cache)
            source = str(path.resolve())
        else:
            model, tok, ecfg = _load_backbone(name, gguf_file, torch_dtype, trust_remote_code, cache)
            source = str(path.resolve()) if path.exists() else None
        overrides = dict(
            pooling=pooling, normalize=normalize, max_length=max_length, query_template=query_template,
            attention=attention, padding_side=padding_side,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(ecfg, key, value)
        if ecfg.pooling not in ("last", "mean", "weighted_mean", "cls"):
            raise ValueError(f"pooling must be last, mean, weighted_mean or cls, not '{ecfg.pooling}'.")
        if ecfg.attention == "bidirectional":
            check_supported(ecfg.model_type)
        tok.padding_side = ecfg.padding_side
        model.to(dev)
        model.eval()
        saved_heads = (ecfg.sparse, ecfg.multivector)
        emb = cls(model, tok, ecfg, source=source)
        emb.uri = uri
        emb.autocast_dtype = pick_autocast(autocast)
        if saved.exists() and any(saved_heads):
            emb._load_heads(path)
        emb.set_heads(sparse=sparse, multivector=multivector, multivector_dim=multivector_dim)
        if lora is not None:
            emb.add_lora(lora)
        return emb

    # ------------------------------------------------------------------ heads (saved)

    def _load_heads(self, folder: Path) -> None:
        from safetensors.torch import load_file

        file = folder / HEADS_FILE
        if not file.exists():
            raise FileNotFoundError(
                f"'{folder}' says it has heads (sparse={self.config.sparse}, multivector={self.config.multivector}) "
                f"in {CONFIG_NAME}, but {HEADS_FILE} is missing. Re-export the model, or set sparse/multivector "
                f"to false in {CONFIG_NAME} to use its dense output only."
            )
        state = load_file(str(file))
        for prefix, head in (("sparse_head", self.sparse_head), ("multivector_head", self.multivector_head)):
            if head is None:
                continue
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            dtype = head.linear.weight.dtype
            try:
                head.load_state_dict({k: v.to(dtype) for k, v in part.items()}, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{file} does not match the {prefix} in {CONFIG_NAME}: {e}") from e

    # ------------------------------------------------------------------ LoRA

    def add_lora(self, lora: LoRAConfig) -> Embedder:
        """Wrap the backbone in a peft LoRA adapter; only adapter weights stay trainable."""
        from peft import get_peft_model

        peft_cfg = peft_lora_config(self.model, lora, self.config.base_model)
        self.model = get_peft_model(self.model, peft_cfg)
        self.config.weights = "lora"
        if self.config.attention == "bidirectional":
            enable_bidirectional(self.model, self.config.model_type)
        return self

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def merge_lora(self) -> Embedder:
        """Fold the adapter into the base weights (the result saves as full weights)."""
        if self.is_peft:
            self.model = self.model.merge_and_unload()
            self.config.weights = "full"
        return self

    # ------------------------------------------------------------------ text -> ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's weights dtype (encoding may run in :attr:`autocast_dtype`)."""
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return int(self.config.dim)

    def _hidden_size(self) -> int:
        cfg = self._base_config()
        return getattr(cfg, "hidden_size", None) or cfg.d_model

    def _base_model(self) -> torch.nn.Module:
        return self.model.get_base_model() if self.is_peft else self.model

    def _base_config(self):
        return self._base_model().config

    # The text side (rayembed.modeling.tokenization), also reachable on the embedder itself.

    @property
    def takes_instructions(self) -> bool:
        """Whether queries should get a task instruction: as trained when the folder records it,
        else yes for decoders (the E5-mistral recipe), no for encoders such as all-MiniLM-L6-v2."""
        recorded = self.config.query_instructions
        return bool(self.config.is_decoder) if recorded is None else bool(recorded)

    def format_query(self, text: str, instruction: str) -> str:
        return self.text.format_query(text, instruction)

    _check_texts = staticmethod(check_texts)

    def tokenize_ids(self, texts: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids per text, unpadded; see :meth:`TextTokenizer.tokenize_ids`."""
        return self.text.tokenize_ids(texts, max_length)

    def pad(self, batch_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad id lists on the configured side; see :meth:`TextTokenizer.pad`."""
        return self.text.pad(batch_ids)

    def tokenize(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.text.tokenize(texts, max_length)

    # ------------------------------------------------------------------ ids -> vectors

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.config.attention == "bidirectional":
            kwargs["is_causal"] = False
        if not bool(attention_mask[:, 0].all()) and _takes_position_ids(type(self._base_model())):
            # Left padding: number each row's tokens from 0 where its text starts, so a row's vector
            # does not depend on how far its batch padded it. Models with absolute positions (GPT-2)
            # would otherwise read the padding as an offset; rotary ones are unchanged.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, H)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(hidden.dtype)  # (B, L)
        if self.config.pooling == "last":
            # Index of the last real token: correct under left and right padding alike.
            positions = torch.arange(mask.shape[1], device=mask.device)  # (L,)
            last = (attention_mask * positions).argmax(dim=1)  # (B,)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        elif self.config.pooling == "mean":
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, H)
        elif self.config.pooling == "weighted_mean":
            # Later positions weigh more (SGPT): they have seen more of a causal input.
            weights = mask.cumsum(dim=1) * mask  # (B, L)
            pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        else:  # cls: first real token
            first = attention_mask.argmax(dim=1)  # (B,)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]  # (B, H)
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Differentiable embeddings, (B, D), in float32."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, L, H)
        pooled = self.pool(hidden, attention_mask).float()  # (B, H)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts; with ``instruction`` they are formatted as queries. Returns (n, dim) float32.

        Inputs are sorted by token length so batches carry little padding; results come back
        in input order.
        """
        ids, order = self.text.length_sorted(texts, instruction, batch_size, max_length)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        if show_progress is None:
            show_progress = len(ids) >= 20 * batch_size and logger.isEnabledFor(logging.INFO)
        starts = range(0, len(ids), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch", total=len(starts))
        was_training = self.model.training
        self.model.eval()
        device = self.device
        try:
            with torch.inference_mode(), self.inference_autocast():
                for start in starts:
                    idx = order[start : start + batch_size]
                    batch = self.pad([ids[i] for i in idx])
                    vecs = self.forward(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    out[idx] = vecs.cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def inference_autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to :attr:`autocast_dtype` on this model's device, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode_queries(self, texts: str | Sequence[str], instruction: str | None, **kw: Any) -> np.ndarray:
        return self.encode(texts, instruction=instruction, **kw)

    def encode_documents(self, texts: str | Sequence[str], instruction: str | None = None, **kw: Any) -> np.ndarray:
        """Documents get no instruction, except in symmetric tasks (pass it then)."""
        return self.encode(texts, instruction=instruction, **kw)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | os.PathLike, *, merge_lora: bool = False) -> Path:
        """Write the folder format described in the module docstring (atomically, as a whole)."""
        from rayembed.io import atomic_write_json

        def finish(folder: Path, weights: str) -> None:
            if self.has_heads:
                from safetensors.torch import save_file

                save_file(self._heads_state(), str(folder / HEADS_FILE))
            atomic_write_json(folder / CONFIG_NAME, dataclasses.asdict(dataclasses.replace(self.config, weights=weights)))

        from rayembed.cluster.storage import is_remote

        if is_remote(str(path)):
            import tempfile

            from rayembed.cluster.storage import publish_folder

            with tempfile.TemporaryDirectory(prefix="rayembed-save-") as d:
                local = save_model_folder(self.model, self.tokenizer, Path(d) / "model", merge_lora=merge_lora,
                                          finish=finish)
                publish_folder(local, str(path))  # files first, the completion marker last
            return path
        target = save_model_folder(self.model, self.tokenizer, path, merge_lora=merge_lora, finish=finish)
        self.source = str(target.resolve())
        return target

    def identity(self) -> dict[str, Any]:
        """Path and hashes of the config and weights: what an index records about its embedder."""
        cfg_bytes = json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode()
        # "path" names where to load it again: the URI for a folder from object storage.
        ident: dict[str, Any] = {"path": self.uri or self.source, "base_model": self.config.base_model}
        folder = Path(self.source) if self.source else None
        if folder and (folder / CONFIG_NAME).exists():
            from rayembed.io import sha256_file

            ident["config_sha256"] = sha256_file(folder / CONFIG_NAME)
            # Every file that can change the vectors: weights (sharded or not), model and adapter
            # config, heads and tokenizer files; names included, so a renamed shard counts too.
            h = hashlib.sha256()
            for f in identity_files(folder):
                h.update(f.relative_to(folder).as_posix().encode() + b"\0")
                h.update(sha256_file(f).encode())
            ident["weights_sha256"] = h.hexdigest()
        else:
            ident["config_sha256"] = hashlib.sha256(cfg_bytes).hexdigest()
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
            for name, tensor in sorted(self._heads_state().items()):  # empty without heads
                h.update(name.encode())
                h.update(tensor.numpy().tobytes())
            ident["weights_sha256"] = h.hexdigest()
        return ident


# ----------------------------------------------------------------------------- loaders


def _load_backbone(name: str, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool, cache: str | None):
    """A fresh backbone (not a saved embedder) and the default embedder settings for it."""
    if name in backbones.TINY_NAMES:
        model, tok = backbones.build_tiny(name)
        model.to(dtype)
        decoder = name != "tiny-bert"
        ecfg = EmbedderConfig(
            base_model=name, model_type=model.config.model_type, is_decoder=decoder,
            pooling="last" if decoder else "mean", append_eos=decoder,
            padding_side="left" if decoder else "right", max_length=512,
        )
        return model, tok, ecfg
    model, tok, config, where = load_hf_model(name, gguf_file=gguf_file, dtype=dtype,
                                              trust_remote_code=trust_remote_code, cache=cache)
    decoder = backbones.is_decoder_config(config)
    ecfg = EmbedderConfig(
        base_model=base_model_id(name, gguf_file),
        model_type=config.model_type, is_decoder=decoder,
        pooling="last" if decoder else "mean", append_eos=decoder,
        padding_side="left" if decoder else "right",
        max_length=512,
    )
    if isinstance(where, Path):
        for k, v in backbones.sentence_transformers_settings(where).items():
            setattr(ecfg, k, v)
    return model, tok, ecfg


def _load_saved(path: Path, ecfg: EmbedderConfig, dtype: torch.dtype, trust_remote_code: bool, cache: str | None):
    from transformers import AutoTokenizer

    require_safetensors(path, ecfg.weights)
    tok = AutoTokenizer.from_pretrained(path)
    if ecfg.weights == "lora":
        from peft import PeftModel

        base, _, _ = _load_backbone(*split_base_model(ecfg.base_model), dtype, trust_remote_code, cache)
        model = PeftModel.from_pretrained(base, path)  # adapter_model.safetensors: checked above
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                          use_safetensors=True)
    return model, tok

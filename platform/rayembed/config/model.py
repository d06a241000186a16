"""The ``model`` section: which backbone, how it pools, its LoRA adapter and extra heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayembed.config.base import ConfigError, option

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"


@dataclass
class LoRAConfig:
    """A peft LoRA adapter on the backbone."""

    enabled: bool = option(False, "Wrap the backbone in a LoRA adapter (training only).")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = option(0.05, "Dropout on the LoRA branch.")
    target_modules: list[str] = option(
        help="Module names to adapt. ['all-linear'] adapts every linear layer but the output head.",
        factory=lambda: ["all-linear"],
    )
    top_layers: int | None = option(
        None,
        "Adapt only the top N transformer layers (null: all). Backward then stops below them: "
        "on CPU a step costs about half as much, at some quality cost.",
    )

    def __post_init__(self) -> None:
        if self.top_layers is not None and self.top_layers <= 0:
            raise ConfigError(f"model.lora.top_layers must be a positive layer count or null, got {self.top_layers}.")
        if self.r <= 0:
            raise ConfigError(f"model.lora.r must be a positive rank, got {self.r}; the paper uses 16.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty; use ['all-linear'] or name modules.")


@dataclass
class HeadsConfig:
    """BGE-M3-style outputs beside the dense vector, trained jointly (train.heads_loss_weights)."""

    sparse: bool = option(
        False, "Add a sparse lexical head: relu(Linear(hidden -> 1)) per token, max per token id."
    )
    multivector: bool = option(
        False, "Add a multi-vector (ColBERT) head: one L2-normalised vector per token, scored by MaxSim."
    )
    multivector_dim: int | None = option(
        None, "Size of each multi-vector token vector. Empty: the backbone's hidden size."
    )

    def __post_init__(self) -> None:
        if self.multivector_dim is not None:
            if self.multivector_dim <= 0:
                raise ConfigError(
                    f"model.heads.multivector_dim must be a positive size, got {self.multivector_dim}; "
                    "leave it empty for the hidden size."
                )
            if not self.multivector:
                raise ConfigError(
                    "model.heads.multivector_dim is set but model.heads.multivector is false; "
                    "set model.heads.multivector=true or leave multivector_dim empty."
                )


@dataclass
class ModelConfig:
    """The embedder: a backbone plus pooling, normalisation and the query template."""

    name_or_path: str = option(
        "smollm2-135m",
        "A saved embedder folder, a Hugging Face folder or hub id, or a registered short name "
        "(smollm2-135m, all-minilm-l6-v2, tiny-llama, tiny-mistral, tiny-qwen2, tiny-bert).",
    )
    gguf_file: str | None = option(None, "File name of a GGUF checkpoint inside name_or_path.")
    pooling: Literal["auto", "last", "mean", "weighted_mean", "cls"] = option(
        "auto", "Pooling. auto: last token (EOS) for decoders, mean for encoders."
    )
    normalize: bool = option(True, "L2-normalise embeddings.")
    max_length: int = option(512, "Maximum input length in tokens, EOS included.")
    query_template: str = option(
        DEFAULT_QUERY_TEMPLATE, "Query format; must contain {instruction} and {text}."
    )
    attention: Literal["causal", "bidirectional"] = option(
        "causal", "Attention mode. bidirectional (LLM2Vec) works for llama, mistral and qwen2."
    )
    padding_side: Literal["left", "right"] = option("left", "Which side batches are padded on.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Weights dtype. auto: bfloat16 on GPU, float32 on CPU."
    )
    autocast: Literal["none", "bfloat16", "float16"] = option(
        "none",
        "Encoding only: run inference under torch.autocast in this dtype while the weights stay in "
        "model.dtype. On a CPU with AVX-512 BF16, bfloat16 encodes SmolLM2 about 1.8x faster than "
        "fp32 with vectors at cosine >= 0.999 (bench/encode.py). Training uses train.precision.",
    )
    device: str | None = option(None, "torch device. Empty: cuda when available, else cpu.")
    trust_remote_code: bool = option(
        False, "Allow a hub model to run its own Python code. Off unless you trust the source."
    )
    cache_dir: str | None = option(
        None, "Where converted checkpoints (GGUF) are cached. Empty: $RAYEMBED_CACHE or ~/.cache/rayembed."
    )
    lora: LoRAConfig = option(help="LoRA adapter settings.", factory=LoRAConfig)
    heads: HeadsConfig = option(
        help="Extra BGE-M3-style heads (sparse, multi-vector). A saved embedder keeps the heads it has.",
        factory=HeadsConfig,
    )

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be at least 8 tokens, got {self.max_length}.")
        if "{text}" not in self.query_template or "{instruction}" not in self.query_template:
            raise ConfigError(
                "model.query_template must contain both {instruction} and {text}; "
                f"got {self.query_template!r}. The default is {DEFAULT_QUERY_TEMPLATE!r}."
            )
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty; name a model folder, hub id or short name.")

"""Loading, wrapping and writing the transformer models the embedder and the reranker are built on.

Owns, for both :class:`~rayembed.modeling.embedder.Embedder` and
:class:`~rayembed.rerank.llm.LLMReranker`:

- the device and dtype choice (:func:`pick_device`, :func:`pick_dtype`);
- turning the ``model`` config section into ``from_pretrained`` keywords, once
  (:func:`pretrained_kwargs`), with the rule each caller needs;
- loading a Hugging Face backbone (:func:`load_hf_model`), refusing pickled weights
  (:func:`require_safetensors`), naming a GGUF base (:func:`base_model_id`);
- LoRA (:func:`peft_lora_config`) and gradient checkpointing (:func:`enable_checkpointing`);
- writing a model folder atomically as a whole (:func:`save_model_folder`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from rayembed.config.model import LoRAConfig, ModelConfig

# The embedder settings a ``model`` config section can override (see :func:`pretrained_kwargs`).
EMBEDDER_SETTINGS = ("pooling", "normalize", "max_length", "query_template", "attention", "padding_side")


def pick_device(device: str | None) -> torch.device:
    """``device`` as given; empty: cuda when available, else cpu."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_autocast(autocast: str | None) -> torch.dtype | None:
    """``model.autocast`` by name: None or "none" (no autocast), "bfloat16" or "float16"."""
    if autocast in (None, "none"):
        return None
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[autocast]
    except KeyError:
        raise ValueError(f"autocast must be none, bfloat16 or float16, not '{autocast}'.") from None


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name; None or "auto": bfloat16 on cuda, float32 elsewhere."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not '{dtype}'.") from None


# ----------------------------------------------------------------------------- config -> keywords


def pretrained_kwargs(
    cfg: ModelConfig,
    *,
    settings: Literal["changed", "all", "none"] = "changed",
    heads: bool = True,
    lora: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """``Embedder.from_pretrained`` keywords from the ``model`` config section.

    ``settings`` says which embedder settings (:data:`EMBEDDER_SETTINGS`) the config imposes on
    what the model brings (a saved folder's ``embedder_config.json``, a registered model's
    defaults):

    - ``"changed"``: only those set away from their defaults (``Embedder.from_config``; an
      encoder keeps its right padding unless the config asks otherwise);
    - ``"all"``: every one (training starts from exactly the configured settings);
    - ``"none"``: none, and no ``gguf_file`` either (the model loads with its own settings:
      a saved folder, or another model than ``cfg.name_or_path``).

    ``pooling: auto`` always passes as None (the model's own). ``heads`` passes
    ``model.heads`` (a model keeps the heads it has unless one is asked for); ``lora`` passes
    ``model.lora`` when enabled. ``overrides`` replace any keyword (dtype, device, ...).
    """
    from rayembed.config.model import ModelConfig

    if settings not in ("changed", "all", "none"):
        raise ValueError(f"settings must be changed, all or none, not {settings!r}.")
    kw: dict[str, Any] = dict(dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                              cache=cfg.cache_dir, autocast=cfg.autocast)
    if settings != "none":
        kw["gguf_file"] = cfg.gguf_file
        defaults = ModelConfig()
        for key in EMBEDDER_SETTINGS:
            value = getattr(cfg, key)
            if settings == "all" or value != getattr(defaults, key):
                kw[key] = None if value == "auto" else value
    if heads:
        kw.update(sparse=cfg.heads.sparse or None, multivector=cfg.heads.multivector or None,
                  multivector_dim=cfg.heads.multivector_dim)
    if lora:
        kw["lora"] = cfg.lora if cfg.lora.enabled else None
    kw.update(overrides)
    return kw


# ----------------------------------------------------------------------------- loading


def base_model_id(name: str, gguf_file: str | None) -> str:
    """How a saved folder names its base model: the name, ``name::file.gguf`` for a GGUF file."""
    return name if gguf_file is None else f"{name}::{gguf_file}"


def split_base_model(base_model: str) -> tuple[str, str | None]:
    """``(name, gguf_file or None)`` of a :func:`base_model_id`."""
    name, _, gguf = base_model.partition("::")
    return name, gguf or None


def load_hf_model(
    name: str,
    *,
    gguf_file: str | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
    cache: str | None,
    causal_lm: bool = False,
    check_config: Callable[[Any], None] | None = None,
    what: str = "model",
    saved: str = "a saved embedder folder",
) -> tuple[torch.nn.Module, Any, Any, Path | str]:
    """``(model, tokenizer, config, where)`` of a Hugging Face folder, hub id or GGUF file.

    ``causal_lm`` keeps the LM head (``AutoModelForCausalLM``), else the bare backbone
    (``AutoModel``). ``check_config`` may refuse the config before any weight is read. A
    model that cannot be found raises FileNotFoundError naming ``what`` and what to give
    instead (``saved``, a folder, a hub id, a registered name).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from rayembed.modeling import backbones

    where = backbones.resolve_checkpoint(name, gguf_file=gguf_file, cache=cache)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        if check_config is not None:
            check_config(config)
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if causal_lm else AutoModel
        model = auto.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"Could not load {what} '{name}': {e}. Give {saved}, a Hugging Face folder, "
            f"a hub id (needs network), or one of: {', '.join(backbones.registered_names())}."
        ) from e
    return model, tok, config, where


def require_safetensors(path: Path, weights: str) -> None:
    """A saved model's weights load from safetensors only: a .bin is a pickle, never loaded."""
    if weights == "lora":
        ok = (path / "adapter_model.safetensors").is_file()
    else:
        ok = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if not ok:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        found = f" It holds {', '.join(pickles)} (pickles), which are never loaded." if pickles else ""
        want = "adapter_model.safetensors" if weights == "lora" else "model.safetensors"
        raise FileNotFoundError(
            f"Saved embedder {path} has no {want}.{found} Re-save it with Embedder.save_pretrained "
            "from a copy you trust."
        )


# ----------------------------------------------------------------------------- LoRA, checkpointing


def peft_lora_config(model: torch.nn.Module, lora: LoRAConfig, base_name: str):
    """The peft ``LoraConfig`` for ``model.lora``: all-linear, or named modules, on every layer
    or (``top_layers``) on the top N layers only."""
    from peft import LoraConfig

    targets: Any = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    layer_kw: dict[str, Any] = {}
    if getattr(lora, "top_layers", None):
        pattern, n_layers, linear_names = _decoder_layers(model)
        if lora.top_layers > n_layers:
            raise ValueError(f"model.lora.top_layers={lora.top_layers}, but {base_name} has {n_layers} layers.")
        if targets == "all-linear":  # peft takes a layer subset only with named modules
            targets = linear_names
        layer_kw = {"layers_to_transform": list(range(n_layers - lora.top_layers, n_layers)),
                    "layers_pattern": pattern}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, **layer_kw)


def _decoder_layers(model: torch.nn.Module) -> tuple[str, int, list[str]]:
    """The stack of transformer layers: its attribute name (``layers``, ``h``, ``layer``), its
    depth, and the names of the linear modules inside one layer (what ``all-linear`` means)."""
    stacks = [(name, mod) for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0]
    if not stacks:
        raise ValueError("model.lora.top_layers needs a model with a list of transformer layers; none found.")
    name, layers = max(stacks, key=lambda x: len(x[1]))
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)})
    return name.rsplit(".", 1)[-1], len(layers), linear


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing on ``model`` (the base model under a peft wrapper), KV cache off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false."
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


# ----------------------------------------------------------------------------- writing


def save_model_folder(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, *, merge_lora: bool,
                      finish: Callable[[Path, str], None]) -> Path:
    """Write a model folder atomically as a whole: weights (a peft adapter alone, or full
    safetensors, merged when asked), tokenizer, then ``finish(folder, weights)`` for the rest
    ("lora" or "full"); built in a unique folder beside ``path`` and swapped in with
    :func:`rayembed.io.replace_folder`, so a crash leaves the old folder."""
    import tempfile

    from rayembed.io import replace_folder

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique folder beside the target: two saves to one path never share a temporary folder.
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp = holder / target.name
    tmp.mkdir()
    try:
        is_peft = hasattr(model, "peft_config")
        if is_peft and merge_lora:
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        if is_peft and not merge_lora:
            model.save_pretrained(tmp)
            weights = "lora"
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            weights = "full"
        tokenizer.save_pretrained(tmp)
        finish(tmp, weights)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return target

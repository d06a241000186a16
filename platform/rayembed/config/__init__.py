"""Configuration: nested dataclasses, YAML recipes and ``key.sub=value`` overrides.

One :class:`RayembedConfig` holds every section (model, data, synth, train, index, serve,
eval, compute). Each section lives in its own module beside this one; this module holds the
machinery that builds them from YAML, applies overrides and validates.

Example::

    cfg = load_config("jobs/configs/local/demo.yaml", ["train.lr=5e-5", "model.max_length=256"])
    save_resolved(cfg, "runs/demo")       # writes runs/demo/config.resolved.yaml

An unknown key or a value of the wrong type raises :class:`ConfigError`, whose message names
the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayembed.config.base import ConfigError, option
from rayembed.config.compute import ComputeConfig
from rayembed.config.data import DataConfig
from rayembed.config.eval import EvalConfig
from rayembed.config.index import IndexConfig
from rayembed.config.model import ModelConfig
from rayembed.config.pipeline import PipelineConfig
from rayembed.config.serve import ServeConfig
from rayembed.config.synth import SynthConfig
from rayembed.config.train import TrainConfig


@dataclass
class RayembedConfig:
    """Everything one run needs. Every section has laptop-friendly defaults."""

    run_dir: str = option("runs/default", "Directory where this run writes its outputs.")
    data_dir: str | None = option(
        None,
        "Directory holding local datasets. Empty: $RAYEMBED_DATA_DIR, then ../shared/data "
        "beside the repository.",
    )
    seed: int = option(0, "Global random seed.")
    model: ModelConfig = option(help="The embedder: backbone, pooling, LoRA.", factory=ModelConfig)
    data: DataConfig = option(help="Training data sources and mixing.", factory=DataConfig)
    synth: SynthConfig = option(help="Synthetic data generation.", factory=SynthConfig)
    train: TrainConfig = option(help="Contrastive training.", factory=TrainConfig)
    index: IndexConfig = option(help="Corpus encoding and FAISS shards.", factory=IndexConfig)
    serve: ServeConfig = option(help="Ray Serve retrieval endpoint.", factory=ServeConfig)
    eval: EvalConfig = option(help="Retrieval evaluation.", factory=EvalConfig)
    compute: ComputeConfig = option(help="Ray cluster connection and resources.", factory=ComputeConfig)
    pipeline: PipelineConfig = option(help="The end-to-end `rayembed pipeline`.", factory=PipelineConfig)


# ----------------------------------------------------------------------------- machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}; pick one of those.")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}.")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}. Write it as [a, b].")
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}. Write it as {{a: 1}}.")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}.")
        return value
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"Unknown config key '{full}'.{hint} Valid keys here: {', '.join(names)}."
    )


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys and types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"Invalid config{where}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """Plain nested dict (YAML-safe) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override '{item}' has no '='. Write overrides as key.sub=value, "
                "for example train.lr=5e-5."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override '{item}' has an empty key; write key.sub=value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "Query: {text}" is a string, not a YAML mapping
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}' conflicts with another override of '{part}'.")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RayembedConfig:
    """Load a YAML recipe (optional), apply ``key.sub=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist. Pass an existing YAML file to --config.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping of sections, not {type(loaded).__name__}.")
        data = loaded
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(RayembedConfig, data)


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config next to an output, with secrets redacted."""
    from rayembed.io import atomic_write_text
    from rayembed.security import redact_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False)
    return atomic_write_text(out / name, text)


def iter_help(cls: type = RayembedConfig, prefix: str = ""):
    """Yield ``(dotted_key, type, default, help)`` for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_help(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        yield key, _type_name(tp), default, f.metadata.get("help", "")


__all__ = [
    "ConfigError",
    "RayembedConfig",
    "ComputeConfig",
    "DataConfig",
    "EvalConfig",
    "IndexConfig",
    "ModelConfig",
    "PipelineConfig",
    "ServeConfig",
    "SynthConfig",
    "TrainConfig",
    "from_dict",
    "iter_help",
    "load_config",
    "option",
    "parse_overrides",
    "save_resolved",
    "to_dict",
]

"""Driver side: build the Ray Train ``TorchTrainer`` from config, run it, collect the outputs.

``run_training(cfg, train_paths)`` is the library entry (``rayembed train`` and the demo call
it). It writes, under ``train.output_dir`` (default ``<run_dir>/train``)::

    config.resolved.yaml   the exact config of this run (secrets redacted)
    deepspeed.json         the generated DeepSpeed config (deepspeed engine only)
    model/                 the trained embedder: Embedder.from_pretrained(<this folder>)
    metrics.jsonl          one line per step: loss, lr, grad norm, data position, timings
    loss_curve.png         loss and learning rate against step
    summary.json           final metrics, wall times, checkpoint location

Checkpoints live under ``train.storage_path`` (default ``<output_dir>/ray``), a local folder
or a pyarrow URI; a re-submitted job with the same ``train.run_name`` resumes from them.

``run_dir``, ``train.output_dir``, ``train.storage_path`` and the training data may each be a
local folder or a ``pyarrow.fs`` URI (``s3://bucket/run``, ``gs://...``); a URI is never turned
into a local folder. Every location is checked before any work starts. With a URI output the
small files are written into a local staging folder and uploaded (single files as one upload
each, ``model/`` through ``publish_folder``, whose completion marker is written last), and
``run_training`` returns the model's URI instead of a ``Path``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayembed.cluster.storage import is_remote, uri_scheme
from rayembed.config import ConfigError, RayembedConfig, save_resolved, to_dict

logger = logging.getLogger(__name__)

#: The small outputs uploaded next to ``model/`` when the output is a URI (summary.json goes last).
SMALL_OUTPUTS = ("config.resolved.yaml", "deepspeed.json", "probe.json", "metrics.jsonl", "loss_curve.png")


def join_location(base: str | Path, *parts: str) -> str:
    """``base/parts`` for a local path or a URI; a URI keeps its query options (``?region=``) at the end."""
    base = str(base)
    if uri_scheme(base) is None:
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return head.rstrip("/") + "/" + "/".join(parts) + sep + query


def _local(loc: str) -> Path:
    return Path(loc[len("file://"):] if loc.startswith("file://") else loc)


def output_key(cfg: RayembedConfig) -> str:
    """The config key the output location comes from (named in errors)."""
    return "train.output_dir" if cfg.train.output_dir else "run_dir"


def output_dir(cfg: RayembedConfig) -> Path | str:
    """``train.output_dir`` (default ``<run_dir>/train``): a ``Path`` for a local folder, the URI
    string (as given, query options kept) for object storage."""
    loc = str(cfg.train.output_dir) if cfg.train.output_dir else join_location(cfg.run_dir, "train")
    return loc if is_remote(loc) else _local(loc)


def storage_path(cfg: RayembedConfig) -> str:
    """Ray Train storage: a URI as given (``train.storage_path``, or ``<output>/ray`` for a URI
    output), or an absolute local folder."""
    sp = cfg.train.storage_path
    if sp and uri_scheme(sp) is not None:
        return sp
    if sp:
        return str(Path(sp).resolve())
    out = output_dir(cfg)
    if isinstance(out, str):
        return join_location(out, "ray")
    return str((out / "ray").resolve())


def storage_key(cfg: RayembedConfig) -> str:
    return "train.storage_path" if cfg.train.storage_path else output_key(cfg)


def check_config(cfg: RayembedConfig) -> None:
    """Combinations that cannot work, refused before any worker starts."""
    tc = cfg.train
    engine = tc.resolved_engine()
    precision = tc.resolved_precision()
    if precision == "fp16" and not tc.use_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU (train.use_gpu=true); use fp32 or bf16 on CPU.")
    if engine == "deepspeed" and precision == "fp16" and tc.chunk_size:
        raise ConfigError(
            "train.chunk_size (GradCache) cannot combine with DeepSpeed fp16: its dynamic loss scaling "
            "scales each replayed chunk separately. Use train.precision=bf16, or engine=ddp."
        )
    if tc.fail_at_step and tc.fail_at_step <= tc.checkpoint_every:
        raise ConfigError(
            f"train.fail_at_step={tc.fail_at_step} must come after the first checkpoint "
            f"(train.checkpoint_every={tc.checkpoint_every}); otherwise the retry fails again."
        )
    if tc.fail_at_step and tc.max_failures == 0:
        raise ConfigError("train.fail_at_step needs train.max_failures >= 1 to recover.")
    dim = _known_model_dim(str(cfg.model.name_or_path))
    too_big = [k for k in tc.matryoshka_dims if dim is not None and k >= dim]
    if too_big:
        raise ConfigError(
            f"train.matryoshka_dims={tc.matryoshka_dims}: {too_big} not below the dimension of "
            f"model.name_or_path ({dim}); the full {dim} is always trained, so list only smaller sizes."
        )


def _known_model_dim(name: str) -> int | None:
    """The embedding size of a tiny name or a local folder (saved embedder or HF), read without
    loading weights; None where it is not known before the model loads (hub ids, GGUF files)."""
    from rayembed.modeling import backbones

    if name in backbones.TINY_NAMES:
        return int(backbones.tiny_config(name, vocab_size=8).hidden_size)
    for file, keys in (("embedder_config.json", ("dim",)), ("config.json", ("hidden_size", "d_model"))):
        path = Path(name) / file
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            for key in keys:
                if isinstance(data.get(key), int):
                    return int(data[key])
    return None


def resolve_train_paths(cfg: RayembedConfig, train_paths: Sequence[str | Path] | None, *,
                        check: bool = False) -> list[str]:
    """The training data locations: ``train_paths`` (``--train-path``), else ``data.output_dir``
    (default ``<run_dir>/data``). Local paths or URIs; ``check`` verifies each exists (and, for
    object stores, credentials and bucket) with an error naming where it came from."""
    from rayembed.cluster.storage import check_location

    if train_paths:
        paths, what = [str(p) for p in train_paths], "--train-path"
    else:
        default = getattr(cfg.data, "output_dir", None) or join_location(cfg.run_dir, "data")
        what = "data.output_dir" if getattr(cfg.data, "output_dir", None) else "run_dir"
        paths = [str(default)]
        if uri_scheme(default) is None and not Path(default).exists():
            raise FileNotFoundError(
                f"No training data at '{default}'. Run `rayembed data build` first, or pass the Parquet "
                "folder to `rayembed train --train-path PATH`."
            )
    if check:
        for p in paths:
            try:
                check_location(p, what=what, must_exist=True)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"{e} Run `rayembed data build` with data.output_dir there, or pass the Parquet "
                    "folder to `rayembed train --train-path URI`."
                ) from e
    return paths


def stream_spec(cfg: RayembedConfig, paths: list[str]):
    from rayembed.data.stream import StreamSpec

    tc = cfg.train
    sc = getattr(cfg.data, "stream", None)
    negatives = tc.num_negatives if tc.num_negatives is not None else getattr(sc, "num_negatives", 1)
    extra = {}
    for key in ("homogeneous_batches", "shuffle_buffer_rows", "tokenize_batch_rows", "tokenize_num_cpus",
                "prefetch_batches", "instructions"):
        if sc is not None and hasattr(sc, key):
            extra[key] = getattr(sc, key)
    return StreamSpec(
        paths=paths,
        tokenizer_dir=str(cfg.model.name_or_path),
        query_max_length=tc.query_max_length,
        doc_max_length=tc.doc_max_length,
        num_negatives=negatives if tc.mode in ("contrastive", "rerank") else 0,
        seed=cfg.seed,
        batch_size=tc.batch_size // tc.num_workers,
        **extra,
    )


def build_trainer(cfg: RayembedConfig, train_paths: Sequence[str | Path] | None = None, *, log_level: str = "INFO"):
    """The configured ``TorchTrainer`` (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayembed.cluster.storage import resolve_storage
    from rayembed.data.stream import build_train_dataset, train_data_config
    from rayembed.train.loop import train_loop_per_worker

    check_config(cfg)
    tc = cfg.train
    spec = stream_spec(cfg, resolve_train_paths(cfg, train_paths))
    resources: dict[str, float] = {**tc.resources_per_worker, "CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    scaling = ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources)
    run = RunConfig(
        name=tc.run_name,
        **resolve_storage(storage_path(cfg)).ray_train_kwargs(),
        failure_config=FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "stream": spec.to_dict(), "log_level": log_level},
        scaling_config=scaling,
        run_config=run,
        datasets={"train": build_train_dataset(spec)},
        dataset_config=train_data_config(),
    )


def _check_gpus(cfg: RayembedConfig) -> None:
    import ray

    tc = cfg.train
    if not tc.use_gpu:
        return
    need = tc.num_workers * tc.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise ConfigError(
            f"train.use_gpu=true asks for {need:g} GPUs but the Ray cluster has {have:g}. Add GPU nodes, "
            "lower train.num_workers, or set train.use_gpu=false."
        )


def run_training(
    cfg: RayembedConfig,
    train_paths: Sequence[str | Path] | None = None,
    *,
    log_level: str = "INFO",
) -> Path | str:
    """Train on Ray Train as configured; return where the saved embedder is: its folder (a
    ``Path``) for a local output, its URI (a ``str``, for ``Embedder.from_pretrained``) for a
    URI output."""
    from rayembed.cluster.storage import check_location, resolve_storage, warn_if_node_local
    from rayembed.io import atomic_write_json
    from rayembed.runtime import init_ray
    from rayembed.train.engine import deepspeed_config

    check_config(cfg)
    # Every location is checked before any work starts: a bad scheme, a missing bucket or
    # missing credentials fail here, naming the key, not after minutes of training.
    out = output_dir(cfg)
    out_st = check_location(str(out), what=output_key(cfg))
    ckpt_st = check_location(storage_path(cfg), what=storage_key(cfg))
    paths = resolve_train_paths(cfg, train_paths, check=True)
    remote = isinstance(out, str)
    # A URI output is staged in a local folder and uploaded; a local one is written in place.
    stage = Path(tempfile.mkdtemp(prefix="rayembed-train-")) if remote else out
    try:
        stage.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, stage)
        if cfg.train.resolved_engine() == "deepspeed":
            atomic_write_json(stage / "deepspeed.json", deepspeed_config(cfg.train, cfg.train.num_workers))
        if remote:  # the run's config is in storage from the start, like a local run's
            _upload_small(stage, out_st, ("config.resolved.yaml", "deepspeed.json"))
        init_ray(cfg.compute)
        warn_if_node_local(out_st, output_key(cfg))
        warn_if_node_local(ckpt_st, storage_key(cfg))
        _check_gpus(cfg)
        trainer = build_trainer(cfg, paths, log_level=log_level)
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        if result.error is not None:
            raise RuntimeError(f"Training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("Training finished without a checkpoint; nothing to export.")
        if not remote:
            model_dir = collect_outputs(result, out, wall_s=wall)
            logger.info("Trained embedder saved to %s (%.1f s)", model_dir, wall)
            return model_dir
        model_uri = join_location(out, "model")
        ckpt_uri = _checkpoint_uri(result.checkpoint, resolve_storage(storage_path(cfg)))
        local_model = collect_outputs(result, stage, wall_s=wall, model_location=model_uri,
                                      checkpoint_location=ckpt_uri)
        _publish_outputs(stage, local_model, out_st)
        logger.info("Trained embedder published to %s (%.1f s)", model_uri, wall)
        return model_uri
    finally:
        if remote:
            shutil.rmtree(stage, ignore_errors=True)


def _checkpoint_uri(checkpoint: Any, storage: Any) -> str:
    """The checkpoint's location as a URI (Ray gives a path inside its filesystem)."""
    path = str(checkpoint.path)
    if storage.is_local or uri_scheme(path):
        return path
    return f"{uri_scheme(storage.uri)}://{path.lstrip('/')}"


def _upload_small(stage: Path, out_st: Any, names: Sequence[str]) -> None:
    for name in names:
        if (stage / name).is_file():
            out_st.put_file(stage / name, name)


def _publish_outputs(stage: Path, local_model: Path, out_st: Any) -> None:
    """Upload a finished run's outputs: ``model/`` first (files, then its completion marker),
    then the small files, then ``summary.json``, so a summary in storage means the run is all there."""
    from rayembed.cluster.storage import publish_folder
    from rayembed.train.loop import MODEL_DIR

    publish_folder(local_model, out_st.join(MODEL_DIR))
    _upload_small(stage, out_st, SMALL_OUTPUTS)
    out_st.put_file(stage / "summary.json", "summary.json")


def collect_outputs(result: Any, out: Path, *, wall_s: float, model_location: str | None = None,
                    checkpoint_location: str | None = None) -> Path:
    """Copy the exported model out of the final checkpoint; write metrics, curve and summary.

    ``out`` is a local folder (the output itself, or the staging folder of a URI output, whose
    final locations ``model_location`` and ``checkpoint_location`` summary.json records)."""
    from rayembed.io import atomic_write_json, atomic_write_text, replace_folder
    from rayembed.train.loop import MODEL_DIR, PROBE_FILE, STATE_FILE, TrainState

    with result.checkpoint.as_directory() as d:
        src = Path(d) / MODEL_DIR
        if not src.is_dir():
            raise RuntimeError(
                f"The latest checkpoint ({result.checkpoint.path}) holds no exported model; the run "
                "stopped before its last step. Re-run with the same train.run_name to resume it."
            )
        state = TrainState.from_json((Path(d) / STATE_FILE).read_text())
        if (Path(d) / PROBE_FILE).is_file():
            shutil.copy(Path(d) / PROBE_FILE, out / PROBE_FILE)
        target = out / MODEL_DIR
        out.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.tmp-", dir=out))
        try:
            shutil.copytree(src, holder / MODEL_DIR)
            replace_folder(holder / MODEL_DIR, target)
        finally:
            shutil.rmtree(holder, ignore_errors=True)
    lines = "".join(json.dumps(rec) + "\n" for rec in state.history)
    atomic_write_text(out / "metrics.jsonl", lines)
    try:
        plot_loss_curve(state.history, out / "loss_curve.png")
    except Exception as e:  # noqa: BLE001 - a missing plot never fails a finished run
        logger.warning("Could not draw the loss curve: %s", e)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    atomic_write_json(
        out / "summary.json",
        {"metrics": metrics, "wall_s": wall_s, "checkpoint": checkpoint_location or str(result.checkpoint.path),
         "model": model_location or str(target)},
    )
    return target


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss (left axis) and learning rate (right axis) per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayembed.io import atomic_path

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    evals = [(h["step"], h["ndcg@10"]) for h in history if "ndcg@10" in h]
    if evals:
        ax.set_title("nDCG@10: " + ", ".join(f"{s}: {v:.3f}" for s, v in evals[-4:]))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path

"""``build_index(cfg)``: the index build on Ray Data, with an autoscaling pool of encoder actors.

The corpus is read with Ray Data (JSONL, Parquet, BEIR ``corpus.jsonl``; SMART is parsed on the
driver and handed over), the id map is planned in corpus order, and the documents of every
missing shard are encoded by ``map_batches(EncoderActor, compute=ActorPoolStrategy(min, max))``.
On a cluster the autoscaler adds (GPU) nodes while the pool grows and releases them after.
The driver receives ``(id, vector)`` batches and writes each shard as soon as it is complete,
so a killed job keeps every shard already written (see :mod:`rayembed.index.builder`).

``index.parts``: ``bm25`` is built on the driver from the id map (no model; ``parts: [bm25]``
alone builds a BM25-only index without starting any encoder). ``sparse`` and ``multivector``
are encoded after the shards by one Embedder on the driver (on its GPU when it has one), not on
the actor pool.

Laptop::

    rayembed index --config jobs/configs/local/index.yaml

Cluster::

    ray job submit --working-dir . -- python jobs/index.py --config jobs/configs/gpu/index.yaml
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.builder import DocSource, IndexBuild, build_lexical_index, embedder_part_encoders
from rayembed.index.corpus import (
    ColumnMapping,
    encode_text,
    fingerprint,
    normalize,
    read_smart,
    resolve_corpus,
)
from rayembed.index.faiss_util import IndexSpec
from rayembed.index.lexical import BM25Params, build_parts, check_parts, part_done

logger = logging.getLogger(__name__)


class EncoderActor:
    """A Ray Data actor: loads the Embedder once, then maps ``{id, text, title}`` batches to vectors.

    Returns ``{"id": (B,) int64, "vector": (B, dim) float32}``. ``Embedder.encode`` sorts each
    batch by token length, so padding stays small.
    """

    def __init__(self, name_or_path: str, load_kwargs: dict[str, Any], *, batch_size: int = 64,
                 max_length: int | None = None, instruction: str | None = None, include_title: bool = True,
                 num_threads: int | None = None):
        import torch

        from rayembed.modeling.embedder import Embedder

        if num_threads:
            torch.set_num_threads(num_threads)
        self.emb = Embedder.from_pretrained(name_or_path, **load_kwargs)
        self.batch_size = batch_size
        self.max_length = max_length
        self.instruction = instruction
        self.include_title = include_title

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        titles = batch.get("title")
        if titles is None:
            titles = [""] * len(batch["text"])
        texts = [encode_text(str(t), "" if ti is None else str(ti), self.include_title)
                 for t, ti in zip(batch["text"], titles)]
        vectors = self.emb.encode(texts, instruction=self.instruction, batch_size=self.batch_size,
                                  max_length=self.max_length, show_progress=False)  # (B, dim)
        return {"id": np.asarray(batch["id"], dtype=np.int64), "vector": vectors}


def _probe(name_or_path: str, load_kwargs: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, bool]]:
    """Identity, dimension and heads of the embedder, computed where the actors run (not on the driver)."""
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(name_or_path, **load_kwargs)
    heads = {"sparse": bool(getattr(emb, "has_sparse", False)), "multivector": bool(getattr(emb, "has_multivector", False))}
    return emb.identity(), int(emb.dim), heads


def embedder_args(cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` for the embedder that indexes the corpus.

    The embedder loads with its own settings (a saved folder's ``embedder_config.json``, or a
    registered model's defaults), exactly as serving and evaluation load it by name; only
    ``model`` keys set away from their defaults override them. Passing every default would, for
    example, force left padding onto an encoder registered with right padding, and change its
    vectors and identity.
    """
    from rayembed.config import ModelConfig

    m, enc = cfg.model, cfg.index.encode
    name = cfg.index.embedder or m.name_or_path
    device = m.device or ("cuda" if enc.num_gpus_per_actor > 0 else "cpu")
    kwargs: dict[str, Any] = dict(dtype=m.dtype, device=device, trust_remote_code=m.trust_remote_code,
                                  cache=m.cache_dir, max_length=enc.max_length)
    if cfg.index.embedder or (Path(name) / "embedder_config.json").is_file():
        return name, kwargs
    defaults = ModelConfig()
    kwargs["gguf_file"] = m.gguf_file
    for key in ("pooling", "normalize", "max_length", "query_template", "attention", "padding_side"):
        value = getattr(m, key)
        if value != getattr(defaults, key) and kwargs.get(key) is None:
            kwargs[key] = None if value == "auto" else value
    return name, kwargs


@contextlib.contextmanager
def _ordered():
    """Ray Data in corpus order (ids are positions; shards then complete one after another)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old


def ray_source(path: Path, fmt: str, mapping: ColumnMapping, limit: int | None = None) -> DocSource:
    """Documents read with Ray Data, in corpus order, normalised on the driver as they stream in."""
    import ray.data

    stats: dict[str, int] = {}
    wanted = [c for c in {mapping.id_field or "_id", "id", "_id", mapping.text_field, mapping.title_field,
                          *mapping.metadata_fields} if c]

    def read():
        if fmt in ("jsonl", "beir"):
            return ray.data.read_json(str(path), lines=True)
        if fmt == "parquet":
            return ray.data.read_parquet(str(path))
        if fmt == "smart":
            import pyarrow as pa

            # One block; repartition downstream spreads it (from_items makes a block per row).
            return ray.data.from_arrow(pa.Table.from_pylist(read_smart(path)))
        raise ValueError(f"Unknown corpus format {fmt!r}; use jsonl, parquet, beir or smart.")

    def batches() -> Iterator[list[dict[str, Any]]]:
        with _ordered():
            start = 0
            for batch in read().iter_batches(batch_size=8192, batch_format="pyarrow"):
                # Only the mapped columns reach Python (not e.g. BEIR's empty metadata structs).
                rows = batch.select([c for c in batch.column_names if c in wanted]).to_pylist()
                yield list(normalize(rows, mapping, start_row=start, stats=stats, source=str(path)))
                start += len(rows)

    return DocSource(batches, {**fingerprint(path), "format": fmt}, stats, limit)


def _encode_dataset(ds, cfg: Any, name: str, load_kwargs: dict[str, Any]):
    """``ds`` of ``{id, text, title}`` -> ``{id, vector}`` on the autoscaling actor pool."""
    from ray.data import ActorPoolStrategy

    enc = cfg.index.encode
    remote: dict[str, Any] = {"num_cpus": enc.num_cpus_per_actor}
    if enc.num_gpus_per_actor > 0:
        remote["num_gpus"] = enc.num_gpus_per_actor
    return ds.repartition(target_num_rows_per_block=enc.rows_per_block).map_batches(
        EncoderActor,
        compute=ActorPoolStrategy(min_size=enc.min_actors, max_size=enc.max_actors),
        batch_size=enc.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            name_or_path=name,
            load_kwargs=load_kwargs,
            batch_size=enc.batch_size,
            max_length=enc.max_length,
            instruction=cfg.index.doc_instruction,
            include_title=cfg.index.include_title,
            num_threads=max(1, int(round(enc.num_cpus_per_actor))),
        ),
        **remote,
    )


def build_index(cfg: Any) -> Path:
    """Build (or resume) the index described by ``cfg.index`` on Ray Data; returns manifest.json's path."""
    import ray

    from rayembed.config import ConfigError, save_resolved, to_dict
    from rayembed.runtime import init_ray, resolve_data_dir
    from rayembed.security import redact_config

    icfg, enc = cfg.index, cfg.index.encode
    if not icfg.corpus:
        raise ConfigError("index.corpus is empty; set it to a JSONL/Parquet file, a BEIR folder or cran.all.1400.")
    try:
        data_dir = resolve_data_dir(cfg.data_dir)
    except FileNotFoundError:
        data_dir = None
    path, fmt = resolve_corpus(icfg.corpus, icfg.format, data_dir)
    out_dir = Path(icfg.output_dir or Path(cfg.run_dir) / "index")
    try:
        parts = check_parts(icfg.parts, where="index.parts")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    mapping = ColumnMapping.from_config(icfg)
    init_ray(cfg.compute)
    if "dense" not in parts:
        logger.info("Building a BM25-only index (index.parts=%s): no embedder is loaded", list(parts))
        return build_lexical_index(
            None, out_dir, bm25=icfg.bm25, shard_size=None if icfg.num_shards else icfg.shard_size,
            num_shards=icfg.num_shards, mapping=mapping, overwrite=icfg.overwrite,
            source=ray_source(path, fmt, mapping, icfg.limit), config=redact_config(to_dict(cfg)),
        )
    name, load_kwargs = embedder_args(cfg)
    t0 = time.perf_counter()
    remote: dict[str, Any] = {"num_cpus": enc.num_cpus_per_actor}
    if enc.num_gpus_per_actor > 0:
        remote["num_gpus"] = enc.num_gpus_per_actor
    identity, dim, heads = ray.get(ray.remote(**remote)(_probe).remote(name, load_kwargs))
    logger.info("Embedder %s: dim %d (%.1fs to load)", name, dim, time.perf_counter() - t0)
    for part in ("sparse", "multivector"):
        if part in parts and not heads[part]:
            raise ConfigError(
                f"index.parts has '{part}' but the embedder {name} has no {part} head. Train one with "
                f"model.heads.{part}=true, or drop '{part}' from index.parts."
            )

    build = IndexBuild(
        out_dir, spec=IndexSpec.from_config(icfg), identity=identity, dim=dim, shard_size=icfg.shard_size,
        num_shards=icfg.num_shards, config=redact_config(to_dict(cfg)), overwrite=icfg.overwrite,
        use_gpu=icfg.use_gpu, seed=cfg.seed,
        extra_key={"doc_instruction": icfg.doc_instruction, "include_title": icfg.include_title,
                   "max_length": enc.max_length},
    )
    build.prepare(ray_source(path, fmt, mapping, icfg.limit))
    bm25 = BM25Params.from_config(icfg.bm25)
    if build.is_complete(parts) and ("bm25" not in parts or part_done(
            build.root, build.plan, "bm25", {**bm25.to_dict(), "include_title": icfg.include_title})):
        logger.info("Index in %s is already complete", build.root)
        return build.root / "manifest.json"
    save_resolved(cfg, build.root)

    if build.needs_training():
        ids, texts = build.sample_texts(icfg.include_title)
        import pyarrow as pa

        ds = ray.data.from_arrow(pa.table({"id": pa.array(ids, pa.int64()), "text": texts, "title": [""] * len(texts)}))
        got_ids, got = [], []
        with _ordered():
            for b in _encode_dataset(ds, cfg, name, load_kwargs).iter_batches(batch_size=None, batch_format="numpy"):
                got_ids.append(b["id"])
                got.append(b["vector"])
        build.train(np.concatenate(got))

    writer = build.writer()
    missing = list(writer.pending.values())
    logger.info("Encoding %d documents of %d shards with %d-%d actors (%s CPU, %s GPU each)",
                sum(s["rows"] for s in missing), len(missing), enc.min_actors, enc.max_actors,
                enc.num_cpus_per_actor, enc.num_gpus_per_actor)
    files = [str(build.root / s["docs"]["file"]) for s in missing]
    with _ordered():
        ds = ray.data.read_parquet(files, columns=["id", "text", "title"])
        for batch in _encode_dataset(ds, cfg, name, load_kwargs).iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(batch["id"], batch["vector"], log_every_s=enc.log_every_s)
    writer.close()
    if writer.rows:
        secs = time.perf_counter() - writer.t0
        logger.info("Encoded %d documents in %.1fs (%.1f docs/s)", writer.rows, secs, writer.rows / secs)
    encoders: dict[str, Any] = {}
    if any(p in parts for p in ("sparse", "multivector")):
        encoders = _driver_part_encoders(name, load_kwargs, parts, cfg)
    build_parts(build, parts, include_title=icfg.include_title, bm25=bm25, overwrite=icfg.overwrite, **encoders)
    return build.finish({"mapping": mapping.__dict__, "embedder_name": name})


def _driver_part_encoders(name: str, load_kwargs: dict[str, Any], parts: tuple[str, ...], cfg: Any
                          ) -> dict[str, Any]:
    """Encoders of the sparse / multivector parts: one Embedder on the driver (GPU when it has one)."""
    import torch

    from rayembed.modeling.embedder import Embedder

    kwargs = dict(load_kwargs)
    if str(kwargs.get("device") or "").startswith("cuda") and not torch.cuda.is_available():
        kwargs["device"] = "cpu"
    logger.info("Encoding the %s part(s) on the driver (%s)", [p for p in parts if p in ("sparse", "multivector")],
                kwargs.get("device") or "auto")
    emb = Embedder.from_pretrained(name, **kwargs)
    enc = cfg.index.encode
    return embedder_part_encoders(emb, parts, doc_instruction=cfg.index.doc_instruction, batch_size=enc.batch_size,
                                  max_length=enc.max_length)


def build_indexes(cfg: Any, corpora: dict[str, str], *, embedder: str | None = None) -> dict[str, Path]:
    """Index several corpora with one embedder (e.g. the model a pipeline just trained).

    ``corpora`` maps a name to a corpus (``{"msmarco": "msmarco-subset", "cranfield": "cranfield"}``;
    the format is detected: BEIR folder, SMART ``cran.all.1400``, JSONL, Parquet). Each index goes
    to ``<index.output_dir or run_dir/index>/<name>``. Returns ``{name: manifest path}``.
    """
    import dataclasses

    base = Path(cfg.index.output_dir or Path(cfg.run_dir) / "index")
    out: dict[str, Path] = {}
    for name, corpus in corpora.items():
        icfg = dataclasses.replace(cfg.index, corpus=corpus, format="auto", output_dir=str(base / name),
                                   embedder=embedder or cfg.index.embedder)
        out[name] = build_index(dataclasses.replace(cfg, index=icfg))
    return out

"""Stream training rows from Parquet shards into Ray Train workers, tokenised, in a fixed order.

Owns the stream spec, finding the shards, the tokenising actor and the Ray Data pipeline;
the worker side (shuffle buffer, batching, negative filling, padding) is
:mod:`rayembed.data.collate`, the tokenisation rules :mod:`rayembed.modeling.tokenization`.

The path of one example::

    Parquet shards (unified schema, already shuffled on disk by ``rayembed data build``)
      -> ray.data.read_parquet                     (file order kept, no file shuffle)
      -> map_batches(tokenize_batch)                (instruction template, exactly one EOS,
                                                     n negatives chosen per row, seeded)
      -> streaming_split(world_size, equal=True)    (Ray Train's DataConfig does this)
      -> iter_train_batches(...) in each worker     (seeded local shuffle buffer, optional
                                                     one-source batches, padding, tensors)

Usage in a Ray Train loop::

    spec = StreamSpec(paths=["runs/x/data"], tokenizer_dir="runs/x/model", batch_size=16)
    trainer = TorchTrainer(loop, datasets={"train": build_train_dataset(spec)},
                           dataset_config=train_data_config(), ...)
    # inside loop(config):
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), spec, skip_batches=k):
        q = model(batch["q_input_ids"], batch["q_attention_mask"])    # (B, D)
        d = model(batch["d_input_ids"], batch["d_attention_mask"])    # (B*(1+n), D)

Document layout of ``d_*``: rows ``0..B-1`` are the positives, in query order; then the
negatives row-major, so negative ``j`` of query ``i`` sits at row ``B + i*n + j``. The positive
of query ``i`` is therefore row ``i``, which is the label an InfoNCE loss expects.

Missing negatives (a row with fewer than ``n``): each empty slot takes a *random earlier
document* of this worker's stream: the positive of a row from an earlier batch (a pool of the
last ``fill_pool_size`` positives), never a document of the current batch (those are in-batch
negatives already) and never text equal to the row's own positive. Before the first batch the
pool is primed with the next batch's positives (one batch of look-ahead). Only a stream of a
single batch with no negatives at all falls back to repeating the row's own negatives or, if
it has none, an empty document (the end-of-sequence token alone). The choice is seeded by
``(seed, batch index)``, so it is the same on every resume.

Determinism and resume: ``preserve_order=True`` (set on the dataset and by
:func:`train_data_config`) makes Ray Data emit blocks in file order, and Ray's output splitter
then assigns each block to the split with the fewest rows so far, ignoring locality, so every
worker sees the same rows in the same order on every run. The local shuffle buffer is our own,
seeded per worker rank, and works on rows (not Ray's block-boundary-dependent buffer), and
one-source batching is a deterministic function of that order. Skipping the first ``N``
batches therefore resumes exactly where the run stopped. ``equal=True`` drops at most
``world_size - 1`` rows so that every worker gets the same number of rows; with
``drop_last=True`` every worker then yields the same number of batches, which DDP needs.

Memory is bounded: Ray Data streams blocks with backpressure, and the worker holds at most the
shuffle buffer, one partial batch per source and the fill pool.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rayembed.data.collate import NegativeFiller, Row, buffer_shuffle, collate, group_rows

logger = logging.getLogger(__name__)

# Columns the stream reads from the unified schema.
READ_COLUMNS = ["id", "instruction", "query", "positive", "negatives", "source", "symmetric"]


@dataclass
class StreamSpec:
    """Everything the stream needs; plain values, so it travels to Ray workers as-is."""

    paths: list[str]
    tokenizer_dir: str
    query_max_length: int = 512
    doc_max_length: int = 512
    num_negatives: int = 1
    seed: int = 0
    shuffle: bool = True
    homogeneous_batches: bool = False
    batch_size: int = 32
    # Rows held by the per-worker shuffle buffer (0: no shuffle in the stream; the mix is
    # shuffled on disk already).
    shuffle_buffer_rows: int = 1024
    drop_last: bool = True
    # Rows per tokenisation call; CPUs each tokenising actor reserves (fractional on small
    # machines); number of tokenising actors.
    tokenize_batch_rows: int = 256
    tokenize_num_cpus: float = 0.5
    tokenize_actors: int = 2
    # Batches Ray prefetches in each worker while the model runs.
    prefetch_batches: int = 2
    # Earlier positives kept to fill missing negatives.
    fill_pool_size: int = 1024
    # False: queries (and symmetric documents) go in without their instruction, the paper's ablation.
    instructions: bool = True
    log_every_s: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, Path)):
            self.paths = [str(self.paths)]
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise ValueError("StreamSpec.paths is empty; pass Parquet files or folders written by `rayembed data build`.")
        for name in ("query_max_length", "doc_max_length", "batch_size", "tokenize_batch_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StreamSpec.{name} must be positive, got {getattr(self, name)}.")
        if self.num_negatives < 0:
            raise ValueError(f"StreamSpec.num_negatives must be >= 0, got {self.num_negatives}.")
        if self.shuffle_buffer_rows < 0:
            raise ValueError("StreamSpec.shuffle_buffer_rows must be >= 0 (0 turns the buffer off).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- files


def resolve_parquet_files(paths: Iterable[str]) -> list[str]:
    """Expand folders into their Parquet files, sorted, so the read order is fixed.

    A folder written by ``rayembed data build`` (it holds ``manifest.json``) contributes its
    training shards only (``train/``), never the held-out validation split.
    """
    files: list[str] = []
    for p in paths:
        if _is_uri(p):
            files.extend(_remote_parquet_files(str(p)))
            continue
        path = Path(p[len("file://"):] if str(p).startswith("file://") else p)
        if path.is_file():
            files.append(str(path))
            continue
        if not path.is_dir():
            raise FileNotFoundError(
                f"Training data path '{path}' does not exist; run `rayembed data build` or fix the path."
            )
        root = path / "train" if (path / "manifest.json").is_file() and (path / "train").is_dir() else path
        found = sorted(str(f) for f in root.rglob("*.parquet") if not f.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"No .parquet files under '{root}'; run `rayembed data build` first.")
        files.extend(found)
    return files


def _is_uri(p: Any) -> bool:
    from rayembed.cluster.storage import is_remote

    return is_remote(str(p))


def _remote_parquet_files(uri: str) -> list[str]:
    """The Parquet files of an object-store file or prefix, as URIs (query options kept), sorted."""
    import pyarrow.fs as pafs

    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(uri)
    info = st.filesystem.get_file_info(st.path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"Training data path '{uri}' does not exist; run `rayembed data build` or fix the URI."
        )
    head, sep, query = uri.partition("?")
    head = head.rstrip("/")
    root = st
    if st.exists("manifest.json") and st.exists("train"):
        root, head = st.join("train"), head + "/train"
    sel = pafs.FileSelector(root.path, recursive=True)
    found = sorted(
        i.path for i in st.filesystem.get_file_info(sel)
        if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not i.base_name.startswith(".")
    )
    if not found:
        raise FileNotFoundError(f"No .parquet files under '{head}'; run `rayembed data build` first.")
    return [head + f[len(root.path):] + sep + query for f in found]


def parquet_read_args(files: list[str]) -> tuple[list[str], Any]:
    """``(paths, filesystem)`` for ``ray.data.read_parquet``: URIs become paths inside one
    ``pyarrow.fs`` filesystem (the first file's, with its URI options); local files stay as they are."""
    remote = [_is_uri(f) for f in files]
    if not any(remote):
        return files, None
    if not all(remote):
        raise ValueError(
            "Training data mixes local paths and URIs; put every training shard in one storage "
            f"(got {files[:4]})."
        )
    from rayembed.cluster.storage import resolve_storage

    fs = resolve_storage(files[0]).filesystem
    return [resolve_storage(f).path for f in files], fs


# ----------------------------------------------------------------------------- tokenising


@functools.lru_cache(maxsize=4)
def load_text_encoder(tokenizer_dir: str):
    """The :class:`~rayembed.modeling.tokenization.TextTokenizer` of an embedder (template, EOS,
    padding), cached per process.

    A saved embedder folder (with ``embedder_config.json``) loads its tokenizer only, which keeps
    each tokenising actor small even for a 7B backbone; any other name (a registered model, a
    Hugging Face folder) loads the embedder to learn its defaults.
    """
    import json

    from rayembed.modeling.embedder import CONFIG_NAME, Embedder, EmbedderConfig
    from rayembed.modeling.tokenization import TextTokenizer

    path = Path(tokenizer_dir)
    if (path / CONFIG_NAME).is_file():
        from transformers import AutoTokenizer

        ecfg = EmbedderConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = TextTokenizer(tokenizer, ecfg)
        tokenizer.padding_side = ecfg.padding_side
        return text
    return Embedder.from_pretrained(tokenizer_dir, device="cpu").text


def _pick_negatives(negs: list[str] | None, n: int, seed: int, row_id: str) -> list[str]:
    negs = [x for x in (negs or []) if isinstance(x, str) and x.strip()]
    if len(negs) <= n:
        return negs
    return random.Random(f"{seed}:{row_id}").sample(negs, n)


class TokenizeBatch:
    """``map_batches`` function: unified-schema rows -> token-id lists.

    Queries get the instruction through the embedder's query template; symmetric rows put
    it on their documents too. ``tokenize_ids`` appends exactly one EOS for decoders.
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.enc = load_text_encoder(spec["tokenizer_dir"])

    def __call__(self, batch):  # batch: pyarrow.Table
        import pyarrow as pa

        spec = self.spec
        enc = self.enc
        cols = {c: batch.column(c).to_pylist() for c in READ_COLUMNS if c in batch.column_names}
        n = len(cols["id"])
        instr = (cols.get("instruction") if spec.get("instructions", True) else None) or [""] * n
        sym = cols.get("symmetric") or [False] * n
        negs_in = cols.get("negatives") or [[] for _ in range(n)]

        def fmt_query(text: str, ins: str) -> str:
            return enc.format_query(text, ins) if ins else text

        queries = [fmt_query(q, i) for q, i in zip(cols["query"], instr)]
        pos = [fmt_query(p, i) if s else p for p, i, s in zip(cols["positive"], instr, sym)]
        flat_negs: list[str] = []
        counts: list[int] = []
        for rid, ngs, i, s in zip(cols["id"], negs_in, instr, sym):
            chosen = _pick_negatives(ngs, spec["num_negatives"], spec["seed"], rid)
            counts.append(len(chosen))
            flat_negs.extend(fmt_query(x, i) if s else x for x in chosen)
        q_ids = enc.tokenize_ids(queries, max_length=spec["query_max_length"])
        p_ids = enc.tokenize_ids(pos, max_length=spec["doc_max_length"])
        n_flat = enc.tokenize_ids(flat_negs, max_length=spec["doc_max_length"]) if flat_negs else []
        n_ids, k = [], 0
        for c in counts:
            n_ids.append(n_flat[k : k + c])
            k += c
        ids32 = pa.list_(pa.int32())
        return pa.table(
            {
                "id": pa.array(cols["id"], pa.string()),
                "source": pa.array(cols["source"], pa.string()),
                "q_ids": pa.array(q_ids, ids32),
                "p_ids": pa.array(p_ids, ids32),
                "n_ids": pa.array(n_ids, pa.list_(ids32)),
            }
        )


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


@contextlib.contextmanager
def footer_readers(n_files: int):
    """Size Ray Data's Parquet footer-reading pool to the files read.

    Ray Data 2.60 lists Parquet files by reading their footers on a pool of 32 actors (each a new
    Python process), whatever the number of files; for a training mix of a few files that start-up
    costs over a minute on a small machine. The pool is sized from the environment when
    ``read_parquet`` is called, so this sets about one actor per 10 files (Ray's footer batch),
    at most 32, for the duration of the call, unless the user has set the variable.
    """
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(max(1, min(32, -(-n_files // 10))))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def build_train_dataset(spec: StreamSpec):
    """The tokenised training stream as a ``ray.data.Dataset`` (lazy; nothing runs yet).

    Rows carry ``id``, ``source``, ``q_ids``, ``p_ids`` and ``n_ids`` (at most
    ``num_negatives`` lists). Pass it to a trainer as ``datasets={"train": ds}`` together with
    ``dataset_config=train_data_config()``.
    """
    import ray

    files, filesystem = parquet_read_args(resolve_parquet_files(spec.paths))
    with footer_readers(len(files)):
        ds = ray.data.read_parquet(files, columns=READ_COLUMNS, shuffle=None, filesystem=filesystem)
    # Small blocks, so tokenising and delivery stream (the reader may return one block for
    # many small files); streaming repartition keeps the order.
    ds = ds.repartition(target_num_rows_per_block=spec.tokenize_batch_rows)
    # A small pool of long-lived tokenising actors: each pays the tokenizer (and torch) import
    # once, where short tasks would pay it in every fresh worker process.
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"spec": spec.to_dict()},
        compute=ray.data.ActorPoolStrategy(size=spec.tokenize_actors),
        batch_format="pyarrow",
        batch_size=spec.tokenize_batch_rows,
        num_cpus=spec.tokenize_num_cpus,
    )
    ds.context.execution_options.preserve_order = True
    return ds


def train_data_config(**kwargs):
    """A ``ray.train.DataConfig`` that keeps the order deterministic (see module docstring).

    Ray Train otherwise copies ``preserve_order`` from the driver's current DataContext,
    which is False by default and would let the split depend on task timing.
    """
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    cur = DataContext.get_current().execution_options
    opts = ExecutionOptions(
        resource_limits=cur.resource_limits,
        exclude_resources=cur.exclude_resources,
        preserve_order=True,
        verbose_progress=cur.verbose_progress,
    )
    return DataConfig(execution_options=opts, **kwargs)


def split_for_workers(ds, world_size: int):
    """``streaming_split(world_size, equal=True)`` in deterministic order (no Ray Train needed)."""
    ds.context.execution_options.preserve_order = True
    return ds.streaming_split(world_size, equal=True)


class LocalShard:
    """The same tokenised rows read in this process, without Ray (for debugging and baselines).

    Quacks like a DataIterator for :func:`iter_train_batches`: ``iter_batches`` reads the
    files in order with pyarrow and tokenises with :class:`TokenizeBatch`.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.files = resolve_parquet_files(spec.paths)

    def iter_batches(self, batch_size: int = 256, batch_format: str = "pyarrow", prefetch_batches: int = 0,
                     drop_last: bool = False, **_: Any):
        import pyarrow.parquet as pq

        tok = TokenizeBatch(self.spec.to_dict())
        for f in self.files:
            if _is_uri(f):
                from rayembed.cluster.storage import resolve_storage

                st = resolve_storage(f)
                f = st.filesystem.open_input_file(st.path)
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=self.spec.tokenize_batch_rows, columns=READ_COLUMNS):
                import pyarrow as pa

                yield tok(pa.Table.from_batches([rb]))


# ----------------------------------------------------------------------------- worker side


def _iter_rows(shard, spec: StreamSpec) -> Iterator[Row]:
    it = shard.iter_batches(
        batch_size=max(spec.batch_size, 64),
        batch_format="pyarrow",
        prefetch_batches=spec.prefetch_batches,
        drop_last=False,
    )
    for tb in it:
        columns = [tb.column(name).to_pylist() for name in Row._fields]
        yield from map(Row._make, zip(*columns))


def _world_rank() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - outside a Train worker there is no context
        return 0


class _Meter:
    def __init__(self, every_s: float):
        self.every_s = every_s
        self.t0 = self.last = time.perf_counter()
        self.rows = self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = time.perf_counter()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            dt = now - self.t0
            logger.info(
                "stream: %d examples, %.1f examples/s, %.0f tokens/s", self.rows, self.rows / dt, self.tokens / dt
            )


def iter_train_batches(shard, spec: StreamSpec, skip_batches: int = 0, *, rank: int | None = None,
                       device: Any = None) -> Iterator[dict[str, Any]]:
    """Padded torch batches for one worker; see the module docstring for layout and order.

    ``shard`` is ``ray.train.get_dataset_shard("train")`` (a DataIterator) or any object with
    ``iter_batches`` (a Dataset, one element of :func:`split_for_workers`). ``skip_batches``
    batches are consumed without being padded or yielded, for resuming. Each batch holds
    ``q_input_ids``/``q_attention_mask`` (B, Lq), ``d_input_ids``/``d_attention_mask``
    (B*(1+n), Ld), ``source`` and ``id`` (lists of B str), ``num_filled`` (negatives filled
    from the pool) and ``num_tokens`` (non-padding tokens in the batch).
    """
    enc = load_text_encoder(spec.tokenizer_dir)
    rank = _world_rank() if rank is None else rank
    rows: Iterator[Row] = _iter_rows(shard, spec)
    if spec.shuffle and spec.shuffle_buffer_rows > 1:
        rows = buffer_shuffle(rows, spec.shuffle_buffer_rows, random.Random(f"shuffle:{spec.seed}:{rank}"))
    groups = group_rows(rows, spec.batch_size, homogeneous=spec.homogeneous_batches, drop_last=spec.drop_last)
    filler = NegativeFiller(
        spec.num_negatives, spec.fill_pool_size, seed=spec.seed, rank=rank,
        empty_doc=lambda: enc.tokenize_ids([""], max_length=spec.doc_max_length)[0],
    )
    meter = _Meter(spec.log_every_s)
    cur = next(groups, None)
    idx = 0
    while cur is not None:
        nxt = next(groups, None)
        if nxt is not None:
            filler.prime(nxt)  # first batch only: the pool is empty
        if idx >= skip_batches:
            negatives, filled = filler.fill(cur, idx)
            batch = collate(cur, negatives, filled, enc, device)
            meter.add(len(cur), batch["num_tokens"])
            yield batch
        filler.remember(cur)
        cur = nxt
        idx += 1

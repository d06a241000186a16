"""The ``data`` section: training sources, their ratios, mixing, mining and the training stream.

A source is a registered public set (``name: msmarco-passage``), or the user's own data with a
path, a format, a column mapping and an instruction::

    data:
      sources:
        - {name: msmarco-passage, path: /data/msmarco}                 # ratio 0.5 from the registry
        - {name: stsb, format: stsb, path: stsb/sts-train.csv}          # symmetric STS pairs
        - {name: mine, format: jsonl, path: pairs.jsonl, instruction: "Given a bug report, retrieve the fix",
           columns: {query: title, positive: body}}
        - {name: synth, format: schema, path: runs/x/synth}             # synthetic shards
        - {name: weak, format: weak, path: msmarco-subset, weak_mode: crops}
"""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.config.base import ConfigError, option

FORMATS = ("registry", "schema", "jsonl", "parquet", "tsv", "csv", "beir", "smart", "stsb", "weak")


@dataclass
class SourceConfig:
    """One training source."""

    name: str = option("", "A registered dataset name (see `rayembed data list`) or your own source's name.")
    path: str | None = option(
        None, "File or folder; relative paths resolve against data_dir. Empty for a registered set: <data_dir>/<name>."
    )
    format: str = option(
        "registry",
        "registry (a public set's published layout), schema (unified-schema Parquet/JSONL, e.g. synthetic), "
        "jsonl, parquet, tsv, csv (with columns), beir, smart, stsb, weak (pairs from raw text).",
    )
    ratio: float | None = option(
        None, "Fraction of this source's rows to sample (above 1 repeats rows). Empty: the registry's ratio, else 1."
    )
    online: bool = option(False, "Fetch a registered set from the Hugging Face hub (needs internet and `datasets`).")
    instruction: str | None = option(None, "Task instruction for your own source (overrides a registered set's).")
    columns: dict[str, str] = option(
        help="Column mapping {query, positive, negatives, instruction, ...: your column} for jsonl/parquet/tsv/csv.",
        factory=dict,
    )
    symmetric: bool = option(False, "Documents get the instruction too (STS-like sources).")
    task_type: str = option("retrieval", "task_type written on this source's rows.")
    language: str = option("en", "Language written on this source's rows (registered sets know their own).")
    split: str = option("train", "Split to read: BEIR qrels/<split>.tsv, hub split.")
    min_score: float = option(4.0, "stsb: pairs scoring at least this (0-5) become positives.")
    weak_mode: str = option("both", "weak: title-body pairs, Contriever-style crops, or both.")
    max_rows: int | None = option(None, "Read at most this many rows of the source (before the ratio).")
    mine: bool = option(
        True, "During `data build`, mine hard negatives for this source's rows that have none (data.mine sets how)."
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.sources[]: every source needs a name (a registered set or your own label).")
        if self.format not in FORMATS:
            raise ConfigError(f"data.sources[{self.name}].format={self.format!r}; use one of {', '.join(FORMATS)}.")
        if self.ratio is not None and self.ratio < 0:
            raise ConfigError(f"data.sources[{self.name}].ratio must be >= 0, got {self.ratio}.")
        if self.format in ("jsonl", "parquet", "tsv", "csv") and not self.instruction and "instruction" not in self.columns:
            raise ConfigError(
                f"data.sources[{self.name}] ({self.format}) needs an instruction, or columns.instruction "
                "naming a column that holds one."
            )
        if self.weak_mode not in ("title", "crops", "both"):
            raise ConfigError(f"data.sources[{self.name}].weak_mode must be title, crops or both.")


@dataclass
class MineConfig:
    """Hard-negative mining: in `data build` for sources whose rows lack negatives, and `rayembed mine`."""

    in_build: bool = option(
        True,
        "`data build` mines negatives for every source whose rows have none (within that source's own "
        "documents; a source opts out with mine: false). One source's rows are held in memory while it is mined.",
    )

    retriever: str = option("bm25", "bm25, or a saved embedder folder / registered model name to encode with.")
    top_k: int = option(100, "Candidates retrieved per query (the paper: top 100).")
    skip_top: int = option(0, "Drop this many top results after removing positives (likely false negatives).")
    num_negatives: int = option(1, "Negatives sampled per query from the remaining candidates.")
    max_positive_ratio: float = option(
        0.95,
        "False-negative filter (NV-Retriever): drop candidates scoring above this fraction of the row's "
        "positive's score. 0: off.",
    )
    batch_size: int = option(64, "Encoding batch size (texts) for an embedder retriever.")
    max_length: int = option(256, "Max tokens per text when encoding with an embedder.")
    engine: str = option(
        "local",
        "Where an embedder retriever runs: local (in this process) or ray (the documents are indexed by "
        "the distributed index build on the encoder actor pool that index.encode configures, each shard "
        "searched by its own task).",
    )
    work_dir: str | None = option(
        None,
        "engine=ray: where the mining corpus and its index are written (a folder every node sees, or a "
        "URI such as s3://bucket/mine-work). Empty: <output>.work beside the output file.",
    )
    shard_size: int = option(50_000, "engine=ray: documents per index shard (one encoding and one search task each).")

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"data.mine.engine={self.engine!r}: choose local or ray.")
        if self.shard_size <= 0:
            raise ConfigError("data.mine.shard_size must be positive.")
        if self.top_k <= 0 or self.num_negatives <= 0:
            raise ConfigError("data.mine.top_k and data.mine.num_negatives must be positive.")
        if self.skip_top < 0 or self.skip_top >= self.top_k:
            raise ConfigError(f"data.mine.skip_top={self.skip_top} must be in [0, top_k={self.top_k}).")
        if not 0.0 <= self.max_positive_ratio <= 1.0:
            raise ConfigError(
                f"data.mine.max_positive_ratio={self.max_positive_ratio} must be in [0, 1] (0.95 drops candidates "
                "within 5% of the positive's score; 0 turns the filter off)."
            )


@dataclass
class StreamConfig:
    """How the mix streams into training (read by the trainer)."""

    num_negatives: int = option(1, "Hard negatives per example in a batch (the paper: 1).")
    homogeneous_batches: bool = option(False, "Draw each batch from one source (LLM2Vec/BGE style).")
    shuffle_buffer_rows: int = option(1024, "Per-worker seeded shuffle buffer, in rows (0: off).")
    tokenize_batch_rows: int = option(256, "Rows per tokenisation task.")
    tokenize_num_cpus: float = option(0.5, "CPUs each tokenisation task reserves (fractional on small machines).")
    prefetch_batches: int = option(2, "Batches prefetched in each worker.")
    instructions: bool = option(
        True, "Put each row's instruction on its query (E5). False trains without instructions (an ablation)."
    )

    def __post_init__(self) -> None:
        if self.num_negatives < 0:
            raise ConfigError("data.stream.num_negatives must be >= 0.")
        if self.tokenize_num_cpus <= 0:
            raise ConfigError("data.stream.tokenize_num_cpus must be positive, e.g. 0.5.")


@dataclass
class DataConfig:
    """Settings for the data stage: sources, mixing, mining and streaming."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/data.")
    sources: list[SourceConfig] = option(help="Training sources (see the section docstring).", factory=list)
    val_fraction: float = option(0.01, "Fraction of the mix held out for validation (by a stable hash).")
    dedup: bool = option(True, "Drop rows whose (query, positive) text repeats, across sources.")
    shuffle: bool = option(True, "Shuffle the mix on disk (seeded by the top-level seed).")
    shuffle_buckets: int = option(16, "Buckets of the on-disk shuffle; memory holds one bucket at a time.")
    shard_rows: int = option(50_000, "Rows per output Parquet shard.")
    max_bad_fraction: float = option(0.05, "Fail a source when more than this fraction of its rows is bad.")
    mine: MineConfig = option(help="Hard-negative mining.", factory=MineConfig)
    stream: StreamConfig = option(help="Streaming into training.", factory=StreamConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}.")
        if self.shard_rows <= 0 or self.shuffle_buckets <= 0:
            raise ConfigError("data.shard_rows and data.shuffle_buckets must be positive.")
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"data.sources has duplicate names {sorted(dup)}; give each source its own name.")

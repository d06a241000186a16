"""The ``index`` section: which corpus to encode, how to encode it on Ray Data, and the FAISS shards.

Example (a recipe fragment)::

    index:
      corpus: msmarco-subset/corpus.jsonl     # relative paths resolve against data_dir
      format: beir
      index_type: ivf_flat
      storage: fp16
      shard_size: 100000
      encode: {min_actors: 1, max_actors: 4, num_cpus_per_actor: 0.5, batch_size: 64}
      parts: [dense, bm25]                    # FAISS shards plus a BM25 index beside them

Compact vectors (the sentence-transformers quantisation recipe)::

    index:
      storage: binary       # sign bits of the centred vectors: 32x smaller than fp32 in memory
      rescore_k: 40         # re-score the top 40 Hamming candidates with the float32 vectors on disk
      dims: 256             # Matryoshka: keep the first 256 coordinates, re-normalised

``storage``: ``fp32``, ``fp16``, ``sq8`` (8-bit scalar quantiser) or ``binary`` (faiss
``IndexBinaryFlat`` / ``IndexBinaryIVF`` over the sign bits of each vector less the corpus mean;
index_type flat or ivf_flat, and a dimension divisible by 8). ``sq8`` and ``binary`` keep each
shard's float32 vectors on disk beside it (``shards/shard-NNNNN.npy``, memory-mapped at search,
read only for the candidates) and re-score the top ``rescore_k`` candidates with them, so recall
stays close to float32: empty (the default) means ``4 * k`` for a top-k search, 0 turns rescoring
off and keeps no float copy (the compact scores are returned: SQ8 inner products, or
``dims - 2 * hamming`` for binary), a number N re-scores max(N, k). ``ShardedIndex.search`` takes
``rescore_k=`` per query. ``dims`` builds the index over the first ``dims`` coordinates of each
vector, re-normalised; the manifest records it and search cuts full-size queries the same way.

``parts`` lists what is built beside the id map: ``dense`` (FAISS shards), ``bm25`` (needs no
model; ``parts: [bm25]`` alone is a BM25-only index), ``sparse`` and ``multivector`` (the
embedder's learned heads, ``model.heads.*``). Search them with ``rayembed.search.HybridSearcher``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayembed.config.base import ConfigError, option

INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")
STORAGES = ("fp32", "fp16", "sq8", "binary")
INDEX_PARTS = ("dense", "bm25", "sparse", "multivector")


@dataclass
class BM25Config:
    """BM25 (bm25s, Lucene scoring) and its tokenisation; shared by index.bm25 and eval.bm25."""

    k1: float = option(1.5, "BM25 k1 (term-frequency saturation).")
    b: float = option(0.75, "BM25 b (length normalisation).")
    stopwords: str = option("en", "bm25s stopword list ('en'), or 'none'.")
    stemmer: str = option("english", "PyStemmer algorithm ('english'), or 'none'.")

    def __post_init__(self) -> None:
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ConfigError(f"bm25: need k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}.")


@dataclass
class EncodeConfig:
    """The autoscaling pool of encoder actors (Ray Data ``map_batches`` over an ActorPoolStrategy)."""

    min_actors: int = option(1, "Smallest encoder actor pool; the pool scales between min and max.")
    max_actors: int = option(2, "Largest encoder actor pool. On a cluster the autoscaler adds nodes for them.")
    num_cpus_per_actor: float = option(
        0.5, "Logical CPUs each encoder actor reserves. Fractional on a laptop so readers are not starved."
    )
    num_gpus_per_actor: float = option(0.0, "GPUs each encoder actor reserves (1 on a GPU cluster).")
    resources_per_actor: dict[str, float] = option(
        help="Custom Ray resources each encoder actor reserves, e.g. {encoder: 1} to place the pool on a "
        "node type of the autoscaler that offers them.",
        factory=dict,
    )
    batch_size: int = option(64, "Documents per encoder call (rows per map_batches batch).")
    rows_per_block: int = option(
        512, "Rows per Ray Data block after repartition; small blocks spread work over the actors."
    )
    max_length: int | None = option(None, "Maximum document length in tokens. Empty: the embedder's own.")
    log_every_s: float = option(10.0, "Seconds between progress/throughput log lines.")

    def __post_init__(self) -> None:
        if self.min_actors < 1:
            raise ConfigError(f"index.encode.min_actors must be at least 1, got {self.min_actors}.")
        if self.max_actors < self.min_actors:
            raise ConfigError(
                f"index.encode.max_actors={self.max_actors} is below min_actors={self.min_actors}; "
                "raise max_actors or lower min_actors."
            )
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ConfigError("index.encode.num_cpus_per_actor and num_gpus_per_actor must be >= 0.")
        if self.batch_size < 1 or self.rows_per_block < 1:
            raise ConfigError("index.encode.batch_size and rows_per_block must be at least 1.")


@dataclass
class IndexConfig:
    """Corpus encoding into verified FAISS shards with global ids, and search defaults."""

    output_dir: str | None = option(None, "Where the index is written. Empty: <run_dir>/index.")
    corpus: str | None = option(
        None,
        "Corpus file or folder. A relative path resolves against data_dir first, then the working "
        "directory. A BEIR folder means its corpus.jsonl.",
    )
    format: Literal["auto", "jsonl", "parquet", "beir", "smart"] = option(
        "auto", "Corpus format. auto: from the suffix (.jsonl/.parquet), BEIR for a folder with corpus.jsonl."
    )
    id_field: str | None = option(None, "Column holding the document id. Empty: '_id', then 'id', else the row number.")
    text_field: str = option("text", "Column holding the document text.")
    title_field: str | None = option("title", "Column holding the title (optional; empty to ignore).")
    metadata_fields: list[str] = option(
        help="Extra columns kept in the id map as metadata (JSON).", factory=list
    )
    include_title: bool = option(True, "Encode 'title text' rather than the text alone.")
    doc_instruction: str | None = option(
        None, "Instruction put on documents too (symmetric tasks). Empty: documents get none."
    )
    limit: int | None = option(None, "Index at most this many documents (smoke tests). Empty: all.")
    embedder: str | None = option(
        None, "Saved embedder folder or registered name to encode with. Empty: the model section."
    )
    index_type: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] = option(
        "flat", "FAISS index: flat (exact), ivf_flat, ivf_pq (compressed) or hnsw (graph)."
    )
    storage: Literal["fp32", "fp16", "sq8", "binary"] = option(
        "fp32", "Vector storage for flat, ivf_flat and hnsw: fp32, fp16 (half), sq8 (8-bit scalar quantiser) or "
        "binary (sign bits of the centred vectors, Hamming search; flat or ivf_flat, dimension divisible by 8)."
    )
    rescore_k: int | None = option(
        None, "sq8 and binary: candidates re-scored with the float32 vectors kept on disk beside each shard. "
        "Empty: 4*k for a top-k search; 0: no rescoring and no float copy; N: max(N, k). Settable per query."
    )
    dims: int | None = option(
        None, "Matryoshka truncation: index the first dims coordinates of each vector, re-normalised; queries "
        "are cut the same way at search. Empty: every coordinate."
    )
    nlist: int = option(0, "IVF lists. 0: about 4*sqrt(N), capped so each list gets 39 training vectors.")
    nprobe: int = option(16, "IVF lists probed per query (default; settable per query).")
    pq_m: int = option(0, "IVF-PQ sub-quantisers (bytes per vector at 8 bits); must divide dim. 0: largest divisor <= 64.")
    pq_nbits: int = option(8, "Bits per PQ code.")
    hnsw_m: int = option(32, "HNSW graph degree.")
    ef_construction: int = option(80, "HNSW efConstruction (build-time beam).")
    ef_search: int = option(128, "HNSW efSearch (default; settable per query).")
    train_size: int = option(0, "Vectors sampled to train IVF/PQ/SQ. 0: 64 per list, at least 10k for PQ, at most 200k.")
    shard_size: int = option(100_000, "Documents per shard.")
    num_shards: int = option(0, "Fixed number of shards (overrides shard_size). 0: from shard_size.")
    use_gpu: Literal["auto", "true", "false"] = option(
        "auto", "Train and search on GPU where faiss has GPU support and a GPU exists."
    )
    verify: bool = option(True, "Check sha256 of every shard when opening an index.")
    overwrite: bool = option(
        False, "Delete an existing, different build in output_dir instead of refusing to resume it."
    )
    encode: EncodeConfig = option(help="Encoder actor pool.", factory=EncodeConfig)
    parts: list[str] = option(
        help="What to build: dense (FAISS shards), bm25 (no model needed; alone = a BM25-only index), "
        "sparse and multivector (the embedder's learned heads; they need dense too).",
        factory=lambda: ["dense"],
    )
    bm25: BM25Config = option(help="BM25 part settings (index.parts with bm25).", factory=BM25Config)

    def __post_init__(self) -> None:
        if self.storage != "fp32" and self.index_type == "ivf_pq":
            raise ConfigError(
                f"index.storage={self.storage} does not apply to ivf_pq (PQ is its own compression); "
                "use storage: fp32 with ivf_pq."
            )
        if self.storage == "binary" and self.index_type not in ("flat", "ivf_flat"):
            raise ConfigError(
                f"index.storage=binary works with index_type flat or ivf_flat (faiss IndexBinaryFlat, IndexBinaryIVF), "
                f"not {self.index_type}; set index.index_type=flat (or ivf_flat), or choose storage: sq8."
            )
        if self.rescore_k is not None:
            if self.rescore_k < 0:
                raise ConfigError(f"index.rescore_k must be >= 0 (0: no rescoring) or empty, got {self.rescore_k}.")
            if self.rescore_k > 0 and self.storage not in ("sq8", "binary"):
                raise ConfigError(
                    f"index.rescore_k={self.rescore_k} re-scores compact codes, and storage {self.storage} has none; "
                    "use storage: sq8 or binary with it, or leave index.rescore_k empty."
                )
        if self.dims is not None:
            if self.dims < 1:
                raise ConfigError(f"index.dims must be a positive number of leading coordinates or empty, got {self.dims}.")
            if self.storage == "binary" and self.dims % 8:
                raise ConfigError(
                    f"index.dims={self.dims} with storage binary: the sign bits are packed 8 to a byte, so dims must "
                    f"be divisible by 8; use e.g. index.dims={max(8, self.dims - self.dims % 8)}."
                )
        if self.shard_size < 1:
            raise ConfigError(f"index.shard_size must be at least 1, got {self.shard_size}.")
        if self.num_shards < 0 or self.nlist < 0 or self.pq_m < 0 or self.train_size < 0:
            raise ConfigError("index.num_shards, nlist, pq_m and train_size must be >= 0 (0 means auto).")
        if self.nprobe < 1 or self.ef_search < 1 or self.hnsw_m < 2 or self.ef_construction < 1:
            raise ConfigError("index.nprobe, ef_search, ef_construction must be >= 1 and hnsw_m >= 2.")
        if not 1 <= self.pq_nbits <= 16:
            raise ConfigError(f"index.pq_nbits must be in 1..16, got {self.pq_nbits}; 8 is usual.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"index.limit must be positive or empty, got {self.limit}.")
        unknown = [p for p in self.parts if p not in INDEX_PARTS]
        if unknown or not self.parts:
            raise ConfigError(f"index.parts={self.parts}: choose one or more of {list(INDEX_PARTS)}, e.g. [dense, bm25].")
        model_parts = [p for p in self.parts if p in ("sparse", "multivector")]
        if model_parts and "dense" not in self.parts:
            raise ConfigError(
                f"index.parts={self.parts}: {model_parts} are encoded by the embedder and need dense beside them; "
                f"write index.parts=[dense, {', '.join(model_parts)}]. Only bm25 stands alone."
            )
        if not self.text_field:
            raise ConfigError("index.text_field is empty; name the column that holds the document text.")

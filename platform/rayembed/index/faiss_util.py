"""FAISS index construction from a small spec, training, GPU placement and query-time parameters.

Every index is inner product over L2-normalised vectors (cosine). Each type is built with
``faiss.index_factory`` and wrapped so that ``add_with_ids`` stores *global* ids:
IVF types take ids natively; flat, scalar-quantised and HNSW types get an ``IndexIDMap``.

``storage: binary`` builds faiss *binary* indexes (``faiss.index_binary_factory``: ``BFlat`` in an
``IndexBinaryIDMap``, or ``BIVF<nlist>``) over the sign bits of the vectors less the corpus mean
(the ``center``, computed once from the training sample so every shard, delta shard and query
uses the same one); they are written with ``faiss.write_index_binary``. ``sq8`` and ``binary``
indexes keep the float32 vectors beside each shard (a ``.npy``) when ``rescore_k`` is not 0, and
search re-scores the top ``rescore_k`` candidates with them. ``dims`` keeps the first ``dims``
coordinates of every vector, re-normalised (Matryoshka truncation); queries are cut the same way.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRIC = "inner_product"
#: Storages whose shards can keep their float32 vectors for rescoring (``rescore_k``).
RESCORED_STORAGES = ("sq8", "binary")
#: IndexSpec fields left out of its dict at their default (None): plans keyed on older specs still match.
OPTIONAL_FIELDS = ("rescore_k", "dims")


@dataclass
class IndexSpec:
    """What to build. Resolved (no 'auto' zeros left) once the corpus size and dim are known."""

    index_type: str = "flat"
    storage: str = "fp32"
    nlist: int = 0
    nprobe: int = 16
    pq_m: int = 0
    pq_nbits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int = 0
    rescore_k: int | None = None
    dims: int | None = None

    @classmethod
    def from_config(cls, index_cfg: Any) -> IndexSpec:
        return cls(**{k: getattr(index_cfg, k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``rescore_k`` and ``dims`` only when set, so the plans and
        manifests of indexes built without them read (and resume) as before."""
        d = asdict(self)
        for key in OPTIONAL_FIELDS:
            if d[key] is None:
                del d[key]
        return d

    @property
    def trained(self) -> bool:
        """Whether this type needs a training sample before vectors can be added (binary: for its
        centre, the mean of the sample)."""
        return self.index_type in ("ivf_flat", "ivf_pq") or self.storage in ("sq8", "binary")

    @property
    def binary(self) -> bool:
        """Whether the shards are faiss binary indexes (sign bits, Hamming distance)."""
        return self.storage == "binary"

    @property
    def keeps_floats(self) -> bool:
        """Whether each shard keeps its float32 vectors beside it, for rescoring (sq8 and binary
        unless ``rescore_k`` is 0)."""
        return self.storage in RESCORED_STORAGES and self.rescore_k != 0

    def index_dim(self, dim: int) -> int:
        """The stored dimension for vectors of ``dim`` coming from the embedder (``dims`` or ``dim``)."""
        return int(self.dims or dim)

    def default_rescore_k(self, k: int) -> int:
        """Candidates re-scored for a top-``k`` search when a query does not say: ``rescore_k`` as
        set, else ``4 * k`` where float vectors are kept, else 0 (no rescoring)."""
        if self.rescore_k is not None:
            return int(self.rescore_k)
        return 4 * int(k) if self.keeps_floats else 0

    def resolve(self, ntotal: int, dim: int) -> IndexSpec:
        """Fill the automatic values (nlist, pq_m, train_size) for ``ntotal`` vectors of ``dim``
        (the embedder's dimension; ``dims`` must not exceed it)."""
        from rayembed.config import ConfigError

        spec = IndexSpec(**self.to_dict())
        if spec.dims is not None and not 1 <= spec.dims <= dim:
            raise ConfigError(
                f"index.dims={spec.dims} must be between 1 and the embedder's dimension {dim}; lower it "
                "(or leave it empty to keep every coordinate)."
            )
        dim = spec.index_dim(dim)
        if spec.binary and dim % 8:
            raise ConfigError(
                f"index.storage=binary packs 8 sign bits per byte and needs a dimension divisible by 8, but the "
                f"vectors have {dim}; set index.dims to a multiple of 8 (e.g. {dim - dim % 8 or 8}) or use "
                "storage: sq8."
            )
        if spec.index_type in ("ivf_flat", "ivf_pq"):
            if spec.nlist == 0:
                spec.nlist = max(1, min(int(4 * math.sqrt(max(ntotal, 1))), ntotal // 39 or 1))
            if spec.nlist > ntotal:
                raise ConfigError(
                    f"index.nlist={spec.nlist} needs at least that many vectors to train, but the corpus "
                    f"has {ntotal}; lower index.nlist (0 picks one) or use index_type: flat."
                )
            spec.nprobe = min(spec.nprobe, spec.nlist)
        if spec.index_type == "ivf_pq":
            if spec.pq_m == 0:
                spec.pq_m = max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)
            if dim % spec.pq_m:
                raise ConfigError(f"index.pq_m={spec.pq_m} must divide the dimension {dim}; pick a divisor.")
        if spec.trained and spec.train_size == 0:
            want = 64 * max(spec.nlist, 1)
            if spec.index_type == "ivf_pq":
                want = max(want, 40 * (1 << spec.pq_nbits))
            if spec.storage in ("sq8", "binary"):
                want = max(want, 10_000)
            spec.train_size = min(ntotal, max(want, 1000), 200_000)
        return spec

    def factory_string(self) -> str:
        """The ``faiss.index_factory`` string of the inner index (without the id map); binary
        storage gives the ``faiss.index_binary_factory`` string (``BFlat``, ``BIVF<nlist>``)."""
        if self.binary:
            if self.index_type == "flat":
                return "BFlat"
            if self.index_type == "ivf_flat":
                return f"BIVF{self.nlist}"
            raise ValueError(f"storage binary works with index_type flat or ivf_flat, not {self.index_type!r}.")
        store = {"fp32": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}[self.storage]
        if self.index_type == "flat":
            return store
        if self.index_type == "ivf_flat":
            return f"IVF{self.nlist},{store}"
        if self.index_type == "ivf_pq":
            # "np": no polysemous training, which is slow and only helps Hamming-filtered search.
            return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np"
        if self.index_type == "hnsw":
            return f"HNSW{self.hnsw_m},{store}"
        raise ValueError(f"Unknown index type {self.index_type!r}; use flat, ivf_flat, ivf_pq or hnsw.")


def new_index(spec: IndexSpec, dim: int):
    """An empty (untrained where that applies) index of stored dimension ``dim`` that accepts global ids."""
    import faiss

    if spec.binary:
        inner = faiss.index_binary_factory(dim, spec.factory_string())
        return inner if spec.index_type == "ivf_flat" else faiss.IndexBinaryIDMap(inner)
    inner = faiss.index_factory(dim, spec.factory_string(), faiss.METRIC_INNER_PRODUCT)
    if spec.index_type == "hnsw":
        faiss.downcast_index(inner).hnsw.efConstruction = spec.ef_construction
    if spec.index_type in ("ivf_flat", "ivf_pq"):
        return inner
    return faiss.IndexIDMap(inner)


def gpu_available(use_gpu: str | bool = "auto") -> bool:
    """True when faiss was built with GPU support, a GPU exists, and ``use_gpu`` allows it."""
    if use_gpu in (False, "false"):
        return False
    import faiss

    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu in (True, "true") and not has:
        logger.warning("use_gpu=true but faiss has no GPU support or sees no GPU; using the CPU.")
    return has


def is_binary(index) -> bool:
    """Whether ``index`` is a faiss binary index (codes of bits, Hamming distance)."""
    import faiss

    return isinstance(index, faiss.IndexBinary)


def prepare_vectors(vectors: np.ndarray, spec: IndexSpec) -> np.ndarray:
    """The vectors as stored: float32, contiguous, cut to ``spec.dims`` and re-normalised if set."""
    from rayembed.index.quantize import truncate

    x = np.asarray(vectors, dtype=np.float32)  # (n, dim)
    if spec.dims is not None and spec.dims != x.shape[1]:
        return truncate(x, int(spec.dims))
    return np.ascontiguousarray(x)


def corpus_center(vectors: np.ndarray) -> np.ndarray:
    """The mean (dim,) float32 of a sample of (stored) vectors: the binary centre."""
    return np.asarray(np.asarray(vectors, dtype=np.float64).mean(axis=0), dtype=np.float32)


def center_of(record: Any) -> np.ndarray | None:
    """The centre recorded in a plan or manifest (a list of floats), as float32; None if absent."""
    return None if record is None else np.asarray(record, dtype=np.float32)


def encode_binary(vectors: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """Packed sign bits (n, dim/8) uint8 of ``vectors`` (n, dim) less ``center``."""
    from rayembed.index.quantize import binary_codes

    if center is None:
        raise ValueError("A binary index needs its centre (the corpus mean); it is missing from the manifest.")
    return binary_codes(np.asarray(vectors, dtype=np.float32) - center)


def add_vectors(index, vectors: np.ndarray, ids: np.ndarray, center: np.ndarray | None = None) -> None:
    """Add stored ``vectors`` (n, d) under global ``ids``; a binary index gets their sign codes."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if is_binary(index):
        index.add_with_ids(encode_binary(vectors, center), ids)
    else:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)


def train_index(index, vectors: np.ndarray, use_gpu: str | bool = "auto", center: np.ndarray | None = None) -> None:
    """Train ``index`` on ``vectors`` (n, d); IVF clustering runs on the GPU where one is available.

    The trained result is a CPU index either way, so shards and manifests are identical. A binary
    IVF index trains (on the CPU) on the sign codes of ``vectors`` less ``center``.
    """
    import faiss

    if index.is_trained:
        return
    if is_binary(index):
        codes = encode_binary(vectors, center)
        logger.info("Training %s on the CPU with %d codes", type(index).__name__, len(codes))
        index.train(codes)
        return
    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, d)
    ivf = None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        pass
    if ivf is not None and gpu_available(use_gpu):
        # faiss's own recipe (bench_ivf): k-means assignment on a GPU flat index.
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        logger.info("Training %s on the GPU with %d vectors", type(index).__name__, len(x))
    else:
        logger.info("Training %s on the CPU with %d vectors", type(faiss.downcast_index(index)).__name__, len(x))
    index.train(x)
    if ivf is not None:
        ivf.clustering_index = None


def to_gpu(index, use_gpu: str | bool = "auto"):
    """A GPU copy of ``index`` where supported (flat, IVF); otherwise ``index`` itself (binary too)."""
    if is_binary(index) or not gpu_available(use_gpu):
        return index
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # HNSW has no GPU version
        logger.info("Keeping %s on the CPU (%s)", type(index).__name__, str(e).splitlines()[0])
        return index


def inner_index(index):
    """The index inside an IndexIDMap (or the index itself), downcast to its concrete type."""
    import faiss

    if is_binary(index):
        idx = faiss.downcast_IndexBinary(index)
        if isinstance(idx, (faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)):
            idx = faiss.downcast_IndexBinary(idx.index)
        return idx
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        idx = faiss.downcast_index(idx.index)
    return idx


def set_search_params(index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set nprobe (IVF) and efSearch (HNSW) on ``index`` in place; other types ignore them."""

    if nprobe is not None:
        _set_nprobe(index, int(nprobe))
    if ef_search is not None:
        inner = inner_index(index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(ef_search)


def _set_nprobe(index, nprobe: int) -> None:
    """nprobe on every IVF index inside ``index``: CPU or GPU, alone or in replicas/shards (what
    ``index_cpu_to_all_gpus`` returns with several GPUs). Types without nprobe (flat, HNSW) are
    left alone; a GPU IVF index that refuses it raises, never silently searching with another."""
    import faiss

    if is_binary(index):
        inner = inner_index(index)
        if isinstance(inner, faiss.IndexBinaryIVF):
            inner.nprobe = nprobe
        return
    idx = faiss.downcast_index(index) if not type(index).__name__.startswith("Gpu") else index
    if isinstance(idx, (faiss.IndexReplicas, faiss.IndexShards)):
        for i in range(idx.count()):
            _set_nprobe(idx.at(i), nprobe)
        return
    try:
        faiss.extract_index_ivf(idx).nprobe = nprobe
        return
    except RuntimeError:
        pass
    name = type(idx).__name__
    if name.startswith("Gpu") and "IVF" in name:
        faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", nprobe)


def serialized_size(index) -> int:
    """Bytes ``faiss.write_index`` (``write_index_binary``) produces for ``index``, counted without keeping them."""
    import faiss

    total = 0

    def count(data: bytes) -> int:
        nonlocal total
        total += len(data)
        return len(data)

    write = faiss.write_index_binary if is_binary(index) else faiss.write_index
    write(index, faiss.PyCallbackIOWriter(count))
    return total


def write_index_verified(index, path: str | os.PathLike) -> None:
    """``faiss.write_index`` (``write_index_binary`` for a binary index) to ``path``, then prove the
    file whole before anyone records it.

    FAISS only prints an ``fclose`` error (a full disk shows up there), so a truncated file can
    look written. The file must have exactly the serialized size and read back with the same
    number of vectors; otherwise :class:`IndexIntegrityError` names the file and the likely cause.
    """
    import faiss

    from rayembed.index.manifest import IndexIntegrityError

    path = os.fspath(path)
    binary = is_binary(index)
    (faiss.write_index_binary if binary else faiss.write_index)(index, path)
    expected, size = serialized_size(index), os.path.getsize(path)
    if size != expected:
        raise IndexIntegrityError(
            f"FAISS wrote {size} of {expected} bytes to {path}: the file is truncated (is the disk "
            "full?). Free space and run the build again; finished shards are kept."
        )
    try:
        back = (faiss.read_index_binary if binary else faiss.read_index)(path)
    except RuntimeError as e:
        raise IndexIntegrityError(f"{path} cannot be read back after writing ({str(e).splitlines()[0]}); "
                                  "check the disk and run the build again.") from e
    if back.ntotal != index.ntotal or back.d != index.d:
        raise IndexIntegrityError(
            f"{path} reads back as {back.ntotal} vectors of dim {back.d}, but {index.ntotal} of dim "
            f"{index.d} were written; check the disk and run the build again."
        )


def write_floats_verified(vectors: np.ndarray, path: str | os.PathLike) -> None:
    """The float32 rescoring copy (n, d) as ``.npy`` at ``path``, read back (memory-mapped) and
    checked for its shape and size before anyone records it."""
    from rayembed.index.manifest import IndexIntegrityError

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    with open(path, "wb") as f:
        np.save(f, x, allow_pickle=False)
    try:
        back = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise IndexIntegrityError(f"{path} cannot be read back after writing ({e}); check the disk and rerun.") from e
    if back.shape != x.shape or back.dtype != np.float32 or os.path.getsize(path) != back.offset + x.nbytes:
        raise IndexIntegrityError(
            f"{path} reads back as {back.shape} {back.dtype} in {os.path.getsize(path)} bytes, but {x.shape} float32 "
            "were written: the file is truncated (is the disk full?). Free space and run the build again."
        )
    del back


def selector_params(index, sel, *, nprobe: int | None = None, ef_search: int | None = None):
    """FAISS search parameters of the right type for ``index`` carrying the IDSelector ``sel``.

    IVF indexes need ``SearchParametersIVF`` (they refuse the base type), HNSW takes its efSearch
    from ``SearchParametersHNSW``; an ``IndexIDMap`` translates the selector to its global ids.
    ``nprobe`` / ``ef_search`` default to the values set on the index.
    """
    import faiss

    if is_binary(index):  # IndexBinaryFlat takes a selector; IndexBinaryIVF takes no parameters at all
        return faiss.SearchParameters(sel=sel)
    try:
        ivf = faiss.extract_index_ivf(index)
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or ivf.nprobe))
    except RuntimeError:
        pass
    inner = inner_index(index)
    if hasattr(inner, "hnsw"):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef_search or inner.hnsw.efSearch))
    return faiss.SearchParameters(sel=sel)


def bitmap_selector(mask: np.ndarray):
    """``(selector, bitmap)``: a FAISS IDSelectorBitmap accepting the ids where ``mask`` (n,) is True.

    Keep the returned bitmap referenced as long as the selector: FAISS borrows its memory.
    """
    import faiss

    bitmap = np.packbits(np.asarray(mask, dtype=bool), bitorder="little")  # (ceil(n/8),) uint8
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)), bitmap

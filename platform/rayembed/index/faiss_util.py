"""FAISS index construction from a small spec, training, GPU placement and query-time parameters.

Every index is inner product over L2-normalised vectors (cosine). Each type is built with
``faiss.index_factory`` and wrapped so that ``add_with_ids`` stores *global* ids:
IVF types take ids natively; flat, scalar-quantised and HNSW types get an ``IndexIDMap``.
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

    @classmethod
    def from_config(cls, index_cfg: Any) -> IndexSpec:
        return cls(**{k: getattr(index_cfg, k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def trained(self) -> bool:
        """Whether this type needs a training sample before vectors can be added."""
        return self.index_type in ("ivf_flat", "ivf_pq") or self.storage == "sq8"

    def resolve(self, ntotal: int, dim: int) -> IndexSpec:
        """Fill the automatic values (nlist, pq_m, train_size) for ``ntotal`` vectors of ``dim``."""
        from rayembed.config import ConfigError

        spec = IndexSpec(**self.to_dict())
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
            if spec.storage == "sq8":
                want = max(want, 10_000)
            spec.train_size = min(ntotal, max(want, 1000), 200_000)
        return spec

    def factory_string(self) -> str:
        """The ``faiss.index_factory`` string of the inner index (without the id map)."""
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
    """An empty (untrained where that applies) index that accepts global ids."""
    import faiss

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


def train_index(index, vectors: np.ndarray, use_gpu: str | bool = "auto") -> None:
    """Train ``index`` on ``vectors`` (n, d); IVF clustering runs on the GPU where one is available.

    The trained result is a CPU index either way, so shards and manifests are identical.
    """
    import faiss

    if index.is_trained:
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
    """A GPU copy of ``index`` where supported (flat, IVF); otherwise ``index`` itself."""
    if not gpu_available(use_gpu):
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
    """Bytes ``faiss.write_index`` produces for ``index``, counted without keeping them."""
    import faiss

    total = 0

    def count(data: bytes) -> int:
        nonlocal total
        total += len(data)
        return len(data)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def write_index_verified(index, path: str | os.PathLike) -> None:
    """``faiss.write_index`` to ``path``, then prove the file whole before anyone records it.

    FAISS only prints an ``fclose`` error (a full disk shows up there), so a truncated file can
    look written. The file must have exactly the serialized size and read back with the same
    number of vectors; otherwise :class:`IndexIntegrityError` names the file and the likely cause.
    """
    import faiss

    from rayembed.index.manifest import IndexIntegrityError

    path = os.fspath(path)
    faiss.write_index(index, path)
    expected, size = serialized_size(index), os.path.getsize(path)
    if size != expected:
        raise IndexIntegrityError(
            f"FAISS wrote {size} of {expected} bytes to {path}: the file is truncated (is the disk "
            "full?). Free space and run the build again; finished shards are kept."
        )
    try:
        back = faiss.read_index(path)
    except RuntimeError as e:
        raise IndexIntegrityError(f"{path} cannot be read back after writing ({str(e).splitlines()[0]}); "
                                  "check the disk and run the build again.") from e
    if back.ntotal != index.ntotal or back.d != index.d:
        raise IndexIntegrityError(
            f"{path} reads back as {back.ntotal} vectors of dim {back.d}, but {index.ntotal} of dim "
            f"{index.d} were written; check the disk and run the build again."
        )


def selector_params(index, sel, *, nprobe: int | None = None, ef_search: int | None = None):
    """FAISS search parameters of the right type for ``index`` carrying the IDSelector ``sel``.

    IVF indexes need ``SearchParametersIVF`` (they refuse the base type), HNSW takes its efSearch
    from ``SearchParametersHNSW``; an ``IndexIDMap`` translates the selector to its global ids.
    ``nprobe`` / ``ef_search`` default to the values set on the index.
    """
    import faiss

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

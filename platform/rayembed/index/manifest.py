"""The on-disk protocol: ``manifest.json``, per-shard sidecars, safe path resolution, verification.

Layout of an index directory::

    manifest.json            # written last: its presence means the build is complete
    plan.json                # the build plan (corpus fingerprint, shard id ranges); used to resume
    trained.index            # the empty trained index (trained types only)
    docs/docs-00000.parquet  # id map: id, doc_id, text, title, metadata (JSON)
    shards/shard-00000.faiss # vectors of ids [id_start, id_end) under their global ids
    shards/shard-00000.json  # sidecar: rows, id range, bytes, sha256 (a shard counts only with it)
    shards/shard-00000.npy   # sq8/binary with rescoring: the shard's float32 vectors (rows, dim), in id order
    bm25/ sparse/ multivector/  # optional extra parts (see rayembed.index.lexical), in manifest["parts"]
    shards/delta-v0002-00000.faiss, docs/docs-v0002-00000.parquet  # delta shards of update version 2
    tombstones/tombstones-v0002.npy  # internal ids deleted or replaced up to version 2 (int64, sorted)

An updated index (``rayembed index update``, :mod:`rayembed.index.update`) has format_version 2:
its ``shards`` list the base shards and then the delta shards (``"delta": <version>``), whose
ids continue after the base; ``tombstones`` names the file of dead ids; ``version`` counts the
manifests written (a fresh build is version 1). Compaction writes a version-1-format manifest
again, with new base shards and no tombstones.

Compact storage (see :mod:`rayembed.index.faiss_util`): ``storage: binary`` shards are faiss
binary indexes (read with ``faiss.read_index_binary``) of the sign bits of each vector less
``manifest["center"]`` (a list of ``dim`` floats: the mean of the training sample). A shard
record's ``vectors`` (``{"file", "bytes", "sha256"}``, sq8 and binary unless ``rescore_k`` is 0)
names its float32 copy, row ``i`` holding global id ``id_start + i``, read memory-mapped to
re-score candidates. ``dim`` is the stored dimension; ``embedder_dim`` the embedder's (they differ
when ``spec["dims"]`` truncates). Manifests without these keys are fp32/fp16/sq8 indexes
without rescoring, of the embedder's own dimension.

``manifest["kind"]`` is ``"dense"`` (FAISS shards, the usual index; manifests without the key
are dense) or ``"lexical"``: a BM25-only index with the id map and the ``bm25`` part, no FAISS
shards and no embedder (``embedder`` is null). Extra parts are listed in ``manifest["parts"]``
as ``{name: record}``, every file with its size and sha256 (:func:`index_files` lists them all).
Reading an id-map part (:func:`read_docs_part`) lives here too, so every module of the index
package reads manifest files through this one and none of them imports the builder for it.

Nothing here is pickled: JSON, Parquet and ``faiss.read_index``. Every path read from a manifest
is relative and must resolve inside the index directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = "rayembed-index"
FORMAT_VERSION = 1
#: Manifests of updated indexes (delta shards, tombstones) are version 2: a reader that does not
#: know tombstones must refuse them rather than serve deleted documents.
FORMAT_VERSION_UPDATED = 2
READ_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_UPDATED)
MANIFEST = "manifest.json"
PLAN = "plan.json"
TRAINED = "trained.index"
MAX_MANIFEST_BYTES = 64 << 20
KIND_DENSE = "dense"
KIND_LEXICAL = "lexical"


class IndexIntegrityError(ValueError):
    """An index file is missing, corrupt, or does not match its manifest or the expected embedder."""


class UnsafePathError(IndexIntegrityError):
    """A path in a manifest (or a request) points outside the index directory."""


def safe_resolve(root: str | os.PathLike, rel: str, *, what: str = "path") -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, '..' and symlinks that leave ``root``."""
    root_r = Path(root).resolve()
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{what} {rel!r} in {root_r} is not a relative path string.")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(
            f"{what} {rel!r} is absolute; index files must be relative paths inside {root_r}. "
            "Refusing to read it."
        )
    if ".." in p.parts:
        raise UnsafePathError(f"{what} {rel!r} contains '..' and could leave {root_r}. Refusing to read it.")
    resolved = (root_r / p).resolve()
    if not resolved.is_relative_to(root_r):
        raise UnsafePathError(
            f"{what} {rel!r} resolves to {resolved}, outside the index directory {root_r} "
            "(a symlink out?). Refusing to read it."
        )
    return resolved


def file_record(root: Path, path: Path) -> dict[str, Any]:
    """``{"file", "bytes", "sha256"}`` of ``path``, with ``file`` relative to ``root``."""
    from rayembed.io import sha256_file

    return {
        "file": path.resolve().relative_to(root.resolve()).as_posix(),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def verify_file(root: Path, rec: dict[str, Any], *, what: str, check_hash: bool = True) -> Path:
    """Resolve ``rec['file']`` inside ``root`` and check it exists with the recorded size and sha256."""
    from rayembed.io import sha256_file

    path = safe_resolve(root, rec.get("file"), what=what)
    if not path.is_file():
        raise IndexIntegrityError(
            f"{what} {path} is missing. The index in {root} is incomplete: rerun `rayembed index` "
            "to rebuild the missing shards."
        )
    size = path.stat().st_size
    if "bytes" in rec and size != rec["bytes"]:
        raise IndexIntegrityError(
            f"{what} {path} has {size} bytes but the manifest records {rec['bytes']} (truncated or "
            "replaced). Delete it and rerun `rayembed index` to rebuild it."
        )
    if check_hash and "sha256" in rec and sha256_file(path) != rec["sha256"]:
        raise IndexIntegrityError(
            f"{what} {path} fails its sha256 check (corrupt or modified). Delete it and rerun "
            "`rayembed index` to rebuild it."
        )
    return path


def is_valid(root: Path, rec: dict[str, Any] | None) -> bool:
    """Like :func:`verify_file` but answers True/False (used when resuming a build)."""
    if not rec:
        return False
    try:
        verify_file(root, rec, what="file")
        return True
    except IndexIntegrityError:
        return False


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise IndexIntegrityError(f"{what} {path} does not exist. Build the index first with `rayembed index`.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise IndexIntegrityError(f"{what} {path} is larger than {MAX_MANIFEST_BYTES >> 20} MB; refusing to parse it.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexIntegrityError(f"{what} {path} is not valid JSON ({e}); rebuild the index.") from e
    if not isinstance(data, dict):
        raise IndexIntegrityError(f"{what} {path} must hold a JSON object.")
    return data


def kind_of(m: dict[str, Any]) -> str:
    """``"dense"`` or ``"lexical"`` (see the module docstring); older manifests are dense."""
    return m.get("kind", KIND_DENSE)


def check_manifest(m: dict[str, Any], path: Path) -> None:
    """Structural checks: format, required keys, contiguous shard id ranges summing to ntotal."""
    if m.get("format") != FORMAT:
        raise IndexIntegrityError(f"{path} is not a rayembed index manifest (format={m.get('format')!r}).")
    if m.get("format_version") not in READ_VERSIONS:
        raise IndexIntegrityError(
            f"{path} has format_version {m.get('format_version')!r}; this rayembed reads {list(READ_VERSIONS)}. "
            "Rebuild the index with this version."
        )
    kind = kind_of(m)
    if kind not in (KIND_DENSE, KIND_LEXICAL):
        raise IndexIntegrityError(f"{path} has kind {kind!r}; this rayembed reads 'dense' and 'lexical'.")
    dense = kind == KIND_DENSE
    required = ("dim", "metric", "index_type", "ntotal", "shards", "spec", "embedder") if dense else ("ntotal", "shards")
    for key in required:
        if key not in m:
            raise IndexIntegrityError(f"Manifest {path} lacks the key '{key}'; it is damaged. Rebuild the index.")
    parts = m.get("parts") or {}
    if not isinstance(parts, dict):
        raise IndexIntegrityError(f"Manifest {path}: 'parts' must be an object; it is damaged. Rebuild the index.")
    if not dense and "bm25" not in parts:
        raise IndexIntegrityError(f"Manifest {path} is a lexical index without its bm25 part. Rebuild the index.")
    expect = 0
    shard_keys = ("file", "rows", "id_start", "id_end", "sha256", "bytes", "docs") if dense else (
        "rows", "id_start", "id_end", "docs")
    for i, s in enumerate(m["shards"]):
        for key in shard_keys:
            if key not in s:
                raise IndexIntegrityError(f"Manifest {path}: shard {i} lacks '{key}'. Rebuild the index.")
        if s["id_start"] != expect or s["id_end"] - s["id_start"] != s["rows"]:
            raise IndexIntegrityError(
                f"Manifest {path}: shard {i} ({s.get('file') or s['docs'].get('file')}) covers ids "
                f"[{s['id_start']}, {s['id_end']}) with "
                f"{s['rows']} rows, which does not continue from id {expect}. The manifest does not match "
                "its shards; rebuild the index."
            )
        expect = s["id_end"]
    if expect != m["ntotal"]:
        raise IndexIntegrityError(
            f"Manifest {path}: shards hold {expect} vectors but ntotal is {m['ntotal']}. Rebuild the index."
        )


def identity_of(embedder: Any) -> dict[str, Any] | None:
    """An embedder identity dict from an Embedder, a dict, or None."""
    if embedder is None:
        return None
    if isinstance(embedder, dict):
        return embedder
    if hasattr(embedder, "identity"):
        return embedder.identity()
    raise TypeError(f"expected an Embedder or an identity dict, got {type(embedder).__name__}")


def same_embedder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two identities match when their config and weights hashes match (paths may differ by machine)."""
    keys = [k for k in ("config_sha256", "weights_sha256") if a.get(k) or b.get(k)]
    if not keys:
        return a.get("path") == b.get("path")
    return all(a.get(k) == b.get(k) for k in keys)


def part_files(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file record of a part record."""
    files = list(rec.get("files", []))
    for s in rec.get("shards", []):
        files += [s[k] for k in ("file", "vectors", "offsets") if k in s]
    return files


def index_files(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file record a manifest lists: shards (and their float copies), id maps, the trained
    index and the parts' files."""
    files: list[dict[str, Any]] = []
    for s in m.get("shards", []):
        if "file" in s and "sha256" in s:
            files.append({k: s[k] for k in ("file", "bytes", "sha256")})
        if s.get("vectors"):
            files.append(s["vectors"])
        if s.get("docs"):
            files.append(s["docs"])
    if m.get("trained"):
        files.append(m["trained"])
    if m.get("tombstones"):
        files.append({k: m["tombstones"][k] for k in ("file", "bytes", "sha256")})
    for rec in (m.get("parts") or {}).values():
        files.extend(part_files(rec))
    return files


def local_index_dir(location: str | os.PathLike) -> Path:
    """A local folder holding the index at ``location`` (a folder, its manifest.json, or a URI).

    A URI (``s3://bucket/idx``) is downloaded once into the local cache, keyed by the sha256 of
    its manifest, every file verified against its recorded size and sha256; an unchanged index
    is never downloaded twice.
    """
    from rayembed.cluster.storage import is_remote, localize

    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not is_remote(text):
        p = Path(text)
        return p.parent if p.name == MANIFEST and p.is_file() else p
    if text.rstrip("/").endswith("/" + MANIFEST):
        text = text.rstrip("/")[: -len(MANIFEST) - 1]
    return localize(text, marker=MANIFEST, files_of=index_files, what="index")


def read_docs_part(root: Path, shard: dict[str, Any], columns: list[str] | None = None):
    """The id-map part of one shard as a pyarrow Table (path checked inside ``root``)."""
    import pyarrow.parquet as pq

    path = verify_file(root, shard["docs"], what="id map", check_hash=False)
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise IndexIntegrityError(f"id map {path} cannot be read ({e}); delete it and rebuild.") from e

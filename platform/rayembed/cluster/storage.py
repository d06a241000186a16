"""One storage location for checkpoints, shards and manifests: a local folder or a ``pyarrow.fs`` URI.

On a laptop every output is a local folder. On a cluster a job's driver, its Ray Train workers
and its encoder actors run on different nodes, and the job's working directory is a temporary
copy that vanishes with the job, so outputs must go to storage every node sees: a shared mount
(NFS, EFS, Filestore; a plain absolute path) or an object store (``s3://``, ``gs://``, ``abfs://``).

``resolve_storage`` turns either into a :class:`Storage` with a ``pyarrow.fs.FileSystem`` and a
path inside it, so callers never branch on the kind::

    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(cfg.train.storage_path or f"{cfg.run_dir}/train/ray")
    RunConfig(storage_path=st.uri, storage_filesystem=st.filesystem_for_ray_train(), ...)

    out = resolve_storage(cfg.index.output_dir)        # the index writer
    if out.is_local:
        build_into(out.local_path)                      # write in place, atomically
    else:
        build_into(staging_dir); out.upload(staging_dir)   # then copy the finished folder up

Local paths are made absolute at resolve time: a relative path under ``ray job submit`` would
land inside the job's temporary working-directory copy and be lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes pyarrow.fs knows (hdfs and viewfs need a Hadoop client at run time).
KNOWN_SCHEMES = ("file", "local", "s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")


def uri_scheme(uri_or_path: str | os.PathLike) -> str | None:
    """The URI scheme (``s3``, ``gs``, ``file``), or None for a plain path."""
    m = _SCHEME.match(str(uri_or_path))
    return m.group(1).lower() if m else None


def is_remote(uri_or_path: str | os.PathLike) -> bool:
    """True for object-store and HDFS URIs, False for local paths and ``file://``."""
    return uri_scheme(uri_or_path) not in (None, "file", "local")


@dataclass(frozen=True)
class Storage:
    """A location in a ``pyarrow.fs`` filesystem. Build it with :func:`resolve_storage`.

    ``uri`` is what to hand to other tools (Ray Train's ``storage_path``, a manifest); ``path`` is
    the path inside ``filesystem`` (no scheme, no bucket prefix for local paths).
    """

    uri: str
    path: str
    filesystem: Any  # pyarrow.fs.FileSystem

    @property
    def is_local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The folder on this machine; only for local storage."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path; use upload()/download() to move files.")
        return Path(self.path)

    def join(self, *parts: str) -> Storage:
        """A location below this one (``parts`` are relative, '/'-separated)."""
        for p in parts:
            if p.startswith("/") or ".." in PurePosixPath(p).parts:
                raise ValueError(f"Storage.join takes relative parts without '..', got {p!r}.")
        path = str(PurePosixPath(self.path, *parts))
        uri = self.uri.rstrip("/") + "/" + "/".join(parts) if parts else self.uri
        return Storage(uri=uri, path=path, filesystem=self.filesystem)

    # ----------------------------------------------------------------------------- queries

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        target = self.join(rel) if rel else self
        return self.filesystem.get_file_info(target.path).type != pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly below this location (empty when it does not exist)."""
        import pyarrow.fs as pafs

        target = self.join(rel) if rel else self
        sel = pafs.FileSelector(target.path, allow_not_found=True, recursive=False)
        return sorted(PurePosixPath(i.path).name for i in self.filesystem.get_file_info(sel))

    # ----------------------------------------------------------------------------- reads and writes

    def makedirs(self, rel: str = "") -> Storage:
        target = self.join(rel) if rel else self
        self.filesystem.create_dir(target.path, recursive=True)
        return target

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write one file; atomic on local disks (temp file + rename) and on object stores (one PUT)."""
        target = self.join(rel)
        if self.is_local:
            from rayembed.io import atomic_write_bytes

            atomic_write_bytes(target.path, data)
        else:
            parent = str(PurePosixPath(target.path).parent)
            self.filesystem.create_dir(parent, recursive=True)
            with self.filesystem.open_output_stream(target.path) as f:
                f.write(data)
        return target.uri

    def put_file(self, src: str | os.PathLike, rel: str) -> str:
        """Copy the local file ``src`` to ``rel`` below this location: atomically on a local disk
        (temporary name, then rename), as one upload on an object store (a key appears whole)."""
        target = self.join(rel)
        if self.is_local:
            import shutil

            from rayembed.io import atomic_path

            with atomic_path(target.path) as tmp:
                shutil.copyfile(src, tmp)
        else:
            _upload_file(self, Path(src), rel)
        return target.uri

    def read_bytes(self, rel: str) -> bytes:
        with self.filesystem.open_input_stream(self.join(rel).path) as f:
            return f.read()

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def upload(self, local_dir: str | os.PathLike, rel: str = "") -> Storage:
        """Copy a finished local folder to this location (or ``rel`` below it); returns the target."""
        import pyarrow.fs as pafs

        src = Path(local_dir).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"Nothing to upload: {src} is not a folder.")
        target = self.join(rel) if rel else self
        self.filesystem.create_dir(target.path, recursive=True)
        pafs.copy_files(str(src), target.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)
        logger.info("Copied %s to %s", src, target.uri)
        return target

    def download(self, local_dir: str | os.PathLike, rel: str = "") -> Path:
        """Copy this location (or ``rel`` below it) into a local folder; returns that folder."""
        import pyarrow.fs as pafs

        src = self.join(rel) if rel else self
        if not src.exists():
            raise FileNotFoundError(f"Nothing to download: {src.uri} does not exist.")
        dst = Path(local_dir).resolve()
        dst.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src.path, str(dst), source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return dst

    # ----------------------------------------------------------------------------- Ray Train

    def ray_train_kwargs(self) -> dict[str, Any]:
        """``RunConfig(**st.ray_train_kwargs(), ...)``: the storage path, plus the filesystem for URIs.

        Ray Train resolves plain URIs itself; handing it the same filesystem object keeps any
        options given in the URI (region, endpoint_override) in force.
        """
        if self.is_local:
            return {"storage_path": self.path}
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}


def resolve_storage(uri_or_path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Storage:
    """A :class:`Storage` for a local path, ``file://`` URI or any ``pyarrow.fs`` URI.

    Relative local paths resolve against ``base`` (default: the current directory) and become
    absolute. URIs keep their query options, e.g. ``s3://bucket/runs?region=us-west-2`` or
    ``s3://bucket/runs?endpoint_override=minio:9000&scheme=http`` for MinIO.

    Raises ValueError for an empty value or a scheme pyarrow cannot open, naming the fix.
    """
    import pyarrow.fs as pafs

    raw = str(uri_or_path).strip() if uri_or_path is not None else ""
    if not raw:
        raise ValueError("Empty storage location; give a folder or a URI such as s3://bucket/runs.")
    scheme = uri_scheme(raw)
    if scheme is None:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = Path(base or os.getcwd()) / path
        path = Path(os.path.abspath(path))
        return Storage(uri=str(path), path=str(path), filesystem=pafs.LocalFileSystem())
    if scheme not in KNOWN_SCHEMES:
        raise ValueError(
            f"Storage URI {raw!r} has scheme '{scheme}', which pyarrow.fs cannot open; use a folder "
            f"(a shared mount on a cluster) or one of {', '.join(s + '://' for s in KNOWN_SCHEMES)}."
        )
    try:
        fs, path = pafs.FileSystem.from_uri(raw)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own wording
        raise ValueError(
            f"Cannot open storage {raw!r}: {e}. Check the URI, the credentials of this machine "
            "(AWS_*/GOOGLE_APPLICATION_CREDENTIALS) and that pyarrow was built with this filesystem."
        ) from e
    uri = raw.split("?", 1)[0].rstrip("/") or raw
    if isinstance(fs, pafs.LocalFileSystem):
        uri = path
    return Storage(uri=uri, path=path.rstrip("/") or path, filesystem=fs)


# ----------------------------------------------------------------------------- checks before work starts

_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _s3_has_credentials(uri: str) -> bool:
    """Whether any AWS credential source is configured (env, shared files, anonymous in the URI).

    Only a definite "none" counts: with the instance metadata service allowed (EC2, EKS), the
    credentials may come from there and only a request tells.
    """
    if "anonymous=true" in uri.lower() or any(os.environ.get(k) for k in _CREDENTIAL_ENV):
        return True
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
             os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"]
    if any(Path(f).expanduser().is_file() for f in files):
        return True
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() not in ("true", "1")


def check_location(uri_or_path: str | os.PathLike, *, what: str, must_exist: bool = False) -> Storage:
    """Resolve ``uri_or_path`` and check, before any work starts, that it can be used.

    For object stores: credentials are configured and the bucket exists (one metadata request).
    ``must_exist``: the location itself must exist (an input). Errors name ``what`` (the config key)
    and the fix.
    """
    import pyarrow.fs as pafs

    try:
        st = resolve_storage(uri_or_path)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    scheme = uri_scheme(str(uri_or_path))
    if scheme == "s3" and not _s3_has_credentials(str(uri_or_path)):
        raise ValueError(
            f"{what}={uri_or_path}: no AWS credentials are configured on this machine. Set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or add anonymous=true to the "
            "URI for a public bucket."
        )
    if not st.is_local:
        bucket = st.path.split("/", 1)[0]
        try:
            info = st.filesystem.get_file_info(bucket)
        except OSError as e:
            raise ValueError(
                f"{what}={uri_or_path}: cannot reach the bucket '{bucket}' ({str(e).splitlines()[0][:300]}). "
                "Check the credentials, the endpoint (AWS_ENDPOINT_URL or endpoint_override= in the URI) "
                "and the network."
            ) from e
        if info.type == pafs.FileType.NotFound:
            raise ValueError(
                f"{what}={uri_or_path}: the bucket '{bucket}' does not exist. Create it first, or fix the URI."
            )
    if must_exist and not st.exists():
        raise FileNotFoundError(f"{what}={uri_or_path} does not exist. Check the path or URI.")
    return st


def local_folder(value: str | os.PathLike, *, what: str, uri_keys: str = "index.output_dir, train.output_dir, "
                 "train.storage_path, index.corpus, a saved embedder and serve.index_dir") -> Path:
    """``value`` as an absolute local folder, for outputs that are written with local file APIs.

    A URI is refused with an error naming the key and where URIs are taken, never turned into a
    relative folder such as ``s3:/bucket/x`` inside a job's temporary working directory.
    """
    text = str(value)
    scheme = uri_scheme(text)
    if scheme in ("file", "local"):
        text = text.split("://", 1)[1]
    elif scheme is not None:
        raise ValueError(
            f"{what}={value}: this output is written to a folder, and a {scheme}:// URI is not supported "
            f"here yet. Use a shared mount (NFS, EFS, a Filestore path) on a cluster; object-store URIs are "
            f"taken by {uri_keys}."
        )
    return Path(os.path.abspath(Path(text).expanduser()))


# ----------------------------------------------------------------------------- publish and localize

#: Written last into a published folder (a model): every file with its size and sha256.
COMPLETE_MARKER = "_COMPLETE.json"


def publish_folder(local_dir: str | os.PathLike, dest: str | os.PathLike | Storage) -> Storage:
    """Copy a finished local folder to ``dest`` and write :data:`COMPLETE_MARKER` last.

    A reader that finds the marker finds every file it lists, with those bytes: an object store
    has no rename, so completeness is the marker's presence, never a half-copied folder.
    """
    from rayembed.io import sha256_file

    src = Path(local_dir)
    st = dest if isinstance(dest, Storage) else resolve_storage(dest)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    if st.exists(COMPLETE_MARKER):
        st.filesystem.delete_file(st.join(COMPLETE_MARKER).path)
    records = []
    for p in files:
        rel = p.relative_to(src).as_posix()
        if st.is_local:
            st.write_bytes(rel, p.read_bytes())
        else:
            _upload_file(st, p, rel)
        records.append({"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    st.write_json(COMPLETE_MARKER, {"files": records})
    logger.info("Published %s to %s (%d files)", src, st.uri, len(records))
    return st


def _upload_file(st: Storage, src: Path, rel: str) -> None:
    target = st.join(rel)
    st.filesystem.create_dir(str(PurePosixPath(target.path).parent), recursive=True)
    with open(src, "rb") as fin, st.filesystem.open_output_stream(target.path) as fout:
        while True:
            chunk = fin.read(8 << 20)
            if not chunk:
                break
            fout.write(chunk)


def local_cache_root() -> Path:
    from rayembed.runtime import cache_dir

    return cache_dir() / "downloads"


def localize(uri_or_path: str | os.PathLike, *, marker: str = COMPLETE_MARKER,
             files_of: Any = None, what: str = "folder") -> Path:
    """A local folder with the contents of ``uri_or_path``: the folder itself when it is local,
    else a verified copy in the download cache, reused while the marker file is unchanged.

    ``marker`` is the file that lists the folder's files (``_COMPLETE.json`` of
    :func:`publish_folder`, or an index's ``manifest.json``); ``files_of(marker_json)`` returns
    their records (``{"file", "bytes", "sha256"}``). The cache key is the marker's sha256, so a
    republished folder is downloaded anew and an unchanged one never twice. Every file is
    checked against its size and sha256 before the copy is put in place.
    """
    import hashlib
    import json as _json
    import shutil
    import tempfile

    from rayembed.io import sha256_file

    st = resolve_storage(uri_or_path)
    if st.is_local:
        return Path(st.path)
    if not st.exists(marker):
        raise FileNotFoundError(
            f"{st.uri} holds no {marker}: it is not a complete {what} (still being written, or the "
            "writer was killed). Rerun the job that writes it."
        )
    raw = st.read_bytes(marker)
    key = hashlib.sha256(raw).hexdigest()[:32]
    target = local_cache_root() / key
    if (target / marker).is_file():
        return target
    meta = _json.loads(raw)
    records = files_of(meta) if files_of is not None else meta["files"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        for rec in records:
            rel = rec["file"]
            if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
                raise ValueError(f"{st.uri}/{marker} lists an unsafe path {rel!r}; refusing to download it.")
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with st.filesystem.open_input_stream(st.join(rel).path) as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 8 << 20)
            if ("bytes" in rec and dst.stat().st_size != rec["bytes"]) or (
                    "sha256" in rec and sha256_file(dst) != rec["sha256"]):
                raise ValueError(
                    f"{st.uri}/{rel} does not match the size and sha256 recorded in {marker} (modified or "
                    "truncated in storage). Rewrite it by rerunning the job that wrote it."
                )
        (tmp / marker).write_bytes(raw)
        try:
            tmp.rename(target)
        except OSError:  # another process put the same verified copy in place first
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Downloaded %s (%d files) into %s", st.uri, len(records), target)
    return target


def warn_if_node_local(storage: Storage, what: str) -> bool:
    """Log a warning when a local path is used on a multi-node Ray cluster; True if it warned.

    A local path is fine there only if it is a shared mount present on every node; Ray cannot
    tell, so this says what to check instead of failing.
    """
    if not storage.is_local:
        return False
    try:
        import ray

        if not ray.is_initialized():
            return False
        alive = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - a failed probe must never fail the job
        return False
    if len(alive) <= 1:
        return False
    logger.warning(
        "%s is the local path %s on a %d-node Ray cluster: it must be a shared mount (NFS/EFS) that "
        "every node sees, or outputs written on other nodes are lost. Otherwise use s3:// or gs://.",
        what, storage.uri, len(alive),
    )
    return True

"""Atomic writes, checksums and reading text collections.

Every file the platform writes goes through a temporary file in the same folder and an
``os.replace``, so a job killed mid-write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; outputs are shared with the group like any other file.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_parquet(path: str | os.PathLike, table: Any, **kwargs: Any) -> Path:
    """Write a ``pyarrow.Table`` (or a dict of columns) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table, dict):
        table = pa.table(table)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL or Parquet file into a list of dicts, with a clear error on bad lines."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Input file '{p}' does not exist.")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(f"Input file '{p}' must be .jsonl or .parquet, not '{p.suffix}'.")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno} is not valid JSON ({e.msg}); fix or remove that line.") from e
    return rows


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``new`` to ``target``, replacing any folder there.

    The old folder is first renamed aside under a unique name beside ``target``, then ``new``
    is renamed in, then the aside copy is removed; a failure in between renames the old folder
    back. So ``target`` is never deleted before its replacement is in place, and a process
    killed between the two renames leaves the old folder intact (as ``.<name>.old-*``). ``new``
    must be on the same filesystem (build it with ``tempfile.mkdtemp(dir=target.parent)``).
    """
    import shutil

    new, target = Path(new), Path(target)
    aside: Path | None = None
    if target.exists():
        holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside = holder / target.name
        os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
            shutil.rmtree(aside.parent, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside.parent, ignore_errors=True)
    return target

"""resolve_storage: local paths, file:// URIs and the errors for what pyarrow cannot open."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rayembed.cluster.storage import is_remote, resolve_storage, uri_scheme


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = resolve_storage("runs/x")
    assert st.is_local and st.uri == str(tmp_path / "runs" / "x") and os.path.isabs(st.path)
    assert resolve_storage("runs/x", base="/mnt/shared").uri == "/mnt/shared/runs/x"


def test_local_roundtrip_is_atomic_and_lists(tmp_path):
    st = resolve_storage(tmp_path / "store")
    assert not st.exists()
    st.write_json("index/manifest.json", {"ok": 1})
    assert st.read_json("index/manifest.json") == {"ok": 1}
    assert st.listdir("index") == ["manifest.json"]  # no temp file left behind
    assert st.join("index").exists("manifest.json")
    assert st.ray_train_kwargs() == {"storage_path": str(tmp_path / "store")}


def test_file_uri_is_local(tmp_path):
    st = resolve_storage(f"file://{tmp_path}/ckpt")
    assert st.is_local and st.path == f"{tmp_path}/ckpt" and st.local_path == tmp_path / "ckpt"
    assert not is_remote(f"file://{tmp_path}") and is_remote("s3://bucket/x") and uri_scheme("gs://b") == "gs"


def test_upload_and_download_a_finished_folder(tmp_path):
    src = tmp_path / "built"
    (src / "shards").mkdir(parents=True)
    (src / "manifest.json").write_text(json.dumps({"n": 2}))
    (src / "shards" / "shard-00000.faiss").write_bytes(b"\x00" * 128)
    st = resolve_storage(f"file://{tmp_path}/remote")
    target = st.upload(src, "index")
    assert target.uri.endswith("/remote/index")
    back = st.download(tmp_path / "back", "index")
    assert json.loads((back / "manifest.json").read_text()) == {"n": 2}
    assert (back / "shards" / "shard-00000.faiss").stat().st_size == 128


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="Empty storage location"):
        resolve_storage("  ")
    with pytest.raises(ValueError, match="scheme 'ftp'.*s3://"):
        resolve_storage("ftp://host/x")
    with pytest.raises(ValueError, match="relative parts without"):
        resolve_storage(tmp_path).join("../escape")
    with pytest.raises(FileNotFoundError, match="Nothing to upload"):
        resolve_storage(tmp_path).upload(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a local path"):
        from rayembed.cluster.storage import Storage

        _ = Storage(uri="s3://b/x", path="b/x", filesystem=object()).local_path


def test_outputs_written_to_folders_refuse_uris_with_the_fix(tmp_path):
    """data and synth write folders: a URI there is an error, never 's3:/b/x' locally."""
    from rayembed.cluster.storage import local_folder
    from rayembed.config import load_config
    from rayembed.data.mix import build_mix
    from rayembed.pipeline import Pipeline
    from rayembed.synth.resume import output_dir

    assert local_folder("file:///mnt/x", what="k") == Path("/mnt/x")
    for fn, match in (
        (lambda: build_mix(load_config(None, ["run_dir=s3://bkt/run"])), r"run_dir=s3://bkt/run/data.*shared mount"),
        (lambda: output_dir(load_config(None, ["synth.output_dir=gs://bkt/s"])), r"synth.output_dir=gs://bkt/s"),
        # The pipeline takes URIs (its own test runs it in a bucket); a scheme pyarrow cannot open is named.
        (lambda: Pipeline(load_config(None, ["run_dir=ftp://bkt/run"])), r"run_dir: .*scheme 'ftp'"),
    ):
        with pytest.raises(ValueError, match=match):
            fn()
    assert not any(p.name.startswith("s3:") for p in Path.cwd().iterdir())

"""Check a cluster before a long run: code, resources and shared storage, in under a minute.

    rayembed submit smoke --address http://<head>:8265 storage=/mnt/shared/runs
    rayembed submit smoke --address http://<head>:8265 storage=s3://bucket/runs

It attaches with a plain ``ray.init()`` (as every job does under ``ray job submit``), runs one
task on every alive node, and checks there that:

- ``rayembed`` imports, from the uploaded package (the runtime env's ``py_modules``);
- the storage location is writable, and a file the driver wrote there can be read back (a
  local path that is not a shared mount fails here, on the other nodes);
- the auth mode (RAY_AUTH_MODE) is the same as the driver's.

It prints one JSON line per node and exits 1 when any check fails.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid


def probe(storage_uri: str | None, token: str | None) -> dict:
    import rayembed
    from rayembed.cluster.storage import resolve_storage

    out = {
        "host": socket.gethostname(),
        "rayembed": os.path.dirname(rayembed.__file__),
        "auth_mode": os.environ.get("RAY_AUTH_MODE", ""),
        "ok": True,
    }
    if storage_uri:
        st = resolve_storage(storage_uri)
        try:
            seen = st.read_bytes(f".smoke/{token}").decode() == token
            st.write_bytes(f".smoke/{token}.{out['host']}", b"ok")
            out["storage"] = "shared" if seen else "not shared: the driver's file is not visible here"
            out["ok"] = seen
        except OSError as e:
            out["storage"] = f"error: {e}"
            out["ok"] = False
    return out


def main(argv: list[str]) -> int:
    import ray

    from rayembed.cluster.storage import resolve_storage

    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    storage_uri = opts.get("storage")
    token = uuid.uuid4().hex
    if storage_uri:
        resolve_storage(storage_uri).write_bytes(f".smoke/{token}", token.encode())
    ray.init()  # attach: RAY_ADDRESS is set by ray job submit
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    remote = ray.remote(num_cpus=0)(probe)
    refs = [
        remote.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(storage_uri, token)
        for n in nodes
    ]
    results = ray.get(refs)
    driver_auth = os.environ.get("RAY_AUTH_MODE", "")
    ok = True
    for r in results:
        r["auth_matches_driver"] = r["auth_mode"] == driver_auth
        ok &= r["ok"] and r["auth_matches_driver"]
        print(json.dumps(r), flush=True)
    print(json.dumps({"nodes": len(nodes), "resources": ray.cluster_resources(), "ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

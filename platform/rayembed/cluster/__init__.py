"""Running on a Ray cluster: shared storage, ``ray job submit`` wrapping, a real local cluster.

- :mod:`rayembed.cluster.storage`: ``resolve_storage(path_or_uri)`` for checkpoints, shards, manifests.
- :mod:`rayembed.cluster.submit`: ``rayembed submit <job>`` (checks, runtime env, entrypoint).
- :mod:`rayembed.cluster.local`: ``LocalCluster``, ``ray start --head`` on 127.0.0.1 for tests and laptops.

The manifests, the runtime env recipe and the guide are in the repository's ``cluster/`` folder.
"""

from rayembed.cluster.storage import Storage, is_remote, resolve_storage

__all__ = ["Storage", "is_remote", "resolve_storage"]

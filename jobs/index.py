"""Build a FAISS index of a corpus on Ray Data (``ray job submit``-able).

Laptop (starts a local Ray):
    python jobs/index.py --config jobs/configs/local/index.yaml
GPU cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/index.py --config jobs/configs/gpu/index.yaml \
        index.embedder=/mnt/models/e5-smollm2 index.corpus=/mnt/data/corpus.jsonl
Rerun the same command after a failure: finished shards are verified and kept.
"""

import sys

from rayembed.cli import main

sys.exit(main(["index", *sys.argv[1:]]))

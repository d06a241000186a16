"""Train an embedder on Ray Train: ``rayembed train`` as a job.

Laptop (starts a local Ray):
          python jobs/train.py --config jobs/configs/local/train.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/gpu/train.yaml \\
              --train-path s3://bucket/mix train.storage_path=s3://bucket/ckpt
Re-submitting the same command (same train.run_name and storage) resumes from the latest checkpoint.
"""

import sys

from rayembed.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

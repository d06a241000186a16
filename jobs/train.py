"""Train an embedder on Ray Train: ``rayembed train`` as a job.

Laptop (starts a local Ray):
          python jobs/train.py --config jobs/configs/local/train.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/gpu/train.yaml \\
              --train-path s3://bucket/mix run_dir=s3://bucket/runs/r1
On a cluster every output must go to storage all nodes see: with run_dir (or train.output_dir) a
URI, checkpoints go to <output>/ray in the bucket (or train.storage_path), and the model, metrics
and summary are uploaded there; the job's working directory is a temporary copy that vanishes.
Re-submitting the same command (same train.run_name and storage) resumes from the latest checkpoint.
"""

import sys

from rayembed.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

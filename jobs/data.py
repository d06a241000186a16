"""Build the training mix: ``rayembed data build`` as a job.

Laptop:   python jobs/data.py --config jobs/configs/local/data.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/data.py --config jobs/configs/gpu/data.yaml
"""

import sys

from rayembed.cli import main

sys.exit(main(["data", "build", *sys.argv[1:]]))

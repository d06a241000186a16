"""Deploy the retrieval endpoint: ``rayembed serve`` as a job.

Laptop:   python jobs/serve.py --config jobs/configs/local/serve.yaml --index-dir runs/demo/index
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/serve.py --detach \\
              --config jobs/configs/gpu/serve.yaml --index-dir /mnt/shared/runs/prod/index
          (or, without a job: serve deploy serving/serve_config.gpu.yaml)
"""

import sys

from rayembed.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))

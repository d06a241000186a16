"""Mine hard negatives: ``rayembed mine`` as a job.

Laptop:   python jobs/mine.py --input rows.parquet --output mined.parquet data.mine.retriever=bm25
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/mine.py --config jobs/configs/gpu/data.yaml \
              --input /data/pairs --output /data/mined.parquet data.mine.retriever=runs/base/model
"""

import sys

from rayembed.cli import main

sys.exit(main(["mine", *sys.argv[1:]]))

"""The whole pipeline as one job: `ray job submit -- python jobs/pipeline.py --config ...`.

    python jobs/pipeline.py --config jobs/configs/local/demo.yaml          # laptop: starts a local Ray
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py --config jobs/configs/gpu/train.yaml
"""

import sys

from rayembed.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))

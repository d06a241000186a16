"""Evaluation job: `ray job submit -- python jobs/eval.py --config jobs/configs/gpu/eval.yaml`.

Laptop: `python jobs/eval.py --config jobs/configs/local/eval.yaml`. Same arguments as `rayembed eval`.
"""

import sys

from rayembed.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))

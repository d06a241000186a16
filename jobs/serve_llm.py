"""Serve a Hugging Face causal LM as an OpenAI-compatible endpoint: ``rayembed serve-llm`` as a job.

Laptop:   python jobs/serve_llm.py --config jobs/configs/local/synth.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/serve_llm.py --config jobs/configs/gpu/synth.yaml \
              synth.llm_server.host=0.0.0.0 synth.llm_server.num_gpus=1
Blocks until stopped (`ray job stop`, Ctrl-C or SIGTERM).
"""

import sys

from rayembed.cli import main

sys.exit(main(["serve-llm", *sys.argv[1:]]))

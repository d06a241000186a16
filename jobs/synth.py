"""Generate synthetic training data: ``rayembed synth`` as a job.

Laptop (local SmolLM2 behind serve-llm, started by the job):
          python jobs/synth.py --config jobs/configs/local/synth.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml --runtime-env-json '{"env_vars": {"OPENAI_BASE_URL": "http://vllm:8000/v1"}}' \
              -- python jobs/synth.py --config jobs/configs/gpu/synth.yaml
Re-submitting the same command resumes a run that stopped: finished chunks are not re-sent.
"""

import sys

from rayembed.cli import main

sys.exit(main(["synth", *sys.argv[1:]]))

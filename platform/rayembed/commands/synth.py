"""``rayembed synth``: generate synthetic training data with an OpenAI-compatible LLM."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "synth",
        help="Generate synthetic training data (E5-mistral two-step prompts) on Ray Data.",
        description=(
            "Brainstorm tasks and generate examples with any OpenAI-compatible LLM; writes Parquet "
            "shards to synth.output_dir. Re-running the same command resumes where it stopped. "
            "The API key comes from $OPENAI_API_KEY (synth.api_key_env); the endpoint from "
            "synth.base_url or $OPENAI_BASE_URL. synth.launch_local_llm=true generates with a "
            "local model behind `rayembed serve-llm`."
        ),
    )
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from rayembed.cli import load_from_args
    from rayembed.synth import run_synth
    from rayembed.synth.pipeline import SynthFailed

    cfg = load_from_args(args)
    try:
        summary = run_synth(cfg)
    except SynthFailed as e:  # the message names the endpoint, never the key
        print(f"rayembed synth: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0

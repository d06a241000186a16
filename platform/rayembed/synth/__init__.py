"""Synthetic training data from any OpenAI-compatible LLM (E5-mistral two-step prompting).

    from rayembed.synth import run_synth
    summary = run_synth(cfg)          # shards in cfg.synth.output_dir, summary dict returned

``rayembed serve-llm`` (:mod:`rayembed.synth.llm_server`) puts a local Hugging Face causal LM
behind the same protocol, so the whole pipeline runs offline on a laptop.
"""

from __future__ import annotations

__all__ = ["run_synth", "start_llm_server", "LLMServerHandle"]


def __getattr__(name: str):
    # Lazy: importing the package must not import ray, openai or torch.
    if name == "run_synth":
        from rayembed.synth.pipeline import run_synth

        return run_synth
    if name in ("start_llm_server", "LLMServerHandle"):
        from rayembed.synth import llm_server

        return getattr(llm_server, name)
    raise AttributeError(name)

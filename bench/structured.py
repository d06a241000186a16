"""Structured outputs on serve-llm: what constrained decoding costs, and what it buys.

    python bench/structured.py                       # both parts (about 10-20 minutes on 2 cores)
    python bench/structured.py --skip-synth          # the per-token overhead only
    python bench/structured.py --modes json_schema off --num-examples '{sts: 6}'

1. Per generated token, SmolLM2-135M-Instruct in process (the engine serve-llm runs): the same
   synth prompts decoded under their JSON schemas (llguidance masks), then freely for as many
   steps, one batch each, greedy. Reports ms per decoding step for both, their difference, and
   the time spent computing and applying the masks alone (timed inside the logits processor).
2. Accept rate: `run_synth` against serve-llm (SmolLM2) with the synth section of
   jobs/configs/local/demo.yaml, once per ``synth.structured_output`` mode (json_schema,
   json_object, off), each into its own folder: requests, accepted rows, accept rate (accepted
   rows per generation request; brainstorms not counted), and the reject reasons.

Figures go to stdout (a side-by-side table) and to bench/out/structured.json. The machine may be
shared: timings are noisy, accept rates are not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load

DEMO = REPO / "jobs" / "configs" / "local" / "demo.yaml"
MODES = ("json_schema", "json_object", "off")


def overhead(n_prompts: int, max_tokens: int, threads: int | None) -> dict:
    """ms per generated token, free vs constrained, on the same prompts in one batch."""
    from rayembed.config import load_config
    from rayembed.synth import prompts as P
    from rayembed.synth.languages import LanguageSampler, language_weights
    from rayembed.synth.llm_server import LLMEngine, parse_request

    sc = load_config(DEMO).synth
    engine = LLMEngine("smollm2-135m", "smollm2-135m", max_new_tokens_cap=max_tokens, torch_threads=threads)
    langs = LanguageSampler(language_weights(restrict=["en"]))
    tasks = {"short-long": ["Given a question about home repairs, find guides that answer it."] * n_prompts}
    specs = P.generation_specs({"sts": n_prompts // 2 + n_prompts % 2, "short-long": n_prompts // 2}, 0, tasks,
                               langs, 1, max_tokens, sc.long_long_min_words, "json_schema",
                               min_document_words=sc.min_document_words)
    out = {}
    steps_c = max_tokens
    # Constrained first; then free decoding for as many steps, so both batches see the same
    # sequence lengths (a step's cost grows with them). The second round is kept (warm).
    for mode in ("constrained", "free", "constrained", "free"):
        items = []
        for s in specs:
            n = max_tokens if mode == "constrained" else steps_c
            body = {"messages": [{"role": "user", "content": s.prompt}], "max_tokens": n, "temperature": 0}
            if mode == "constrained":
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": s.schema}}
            items.append(engine.prepare(parse_request(body)))
        t0 = time.perf_counter()
        res = engine.generate_all(items)
        dt = time.perf_counter() - t0
        # One batch: every row steps until the longest is done, so time per step is what a token costs.
        steps = max(r["completion_tokens"] for r in res)
        if mode == "constrained":
            steps_c = steps
        parsed = 0
        for r in res:
            try:
                json.loads(r["text"])
                parsed += 1
            except ValueError:
                pass
        out[mode] = {
            "batch": len(items),
            "steps": steps,
            "tokens": sum(r["completion_tokens"] for r in res),
            "s": round(dt, 2),
            "ms_per_step": round(1000 * dt / steps, 2),
            "mask_ms_per_step": round(1000 * sum(r["mask_s"] for r in res) / steps, 3),
            "replies_parsed": parsed,
        }
    out["overhead_ms_per_step"] = round(out["constrained"]["ms_per_step"] - out["free"]["ms_per_step"], 2)
    out["overhead_pct"] = round(100 * out["overhead_ms_per_step"] / out["free"]["ms_per_step"], 1)
    # The masks' own cost (compute + apply), timed inside the logits processor: noise-free.
    out["mask_ms_per_row_token"] = round(out["constrained"]["mask_ms_per_step"] / len(specs), 3)
    out["mask_pct_of_free_step"] = round(100 * out["constrained"]["mask_ms_per_step"] / out["free"]["ms_per_step"], 2)
    return out


def _reject_samples(out: Path, chars: int = 240) -> dict[str, str]:
    """One rejected reply per reason, cut to ``chars``: what the numbers mean in the model's words."""
    samples: dict[str, str] = {}
    for f in sorted((out / "_rejects").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            samples.setdefault(f"{r['stage']}:{r['reason']}", (r.get("reply") or "")[:chars])
    return samples


def accept_rates(modes: list[str], num_examples: str | None, tmp: str) -> dict:
    from rayembed.config import load_config
    from rayembed.runtime import init_ray
    from rayembed.synth import run_synth
    from rayembed.synth.llm_server import start_llm_server

    base = load_config(DEMO)
    init_ray(base.compute.__class__(num_cpus=4, object_store_memory_mb=256,
                                    temp_dir=tempfile.mkdtemp(prefix="rayb", dir="/tmp"), log_to_driver=False))
    handle = start_llm_server(base.synth.llm_server, model_name=base.synth.model)
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    out = {}
    try:
        for mode in modes:
            over = [f"run_dir={tmp}/{mode}", f"synth.structured_output={mode}", f"synth.base_url={handle.base_url}",
                    "synth.launch_local_llm=false"]
            if num_examples:
                over.append(f"synth.num_examples={num_examples}")
            cfg = load_config(DEMO, over)
            t0 = time.perf_counter()
            s = run_synth(cfg)
            gen_requests = s["requests"] - s["brainstorm"]["requests"]
            out[mode] = {
                "requests": s["requests"],
                "generation_requests": gen_requests,
                "target_examples": sum(cfg.synth.num_examples.values()),
                "accepted": s["accepted"],
                "accept_rate": round(s["accepted"] / max(1, gen_requests), 3),
                "rejected_by_reason": s["rejected_by_reason"],
                "rows_by_task_type": s["rows_by_task_type"],
                "completion_tokens": s["completion_tokens"],
                "s": round(time.perf_counter() - t0, 1),
                "reject_samples": _reject_samples(Path(s["output_dir"])),
            }
            print(mode, json.dumps(out[mode]), flush=True)
    finally:
        handle.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="prompts in the overhead batch")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the overhead part")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--num-examples", default=None, help="override synth.num_examples, e.g. '{sts: 6}'")
    args = ap.parse_args(argv)
    result: dict = {}
    if not args.skip_overhead:
        result["overhead"] = overhead(args.prompts, args.max_tokens, args.threads)
        o = result["overhead"]
        print("\nPer decoding step (one batch of", o["free"]["batch"], "SmolLM2 prompts, greedy):")
        print(f"{'':14}{'ms/step':>10}{'mask ms/step':>14}{'steps':>7}{'parsed':>8}")
        for mode in ("free", "constrained"):
            r = o[mode]
            print(f"{mode:14}{r['ms_per_step']:>10}{r['mask_ms_per_step']:>14}{r['steps']:>7}"
                  f"{r['replies_parsed']:>5}/{r['batch']}")
        print(f"overhead: {o['overhead_ms_per_step']} ms per step ({o['overhead_pct']}%); the masks alone: "
              f"{o['mask_ms_per_row_token']} ms per row and token ({o['mask_pct_of_free_step']}% of a free step)")
    if not args.skip_synth:
        with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
            result["synth"] = accept_rates(args.modes, args.num_examples, tmp)
        print("\nsynth with the demo config's synth section, SmolLM2 behind serve-llm:")
        print(f"{'structured_output':20}{'requests':>9}{'generate':>9}{'accepted':>9}{'rate':>7}{'s':>7}  rejects")
        for mode, r in result["synth"].items():
            print(f"{mode:20}{r['requests']:>9}{r['generation_requests']:>9}{r['accepted']:>9}"
                  f"{r['accept_rate']:>7}{r['s']:>7}  {r['rejected_by_reason']}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

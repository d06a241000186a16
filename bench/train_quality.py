"""Does training help? LoRA-train SmolLM2-135M on CPU and compare nDCG@10 before and after.

Data: STS-B train pairs (score >= 4) plus Contriever-style crops of the MS MARCO subset's
passages (no MS MARCO queries or judgements are used for training). Evaluation: nDCG@10 on
the MS MARCO subset (50 queries, 5,000 passages) for the untuned backbone, the trained model,
BM25, and all-MiniLM-L6-v2 (0.798 measured here).

    python bench/train_quality.py                     # ~15-20 min on 2 cores
    python bench/train_quality.py --steps 40 --quick  # a short form for `make demo`

Writes bench/out/train_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load

SOURCES = (
    "[{name: stsb, format: stsb, path: stsb/sts-train.csv, min_score: 4.0},"
    " {name: weak-msmarco, format: weak, path: msmarco-subset, weak_mode: crops}]"
)


def evaluate(models: dict, max_length: int, max_docs: int, max_queries: int = 0) -> dict[str, float]:
    from rayembed.config.eval import DatasetSpec
    from rayembed.evaluate.runner import evaluate_models
    from rayembed.runtime import resolve_data_dir

    spec = DatasetSpec(name="msmarco-subset", path="msmarco-subset", format="beir", max_docs=max_docs,
                       max_queries=max_queries)
    res = evaluate_models(models, [spec], data_dir=resolve_data_dir(), max_length=max_length, batch_size=32,
                          top_k=100, plot=False)
    return {name: res["metrics"][name]["msmarco-subset"]["ndcg@10"] for name in models}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--query-len", type=int, default=48)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--eval-len", type=int, default=256, help="max tokens per text at evaluation")
    p.add_argument("--max-docs", type=int, default=0,
                   help="cap the evaluation corpus (0: all 5,000). Judged documents are kept first, so pair "
                        "a cap with --max-queries, or queries lose their relevant documents")
    p.add_argument("--max-queries", type=int, default=0, help="evaluate the first N judged queries (0: all 43)")
    p.add_argument("--quick", action="store_true", help="skip the baselines (BM25, MiniLM, untuned)")
    p.add_argument("--run-dir", default=None)
    args = p.parse_args()

    from rayembed.config import load_config
    from rayembed.data.mix import build_mix
    from rayembed.runtime import init_ray, setup_logging
    from rayembed.train import run_training

    setup_logging("INFO")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="train-quality-"))
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.sources={SOURCES}", "data.val_fraction=0.0",
        f"model.name_or_path={args.model}", f"model.max_length={args.eval_len}",
        "model.lora.enabled=true", "model.lora.dropout=0.05",
        f"train.num_workers={args.workers}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.lr={args.lr}", f"train.warmup_steps={max(1, args.steps // 20)}",
        f"train.temperature={args.temperature}", "train.num_negatives=1",
        f"train.query_max_length={args.query_len}", f"train.doc_max_length={args.doc_len}",
        f"train.checkpoint_every={max(10, args.steps // 3)}", "train.log_every=5", "train.engine=ddp",
        "compute.num_cpus=4", "compute.object_store_memory_mb=512",
        f"compute.temp_dir={tempfile.mkdtemp(prefix='rq', dir='/tmp')}",
    ])
    results: dict = {"settings": vars(args)}
    t0 = time.perf_counter()
    manifest = build_mix(cfg)
    results["data_rows"] = json.loads(Path(manifest).read_text()).get("rows")
    print(f"training mix: {manifest}", flush=True)

    before = {}
    if not args.quick:
        before = evaluate({"bm25": "bm25", "all-minilm-l6-v2": "all-minilm-l6-v2", f"{args.model} (untuned)": args.model},
                          args.eval_len, args.max_docs, args.max_queries)
    init_ray(cfg.compute)
    t_train = time.perf_counter()
    model_dir = run_training(cfg, [str(Path(manifest).parent)])
    results["train_s"] = time.perf_counter() - t_train
    import ray

    ray.shutdown()
    after = evaluate({f"{args.model} (trained)": str(model_dir)}, args.eval_len, args.max_docs, args.max_queries)
    results["ndcg@10"] = {**before, **after}
    results["total_s"] = time.perf_counter() - t0
    results["model_dir"] = str(model_dir)
    print("\nnDCG@10 on the MS MARCO subset:")
    for name, v in results["ndcg@10"].items():
        print(f"  {name:32s} {v:.4f}")
    print(f"training: {args.steps} steps x {args.batch} examples in {results['train_s']:.0f} s")
    from rayembed.io import atomic_write_json

    out = REPO / "bench" / "out" / "train_quality.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

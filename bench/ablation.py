"""Ablation: what each ingredient of the recipe is worth, at one training budget.

Every row trains the same model (SmolLM2-135M with LoRA, as `make demo`) for the same steps and
batch on the same data minus one ingredient, then is evaluated by the same code on both
collections:

    all data                 STS-B pairs, weak crops of both corpora, the LLM-written rows of a synth
                             run, its corpus-queries rows, negatives mined in `data build`,
                             instructions on queries
    without synthetic rows   drops every LLM-written row (the task rows and the corpus queries)
    without corpus-queries   drops the corpus-queries rows only
    without mined negatives  data.mine.in_build=false (rows keep only the negatives they came with)
    without the instruction  data.stream.instructions=false; the saved model records it, so
                             evaluation (query_instructions: auto) leaves its queries bare too

    python bench/ablation.py --synth runs/demo/synth                     # whole collections
    python bench/ablation.py --synth runs/demo/synth --steps 20 --max-docs 500 --max-queries 30
    python bench/ablation.py --only "all data" --set train.precision=bf16   # one row, bf16 training

Training runs as the demo trains (2 DDP workers of one thread each); evaluation encodes under the
demo's bf16 autocast. BM25 and the untuned model are evaluated once as reference rows
(``--no-reference`` skips them). Each finished row is written at once, so a stopped run keeps it.

A rerun with the same ``--work-dir`` reuses the rows it already trained and evaluated (each
row's ``trained.json``) and does the rest.

``--synth`` is a `rayembed synth` output folder (default ``runs/demo/synth``, which `make demo`
writes with corpus queries). Rows absent from it make their ablation row equal to "all data", and the
table says so. Writes bench/out/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load

BASE_SOURCES = [
    {"name": "stsb", "format": "stsb", "path": "stsb/sts-train.csv", "min_score": 4.0},
    {"name": "weak-msmarco", "format": "weak", "path": "msmarco-subset", "weak_mode": "crops", "max_rows": 3000},
    {"name": "weak-cranfield", "format": "weak", "path": "cranfield", "weak_mode": "both"},
]

VARIANTS = {
    "all data": {},
    "without synthetic rows": {"drop": ("synthetic", "corpus-queries")},
    "without corpus-queries": {"drop": ("corpus-queries",)},
    "without mined negatives": {"overrides": ["data.mine.in_build=false"]},
    "without the instruction": {"overrides": ["data.stream.instructions=false"]},
}


def split_synth(folder: Path, work: Path) -> dict[str, Path]:
    """The synth run's rows as two schema files: LLM-written task rows and corpus queries."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    shards = sorted(folder.glob("part-*.parquet"))
    if not shards:
        raise SystemExit(f"{folder} holds no part-*.parquet shards; pass a `rayembed synth` output folder.")
    table = pads.dataset([str(p) for p in shards], format="parquet").to_table()
    is_cq = pc.equal(table.column("task_type"), "corpus-queries")
    out = {}
    for name, mask in (("synthetic", pc.invert(is_cq)), ("corpus-queries", is_cq)):
        part = table.filter(mask)
        if part.num_rows:
            out[name] = work / f"{name}.parquet"
            pq.write_table(part, out[name])
    return out


def train_variant(name: str, variant: dict, synth: dict[str, Path], args, work: Path) -> tuple[str, dict]:
    from rayembed.config import load_config
    from rayembed.data.mix import build_mix, read_manifest
    from rayembed.runtime import init_ray
    from rayembed.train import run_training

    sources = list(BASE_SOURCES)
    for kind, path in synth.items():
        if kind not in variant.get("drop", ()):
            sources.append({"name": kind, "format": "schema", "path": str(path)})
    run_dir = work / name.replace(" ", "-")
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.sources={json.dumps(sources)}", "data.val_fraction=0.0", f"seed={args.seed}",
        f"model.name_or_path={args.model}", "model.max_length=256",
        "model.lora={enabled: true, r: 16, alpha: 32, dropout: 0.05, target_modules: [all-linear], top_layers: 8}",
        f"train.num_workers={args.workers}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"train.lr={args.lr}", f"train.warmup_steps={max(1, args.steps // 10)}", "train.temperature=0.02",
        "train.num_negatives=1", "train.query_max_length=48", "train.doc_max_length=96",
        f"train.checkpoint_every={args.steps}", "train.log_every=10", "train.engine=ddp",
        f"train.cpus_per_worker={args.cpus_per_worker}", "compute.num_cpus=4", "compute.object_store_memory_mb=512",
        f"compute.temp_dir={tempfile.mkdtemp(prefix='ab', dir='/tmp')}",
        *args.set, *variant.get("overrides", []),
    ])
    done = run_dir / "trained.json"  # a row trained by an earlier, interrupted run of this script
    if done.is_file() and (run_dir / "train" / "model" / "embedder_config.json").is_file():
        print(f"{name}: reusing the model trained in {run_dir} (delete {done} to train again)", flush=True)
        return str(run_dir / "train" / "model"), json.loads(done.read_text())
    manifest = read_manifest(build_mix(cfg))
    init_ray(cfg.compute)
    t0 = time.perf_counter()
    model_dir = run_training(cfg, [str(run_dir / "data")])
    seconds = time.perf_counter() - t0
    import ray

    ray.shutdown()
    from rayembed.io import atomic_write_json

    mined = sum((s.get("mined") or {}).get("rows_mined", 0) for s in manifest["sources"].values())
    info = {"rows": manifest["train"]["rows"], "by_source": manifest["train"]["by_source"],
            "rows_mined": mined, "train_s": round(seconds, 1)}
    atomic_write_json(done, info)
    return str(model_dir), info


def evaluate(model_dir: str, args, instructions: str) -> dict[str, float]:
    """nDCG@10 of one model (a saved folder, a registered name or 'bm25') on both collections."""
    from rayembed.config.eval import DatasetSpec
    from rayembed.evaluate.runner import evaluate_models
    from rayembed.runtime import resolve_data_dir

    cut = {"max_docs": args.max_docs, "max_queries": args.max_queries}  # 0: the whole collection
    specs = [DatasetSpec(name="msmarco-subset", path="msmarco-subset", format="beir", **cut),
             DatasetSpec(name="cranfield", path="cranfield", format="smart", **cut)]
    res = evaluate_models({"m": model_dir}, specs, data_dir=resolve_data_dir(), max_length=128, batch_size=32,
                          top_k=100, plot=False, query_instructions=instructions,
                          autocast=None if args.autocast == "none" else args.autocast)
    return {ds: res["metrics"]["m"][ds]["ndcg@10"] for ds in ("msmarco-subset", "cranfield")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synth", default="runs/demo/synth",
                   help="a `rayembed synth` output folder (default: the demo's); absent, no synthetic rows")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DDP workers (the demo's 2)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="the demo's 0.5: one torch thread each")
    p.add_argument("--autocast", default="bfloat16", choices=["none", "bfloat16"],
                   help="encoding precision in evaluation (the demo's bf16 autocast; 'none' for fp32)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the BM25 and untuned-model reference rows (the untuned one costs one evaluation)")
    p.add_argument("--max-docs", type=int, default=0, help="slice each corpus (0: the whole collection)")
    p.add_argument("--max-queries", type=int, default=0, help="first N judged queries (0: all)")
    p.add_argument("--only", action="append", default=[], help="run only these rows (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every trained row (repeatable), e.g. train.precision=bf16")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()

    from rayembed.io import atomic_write_json
    from rayembed.runtime import setup_logging

    setup_logging("INFO")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    synth = split_synth(Path(args.synth), work) if Path(args.synth).is_dir() else {}
    if not synth:
        print(f"{args.synth} is not a synth output folder: every row trains without synthetic data", flush=True)
    results: dict = {"settings": vars(args), "synth_rows": {k: str(v) for k, v in synth.items()}, "rows": {},
                     "reference": {}}
    out = REPO / "bench" / "out" / "ablation.json"
    for name, variant in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        same = [k for k in variant.get("drop", ()) if k not in synth]
        print(f"\n=== {name}", flush=True)
        model_dir, info = train_variant(name, variant, synth, args, work)
        if "ndcg@10" not in info:  # a reused row keeps its evaluation too
            info["ndcg@10"] = evaluate(model_dir, args, "auto")
            atomic_write_json(work / name.replace(" ", "-") / "trained.json", info)
        if same and len(same) == len(variant.get("drop", ())):
            info["note"] = f"the synth run has no {', '.join(same)} rows: same data as 'all data'"
        results["rows"][name] = info
        atomic_write_json(out, results)  # a row at a time: an interrupted run keeps what it measured
    if not args.no_reference:
        for name, model in (("BM25", "bm25"), (f"{args.model}, untuned", args.model)):
            print(f"\n=== reference: {name}", flush=True)
            results["reference"][name] = {"ndcg@10": evaluate(model, args, "auto")}
            atomic_write_json(out, results)
    sliced = "sliced: " + ", ".join(f"{k}={v}" for k, v in (("max_docs", args.max_docs),
                                                                ("max_queries", args.max_queries)) if v)
    print(f"\nAblation: {args.model}, LoRA, {args.steps} steps of {args.batch_size} on {args.workers} workers, "
          f"seed {args.seed}, evaluation autocast {args.autocast}"
          f"{', ' + ', '.join(args.set) if args.set else ''}"
          f"{' (' + sliced + ')' if args.max_docs or args.max_queries else ' (whole collections)'}\n")
    base = results["rows"].get("all data", {}).get("ndcg@10")
    print("| data | train rows | mined | train s | MS MARCO nDCG@10 | Cranfield nDCG@10 | Δ vs all (mean) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results["reference"].items():
        m, c = r["ndcg@10"]["msmarco-subset"], r["ndcg@10"]["cranfield"]
        print(f"| {name} (reference, not trained) | - | - | - | {m:.4f} | {c:.4f} | |")
    for name, r in results["rows"].items():
        m, c = r["ndcg@10"]["msmarco-subset"], r["ndcg@10"]["cranfield"]
        delta = "" if not base else f"{((m + c) - sum(base.values())) / 2 * 100:+.1f} pts"
        print(f"| {name} | {r['rows']} | {r['rows_mined']} | {r['train_s']:.0f} | {m:.4f} | {c:.4f} | {delta} |"
              + (f" {r['note']}" if r.get("note") else ""))
    atomic_write_json(out, results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

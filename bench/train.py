"""Ray Train overhead and engine comparison, on the same model, data and steps.

1. A plain single-process PyTorch loop (same task code, same batches read in-process).
2. ``rayembed train`` with 1 worker (DDP engine, i.e. no wrapper at world size 1); then, to find
   where a difference lives, the plain loop inside a Ray task (a Ray worker process without Ray
   Train or Ray Data), the plain loop while another process keeps a core busy, and Ray Train
   without Ray Data's prefetch (``data.stream.prefetch_batches=0``).
3. 2 workers with DDP, then 2 workers with DeepSpeed ZeRO-3.

Per-step time excludes start-up: it is the wall time between consecutive steps (metric
reporting included) from step ``--skip`` on. Goal: Ray Train <= 1.2x the plain loop per step.

Where a step's time goes, per run (medians over the steps after ``--skip``): ``data`` is the wait
for the next tokenised batch, ``compute`` the forward, backward and optimizer step (all-reduce
included at 2 workers), ``between`` the time between one step's end and the next step's start
(metric reporting and checkpoints in Ray Train). Achieved model FLOP/s (train/flops.py, non-padding
tokens) is set against the measured peak of a large fp32 matrix multiply on the same thread count,
which is what a training step can at best reach on this CPU (MFU).

    python bench/train.py                                  # tiny-llama, 30 steps (~5 min on 2 cores)
    python bench/train.py --model smollm2-135m --steps 12 --batch 8

Writes bench/out/train.json. Timings on a shared machine are noisy; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load


def write_pairs(data_dir: Path, out: Path, n_rows: int) -> Path:
    """Weak pairs from real MS MARCO passages: first sentence -> rest, another passage as negative."""
    from rayembed.data.schema import make_row, to_table
    from rayembed.io import atomic_write_parquet

    passages = []
    with open(data_dir / "msmarco-subset" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            head, _, rest = json.loads(line)["text"].partition(". ")
            if len(head.split()) >= 4 and len(rest.split()) >= 8:
                passages.append((head, rest))
            if len(passages) > n_rows:
                break
    rows = [
        make_row(instruction="Given the opening sentence of a passage, retrieve its continuation",
                 query=h, positive=r, negatives=[passages[(i + 7) % len(passages)][1]],
                 task_type="retrieval", source="msmarco-crops")
        for i, (h, r) in enumerate(passages[:n_rows])
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out / "part-00000.parquet", to_table(rows))
    return out


def overrides(args, tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run_dir={tmp / name}", f"model.name_or_path={args.model}", f"model.max_length={args.doc_len}",
        "model.lora.enabled=true", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.query_max_length={args.query_len}", f"train.doc_max_length={args.doc_len}",
        "train.warmup_steps=2", "train.lr=0.0005", f"train.checkpoint_every={args.steps}",
        f"train.log_every={args.log_every}", "train.temperature=0.05",
        "compute.num_cpus=4", "compute.object_store_memory_mb=256", *extra,
    ]


def per_step(times: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])][skip:]
    return statistics.median(gaps) if gaps else float("nan")


def gemm_peak(threads: int, dtype: str = "float32", n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of an n x n x n matrix multiply with ``threads`` torch threads (the best of a few runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, dtype=getattr(torch, dtype))
        torch.mm(a, b)
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(before)


def breakdown(hist: list[dict], skip: int) -> dict:
    """Median data wait, compute and between-step time of a run's per-step records."""
    rows = hist[skip + 1:] or hist
    between = [b["time"] - b["step_s"] - a["time"] for a, b in zip(hist, hist[1:])][skip:]
    return {"data_s": statistics.median(r.get("data_s", 0.0) for r in rows),
            "compute_s": statistics.median(r["step_s"] - r.get("data_s", 0.0) for r in rows),
            "between_s": statistics.median(between) if between else float("nan")}


def plain_loop(args, data: Path, tmp: Path) -> dict:
    """The single-process baseline: same task and engine code, batches read in this process."""
    import torch

    from rayembed.config import load_config
    from rayembed.data.stream import LocalShard, iter_train_batches
    from rayembed.train.engine import DDPEngine
    from rayembed.train.flops import step_flops
    from rayembed.train.tasks import make_task
    from rayembed.train.trainer import stream_spec

    cfg = load_config(None, overrides(args, tmp, "plain"))
    # Ray gives a worker with a fractional CPU OMP_NUM_THREADS=1; the baseline uses the same
    # thread count, so the comparison is of the loops, not of thread settings.
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    task = make_task(cfg, torch.device("cpu"))
    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    spec = stream_spec(cfg, [str(data)])
    batches = iter_train_batches(LocalShard(spec), spec, rank=0)
    flops = step_flops(task.model, checkpointing=bool(cfg.train.gradient_checkpointing))
    setup = time.perf_counter() - t0
    stamps, losses, hist = [], [], []
    tokens = padded = 0.0
    for _ in range(args.steps):
        t_start = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t_start
        out = task.step(engine, batch)
        engine.step()
        losses.append(out["loss"])
        stamps.append(time.perf_counter())
        hist.append({"time": stamps[-1], "step_s": stamps[-1] - t_start, "data_s": t_data})
        if len(stamps) > args.skip + 1:
            tokens += float(batch.get("num_tokens", 0))
            padded += float(batch["q_input_ids"].numel() + batch["d_input_ids"].numel())
    timed = stamps[-1] - stamps[args.skip]
    return {"setup_s": setup, "total_s": time.perf_counter() - t0, "per_step_s": per_step(stamps, args.skip),
            "first_loss": losses[0], "last_loss": losses[-1], **breakdown(hist, args.skip),
            "model_flops_per_s": tokens * flops.per_token / timed if timed > 0 else float("nan"),
            "padding_share": 1 - tokens / padded if padded else 0.0}


def ray_run(args, data: Path, tmp: Path, name: str, *extra: str) -> dict:
    from rayembed.config import load_config
    from rayembed.train import run_training

    cfg = load_config(None, overrides(args, tmp, name, *extra))
    t0 = time.perf_counter()
    model_dir = run_training(cfg, [str(data)], log_level="WARNING")
    total = time.perf_counter() - t0
    hist = [json.loads(x) for x in (model_dir.parent / "metrics.jsonl").read_text().splitlines()]
    logged = [h for h in hist if "model_flops_per_s" in h][1:]  # the first window holds the warm-up
    return {"total_s": total, "per_step_s": per_step([h["time"] for h in hist], args.skip),
            "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"], **breakdown(hist, args.skip),
            "model_flops_per_s": statistics.median(h["model_flops_per_s"] for h in logged) if logged else float("nan"),
            "padding_share": statistics.median(h["padding_share"] for h in logged) if logged else float("nan")}


def plain_in_ray_task(args, data: Path, tmp: Path) -> dict:
    """The same plain loop inside a Ray task: a Ray worker process, without Ray Train or Ray Data.
    Slower here than in the driver means the process is the cost; as fast means the loop is."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(plain_loop).remote(args, data, tmp))


def plain_beside_busy_core(args, data: Path, tmp: Path) -> dict:
    """The plain loop while another process spins on a core: what a neighbour's activity alone
    (Ray's own processes, the tokenising actors) costs a one-thread step on this machine."""
    import subprocess

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return plain_loop(args, data, tmp)
    finally:
        spinner.kill()
        spinner.wait()


def report(name: str, r: dict, peak: float) -> str:
    return (f"{name:26s}: {r['per_step_s'] * 1000:8.1f} ms/step  data {r['data_s'] * 1000:6.1f}  "
            f"compute {r['compute_s'] * 1000:7.1f}  between {r['between_s'] * 1000:6.1f} ms  "
            f"{r['model_flops_per_s'] / 1e9:6.2f} GFLOP/s = {100 * r['model_flops_per_s'] / peak:4.1f}% of peak  "
            f"padding {100 * r['padding_share']:.0f}%")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch (examples per step)")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--skip", type=int, default=3, help="steps excluded as warm-up")
    p.add_argument("--log-every", type=int, default=10, help="train.log_every for the Ray runs")
    p.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker DDP vs ZeRO-3 part")
    args = p.parse_args()

    import ray

    from rayembed.config import ComputeConfig
    from rayembed.runtime import init_ray, resolve_data_dir, setup_logging

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = write_pairs(resolve_data_dir(), tmp / "data", max(512, args.batch * (args.steps + 2)))
    results: dict = {"model": args.model, "steps": args.steps, "batch": args.batch,
                     "query_len": args.query_len, "doc_len": args.doc_len, "cpu_count": os.cpu_count()}
    print(f"model {args.model}, {args.steps} steps, global batch {args.batch}", flush=True)
    # The peak a step could reach: a large fp32 matrix multiply on one thread (what a worker with a
    # fractional CPU gets) and on every core; bf16 beside it for CPUs with AVX-512 BF16.
    peaks = {f"{dtype}_{t}t": gemm_peak(t, dtype) for dtype in ("float32", "bfloat16") for t in (1, os.cpu_count())}
    results["gemm_peak_flops"] = peaks
    print("GEMM peak (2048^3 matmul): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()),
          flush=True)
    peak = peaks["float32_1t"]
    results["plain"] = plain_loop(args, data, tmp)
    print(report("plain PyTorch loop", results["plain"], peak), flush=True)

    init_ray(ComputeConfig(num_cpus=4, object_store_memory_mb=256, temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"),
                           log_to_driver=False))
    results["ray_1w"] = ray_run(args, data, tmp, "ray1", "train.num_workers=1", "train.engine=ddp")
    # The machine is shared: measure the plain loop again right after, and compare against the
    # faster of the two plain runs (load only ever slows a run down).
    again = plain_loop(args, data, tmp)
    results["plain_again"] = again
    print(report("plain PyTorch loop (again)", again, peak), flush=True)
    best_plain = min(results["plain"]["per_step_s"], again["per_step_s"])
    ratio = results["ray_1w"]["per_step_s"] / best_plain
    results["ray_over_plain_per_step"] = ratio
    print(report("rayembed train, 1 worker", results["ray_1w"], peak)
          + f" (total {results['ray_1w']['total_s']:.1f} s incl. start-up)", flush=True)
    print(f"ratio Ray/plain per step: {ratio:.2f}x (goal <= 1.2x)", flush=True)
    # Where the difference lives: the Ray worker process itself, or the prefetch thread that Ray
    # Data runs beside the training loop in the worker.
    results["plain_in_ray_task"] = plain_in_ray_task(args, data, tmp)
    print(report("plain loop in a Ray task", results["plain_in_ray_task"], peak), flush=True)
    results["plain_beside_busy_core"] = plain_beside_busy_core(args, data, tmp)
    print(report("plain loop, a core busy", results["plain_beside_busy_core"], peak), flush=True)
    results["ray_1w_no_prefetch"] = ray_run(args, data, tmp, "ray1np", "train.num_workers=1", "train.engine=ddp",
                                            "data.stream.prefetch_batches=0")
    print(report("Ray Train, no prefetch", results["ray_1w_no_prefetch"], peak), flush=True)
    if not args.no_two_workers:
        for name, engine in (("ddp_2w", "ddp"), ("zero3_2w", "deepspeed")):
            results[name] = ray_run(args, data, tmp, name, "train.num_workers=2", f"train.engine={engine}")
            # Two workers of one thread each: their peak is twice the one-thread figure.
            print(report(f"2 workers, {engine}", results[name], 2 * peak), flush=True)
        results["zero3_over_ddp_per_step"] = results["zero3_2w"]["per_step_s"] / results["ddp_2w"]["per_step_s"]
        print(f"ratio ZeRO-3/DDP per step: {results['zero3_over_ddp_per_step']:.2f}x", flush=True)
    ray.shutdown()
    out = REPO / "bench" / "out" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from rayembed.io import atomic_write_json

    atomic_write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

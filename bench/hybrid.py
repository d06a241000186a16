"""Hybrid retrieval quality: nDCG@10 of dense, BM25, their fusion, learned sparse and multi-vector reranking.

Dense is all-MiniLM-L6-v2. Its sparse and multi-vector heads are trained here, in process, with
the backbone frozen: hidden states of weak pairs are computed once, then only the two heads
learn (in-batch contrastive loss, the heads' torch scoring twins). Weak pairs come from the raw
text of the two corpora (inverse cloze: a span of a passage is the query, the rest of the passage
its positive); no evaluation query or judgement is used for training. Every row is then scored
by `rayembed.evaluate` on the MS MARCO subset (5,000 passages) and Cranfield (1,400 abstracts),
through the index parts and `rayembed.search.HybridSearcher` (top 100; reranking re-scores
the fused top 100).

    python bench/hybrid.py                    # ~10-15 min on 2 cores
    python bench/hybrid.py --train-pairs 400 --epochs 2 --max-docs 1000 --max-queries 20   # a short form

Writes bench/out/hybrid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load


def weak_pairs(data_dir: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """Inverse-cloze pairs from the corpora' raw text: (a span of a passage, the rest of it)."""
    from rayembed.index.corpus import read_smart

    rng = random.Random(seed)
    texts = []
    with open(data_dir / "msmarco-subset" / "corpus.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f if line.strip()]
    texts += [d["text"] for d in read_smart(data_dir / "cranfield" / "cran.all.1400")]
    texts = [t for t in texts if len(t.split()) >= 30]
    rng.shuffle(texts)
    pairs = []
    for t in texts[:n]:
        words = t.split()
        span = rng.randint(8, 16)
        start = rng.randrange(0, len(words) - span)
        query = " ".join(words[start : start + span])
        rest = words if rng.random() < 0.1 else words[:start] + words[start + span :]
        pairs.append((query, " ".join(rest)))
    return pairs


def train_heads(emb, pairs: list[tuple[str, str]], *, epochs: int, batch: int, lr: float, q_len: int, d_len: int,
                temperature: float, seed: int) -> dict:
    """Train the sparse and multi-vector heads on frozen hidden states; returns losses and seconds."""
    import torch

    from rayembed.modeling.heads import maxsim_torch, sparse_scores_torch

    torch.manual_seed(seed)
    for p in emb.parameters():
        p.requires_grad_(False)
    heads = [emb.sparse_head, emb.multivector_head]
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    cache = []
    emb.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            if len(chunk) < 2:
                continue
            sides = []
            for texts, max_len in (([q for q, _ in chunk], q_len), ([d for _, d in chunk], d_len)):
                enc = emb.pad(emb.tokenize_ids(texts, max_length=max_len))
                ids, att = enc["input_ids"], enc["attention_mask"]
                sides.append((emb.hidden_states(ids, att).float().clone(), ids.clone(), emb.token_mask(ids, att).clone()))
            cache.append(sides)
    encode_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = []
    for p in params:
        p.grad = None
    for h in heads:
        h.train()
    t1 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(cache)).tolist()
        tot_s = tot_m = 0.0
        for j in order:
            (hq, iq, mq), (hd, idd, md) = cache[j]
            labels = torch.arange(hq.shape[0])
            s = sparse_scores_torch(emb.sparse_head(hq), iq, emb.sparse_head(hd), idd, mq, md)  # (B, B)
            m = maxsim_torch(emb.multivector_head(hq), mq, emb.multivector_head(hd), md)  # (B, B)
            loss_s = torch.nn.functional.cross_entropy(s, labels)
            loss_m = torch.nn.functional.cross_entropy(m / temperature, labels)
            opt.zero_grad()
            (loss_s + loss_m).backward()
            opt.step()
            tot_s += float(loss_s)
            tot_m += float(loss_m)
        log.append({"epoch": epoch + 1, "sparse_loss": tot_s / len(cache), "multivector_loss": tot_m / len(cache)})
        print(f"  epoch {epoch + 1}: sparse loss {log[-1]['sparse_loss']:.3f}, "
              f"multivector loss {log[-1]['multivector_loss']:.3f}", flush=True)
    for h in heads:
        h.eval()
    return {"pairs": len(pairs), "batches": len(cache), "encode_s": encode_s, "train_s": time.perf_counter() - t1,
            "epochs": log}


ROWS = [
    ("dense+bm25 (rrf)", {"dense": 1.0, "bm25": 1.0}),
    ("dense+sparse (rrf)", {"dense": 1.0, "sparse": 1.0}),
    ("sparse", {"sparse": 1.0}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--train-pairs", type=int, default=3000, help="weak pairs from the corpora' raw text")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.05, help="MaxSim logits are divided by it")
    p.add_argument("--mv-dim", type=int, default=128, help="multi-vector dimension")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=192)
    p.add_argument("--max-docs", type=int, default=0, help="cap each evaluation corpus (0: all)")
    p.add_argument("--max-queries", type=int, default=0, help="evaluate the first N judged queries (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "hybrid.json"))
    args = p.parse_args()

    import torch

    from rayembed.config.eval import DatasetSpec
    from rayembed.evaluate.runner import evaluate_models, machine_info
    from rayembed.io import atomic_write_json
    from rayembed.modeling.embedder import Embedder
    from rayembed.runtime import resolve_data_dir, setup_logging

    setup_logging("WARNING")
    torch.set_num_threads(os.cpu_count() or 1)
    data_dir = resolve_data_dir()
    t0 = time.perf_counter()
    emb = Embedder.from_pretrained(args.model, sparse=True, multivector=True, multivector_dim=args.mv_dim)
    pairs = weak_pairs(data_dir, args.train_pairs, args.seed)
    print(f"training the sparse and multi-vector heads of {args.model} on {len(pairs)} weak pairs "
          "(backbone frozen)", flush=True)
    training = train_heads(emb, pairs, epochs=args.epochs, batch=args.batch, lr=args.lr, q_len=args.query_len,
                           d_len=args.doc_len, temperature=args.temperature, seed=args.seed)
    model_dir = Path(tempfile.mkdtemp(prefix="hybrid-bench-")) / "model"
    emb.save_pretrained(model_dir)

    hybrid = []
    for name, methods in ROWS:
        hybrid.append({"name": name, "methods": methods, "fusion": "rrf"})
    for name, methods in [("dense", {"dense": 1.0}), ("bm25", {"bm25": 1.0}), *ROWS[:2]]:
        hybrid.append({"name": f"{name} + mv rerank", "methods": methods, "fusion": "rrf", "rerank": "multivector",
                       "rerank_top": 100})
    datasets = [DatasetSpec(name="msmarco-subset", path="msmarco-subset", format="beir", max_docs=args.max_docs,
                            max_queries=args.max_queries),
                DatasetSpec(name="cranfield", path="cranfield", format="smart", max_docs=args.max_docs,
                            max_queries=args.max_queries)]
    t_eval = time.perf_counter()
    res = evaluate_models({"dense": str(model_dir), "bm25": "bm25"}, datasets, data_dir=data_dir, hybrid=hybrid,
                          top_k=100, batch_size=64, max_length=256, plot=False)
    eval_s = time.perf_counter() - t_eval
    rows = list(res["metrics"])
    order = ["dense", "bm25", "dense+bm25 (rrf)", "dense+sparse (rrf)", "sparse"]
    order += [r for r in rows if r not in order]
    ndcg = {r: {ds: res["metrics"][r][ds]["ndcg@10"] for ds in res["metrics"][r]} for r in order}
    result = {
        "what": f"nDCG@10, top 100; dense = {args.model}; sparse and multi-vector heads trained with the backbone "
                "frozen on weak pairs from the corpora' raw text (no evaluation queries or judgements)",
        "machine": machine_info(),
        "settings": vars(args),
        "ndcg_at_10": ndcg,
        "datasets": {ds: {k: v for k, v in info.items() if k in ("num_queries", "num_docs")}
                     for ds, info in res["datasets"].items()},
        "training": training,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t0,
    }
    ds_names = list(res["datasets"])
    print("\nnDCG@10 (top 100)\n")
    print("| row | " + " | ".join(ds_names) + " |")
    print("|---|" + "---:|" * len(ds_names))
    for r in order:
        print(f"| {r} | " + " | ".join(f"{ndcg[r].get(ds, float('nan')):.4f}" for ds in ds_names) + " |")
    print(f"\nheads: {training['train_s']:.0f} s training on {training['pairs']} pairs "
          f"(+{training['encode_s']:.0f} s frozen encoding); evaluation {eval_s:.0f} s")
    out = Path(args.out)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real check: MS MARCO subset, all-MiniLM-L6-v2, through the Ray Data path, nDCG@10 0.79-0.81."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayembed.config import load_config
from rayembed.index import ShardedIndex, build_index


@pytest.mark.slow
def test_msmarco_minilm_ndcg_through_ray(ray_local, data_dir, tmp_path):
    import pytrec_eval

    from rayembed.modeling.embedder import Embedder

    cfg = load_config(None, [
        f"data_dir={data_dir}", f"run_dir={tmp_path}", "model.name_or_path=all-minilm-l6-v2",
        "index.corpus=msmarco-subset", "index.shard_size=2000", "index.encode.min_actors=1",
        "index.encode.max_actors=2", "index.encode.num_cpus_per_actor=0.5", "index.encode.batch_size=64",
        "index.encode.rows_per_block=256", "compute.log_to_driver=false",
    ])
    emb = Embedder.from_pretrained("all-minilm-l6-v2")
    idx = ShardedIndex.open(build_index(cfg), expected_embedder=emb)
    assert idx.ntotal == 5000 and idx.num_shards == 3

    root = data_dir / "msmarco-subset"
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels/test.tsv").read_text().splitlines():
        qid, did, grade = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(grade)
    scores, ids = idx.search(emb.encode([q["text"] for q in queries]), 10)
    run = {}
    for q, row_s, row_i in zip(queries, scores, ids):
        if q["_id"] in qrels:
            run[q["_id"]] = {d["doc_id"]: float(s) for d, s in zip(idx.get_documents(row_i), row_s) if d}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    ndcg = float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))
    assert len(per_query) == 43
    assert 0.79 <= ndcg <= 0.81, ndcg

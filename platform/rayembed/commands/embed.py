"""``rayembed embed``: embed a JSONL or Parquet file of texts into Parquet (ids + vectors)."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "embed",
        help="Embed a JSONL/Parquet file of texts into Parquet with ids and vectors.",
        description=(
            "Embed every row of a JSONL or Parquet file with the configured model (model.* keys). "
            "Output: Parquet with columns id (string) and vector (list<float32>), plus "
            "config.resolved.yaml beside it. Example:\n"
            "  rayembed embed --input corpus.jsonl --output vecs.parquet model.name_or_path=all-minilm-l6-v2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--input", required=True, help="JSONL or Parquet file of texts.")
    p.add_argument("--output", required=True, help="Parquet file to write.")
    p.add_argument("--id-field", default="id", help="Field holding the id (default id; _id also accepted).")
    p.add_argument("--text-field", default="text", help="Field holding the text (default text).")
    p.add_argument("--title-field", default=None, help="Optional title field, prepended to the text.")
    p.add_argument("--instruction", default=None, help="Embed as queries with this instruction.")
    p.add_argument("--batch-size", type=int, default=32, help="Texts per forward pass (default 32).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    from rayembed.cli import load_from_args
    from rayembed.config import save_resolved
    from rayembed.io import atomic_write_parquet, read_records
    from rayembed.modeling.embedder import Embedder

    cfg = load_from_args(args)
    rows = read_records(args.input)
    if not rows:
        raise ValueError(f"Input file '{args.input}' holds no rows; nothing to embed.")
    ids, texts = [], []
    for i, row in enumerate(rows):
        rid = row.get(args.id_field, row.get("_id", i))
        text = row.get(args.text_field)
        if not isinstance(text, str):
            raise ValueError(
                f"Row {i} of '{args.input}' has no string field '{args.text_field}'; "
                "pass --text-field to name the text column."
            )
        if args.title_field and row.get(args.title_field):
            text = f"{row[args.title_field]} {text}"
        ids.append(str(rid))
        texts.append(text)
    emb = Embedder.from_config(cfg.model)
    start = time.perf_counter()
    vecs = emb.encode(texts, instruction=args.instruction, batch_size=args.batch_size, show_progress=True)
    secs = time.perf_counter() - start
    logger.info("Embedded %d texts in %.1f s (%.1f texts/s), dim %d", len(texts), secs, len(texts) / secs, emb.dim)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1).astype(np.float32)), emb.dim),
    })
    out = Path(args.output)
    atomic_write_parquet(out, table)
    save_resolved(cfg, out.parent, name=f"{out.stem}.config.resolved.yaml")
    print(f"wrote {len(ids)} vectors of dim {emb.dim} to {out}")
    return 0

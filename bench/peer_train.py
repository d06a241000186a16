"""rayembed's training against sentence-transformers, side by side, on the same rows.

Both sides LoRA-train the same SmolLM2-135M for the same steps, batch, learning rate, warm-up,
temperature (sentence-transformers' MultipleNegativesRankingLoss ``scale`` = 1 / tau), LoRA
rank, alpha, dropout and targets, and thread count, then both trained models are evaluated by
one call of rayembed's evaluation (nDCG@10 on the MS MARCO subset and on Cranfield).

- rayembed: ``run_training`` (Ray Train, one worker, DDP engine, the Ray Data token stream).
- sentence-transformers: ``SentenceTransformer(modules=[Transformer, Pooling("lasttoken"),
  Normalize])`` on the same HF folder rayembed loads, the text modality only (sentence-transformers
  6 would otherwise wrap every text in SmolLM2's chat template), one EOS appended by the tokenizer
  as rayembed does, LoRA through peft's ``get_peft_model`` on the inner model, and
  ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (or the cached variant).

Same rows, same order, same token ids: the peer's dataset is rayembed's own stream (the same
spec, read in this process), batch by batch, as text columns (anchor = the query with its
instruction as rayembed formats it, positive, negative): the mix's original texts, which the peer
truncates per column (router_mapping: anchor -> query length, the rest -> document length) as
rayembed does. The script checks that every text tokenises, with the peer's own preprocessing,
to exactly the ids rayembed trained on, and that each step's first row id matches rayembed's
metrics.jsonl. The peer's batch sampler keeps that order (``--peer-sampler no_duplicates`` uses
sentence-transformers' own ``NO_DUPLICATES`` sampler instead, which reorders rows). The LoRA
weights start from the same seed (the same initial adapter), so both first-step losses agree.
With ``--peer-schedule same`` (default) the peer's AdamW follows rayembed's warm-up/decay curve
exactly; ``hf`` uses the trainer's own linear schedule, whose first warm-up step has learning
rate 0.

Evaluation: the peer's LoRA adapter is written as a rayembed embedder folder (the rayembed run's
``embedder_config.json`` and tokenizer), after checking that the folder embeds probe texts as the
peer's own ``encode`` does; then one ``evaluate_models`` call scores both.

Throughput: examples/s and tokens/s (non-padding) of the training loop, from step-end
wall-clock stamps (rayembed's metrics.jsonl, a trainer callback for the peer), over the steps
after ``--skip`` warm-up steps; model loading, Ray start-up and export are reported apart
("other s"). Both train with ``--threads`` torch threads; rayembed tokenises in Ray Data actors
beside the training worker, the peer in its data collator between steps (each its own design).

    python bench/peer_train.py --steps 20 --batch-size 8 --max-docs 500 --max-queries 30  # quick, sliced
    python bench/peer_train.py                  # 120 steps x 16, whole collections: hours on 2 cores

On 2 busy CPU cores the quick form took about 35 minutes, most of it evaluation (1,000 texts of
up to 256 tokens per model, at 1 thread).

Writes bench/out/peer_train.json. The machine is shared and timings are noisy: compare within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load

SOURCES = (
    "[{name: stsb, format: stsb, path: stsb/sts-train.csv, min_score: 4.0},"
    " {name: weak-msmarco, format: weak, path: msmarco-subset, weak_mode: crops}]"
)
DATASETS = {"msmarco-subset": ("msmarco-subset", "beir"), "cranfield": ("cranfield", "smart")}
RAYEMBED, PEER = "rayembed", "sentence-transformers"
PROBE_TEXTS = ["what is the boiling point of water", "Paris is the capital of France.",
               "Instruct: Given a question, retrieve passages that answer it\nQuery: how do wings make lift"]


# ----------------------------------------------------------------------------- config and rows


def make_config(args, run_dir: Path):
    from rayembed.config import load_config

    over = [
        f"run_dir={run_dir}", "data.val_fraction=0.0", f"seed={args.seed}",
        f"model.name_or_path={args.model}", f"model.max_length={args.eval_len}",
        "model.lora.enabled=true", f"model.lora.r={args.lora_r}", f"model.lora.alpha={args.lora_alpha}",
        f"model.lora.dropout={args.lora_dropout}", f"model.lora.target_modules=[{args.lora_targets}]",
        f"model.lora.top_layers={args.lora_top_layers or 'null'}",
        "train.num_workers=1", f"train.cpus_per_worker={args.threads}", "train.engine=ddp",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        f"train.warmup_steps={args.warmup}", f"train.temperature={args.temperature}", "train.num_negatives=1",
        f"train.query_max_length={args.query_len}", f"train.doc_max_length={args.doc_len}",
        # Checkpoint only at the end: neither loop saves mid-run (the peer: save_strategy=no).
        f"train.checkpoint_every={args.steps}", f"train.log_every={args.log_every}",
        f"compute.num_cpus={max(4, args.threads + 2)}", "compute.object_store_memory_mb=512",
        f"compute.temp_dir={tempfile.mkdtemp(prefix='rp', dir='/tmp')}", "compute.log_to_driver=false",
    ]
    if not args.mix:
        over.append(f"data.sources={SOURCES}")
    return load_config(None, over)


def _unpad(ids, mask) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _source_rows(paths: list[str]) -> dict[str, dict]:
    """The mix's rows by id (the unified schema's text columns)."""
    import pyarrow.parquet as pq

    from rayembed.data.stream import READ_COLUMNS, resolve_parquet_files

    rows: dict[str, dict] = {}
    for f in resolve_parquet_files(paths):
        for r in pq.read_table(f, columns=READ_COLUMNS).to_pylist():
            rows[r["id"]] = r
    return rows


def rayembed_rows(cfg, paths: list[str], steps: int) -> dict:
    """rayembed's first ``steps`` training batches (its own stream code and spec, read in this
    process) as text columns for the peer: each text is the mix's original text, found by row id,
    whose tokenisation is the ids rayembed trained on (truncation included: the peer truncates
    the same way). A negative rayembed filled from an earlier positive is that positive's text."""
    from rayembed.data.stream import LocalShard, load_text_encoder
    from rayembed.train.loop import TrainState, _batches
    from rayembed.train.trainer import stream_spec

    spec = stream_spec(cfg, paths)
    enc = load_text_encoder(spec.tokenizer_dir)
    source = _source_rows(paths)
    stream = _batches(LocalShard(spec), spec, TrainState())
    qlen, dlen = spec.query_max_length, spec.doc_max_length

    def fmt(text: str, ins: str | None) -> str:
        return enc.format_query(text, ins) if ins else text

    batches = [next(stream)[2] for _ in range(steps)]
    # Two passes: a filled negative is an earlier positive, or, in the first batch, one of the
    # next batch's (the filler's look-ahead), so every positive's text is known first.
    positives: dict[tuple, str] = {}  # rayembed's positive ids -> text, for filled negatives
    cols: dict[str, list[str]] = {"anchor": [], "positive": []}
    ids_of: dict[str, list[list[int]]] = {"anchor": [], "positive": []}  # what rayembed trained on
    first_ids, tokens, mismatched, decoded = [], [], 0, 0
    parsed = []
    for batch in batches:
        q = _unpad(batch["q_input_ids"], batch["q_attention_mask"])
        d = _unpad(batch["d_input_ids"], batch["d_attention_mask"])
        b = len(q)
        recs = [source[i] for i in batch["id"]]
        anchors = [fmt(r["query"], r["instruction"]) for r in recs]
        pos = [fmt(r["positive"], r["instruction"]) if r["symmetric"] else r["positive"] for r in recs]
        for ids, text in zip(d[:b], pos):
            positives.setdefault(tuple(ids), text)
        parsed.append((q, d, b, recs, anchors, pos))
    for batch, (q, d, b, recs, anchors, pos) in zip(batches, parsed):
        mismatched += sum(x != y for x, y in zip(enc.tokenize_ids(anchors, max_length=qlen), q))
        mismatched += sum(x != y for x, y in zip(enc.tokenize_ids(pos, max_length=dlen), d[:b]))
        cols["anchor"] += anchors
        cols["positive"] += pos
        ids_of["anchor"] += q
        ids_of["positive"] += d[:b]
        n = len(d) // b - 1
        for j in range(n):  # negative j of query i is row b + i*n + j
            col = cols.setdefault(f"negative_{j + 1}", [])
            for i, r in enumerate(recs):
                ids = d[b + i * n + j]
                ids_of.setdefault(f"negative_{j + 1}", []).append(ids)
                own = [fmt(x, r["instruction"]) if r["symmetric"] else x for x in (r["negatives"] or [])]
                hit = [t for t, t_ids in zip(own, enc.tokenize_ids(own, max_length=dlen) if own else []) if t_ids == ids]
                if hit:
                    col.append(hit[0])
                elif tuple(ids) in positives:
                    col.append(positives[tuple(ids)])
                else:  # not found in the mix (the empty document, say): its decoded ids
                    decoded += 1
                    body = ids[:-1] if ids[-1] == enc.tokenizer.eos_token_id else ids
                    text = enc.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    mismatched += enc.tokenize_ids([text], max_length=dlen)[0] != ids
                    col.append(text)
        first_ids.append(batch["id"][0])
        tokens.append(int(batch["num_tokens"]))
    return {"columns": cols, "ids": ids_of, "first_ids": first_ids, "tokens": tokens, "token_ids_mismatched": mismatched,
            "texts": sum(len(v) for v in cols.values()), "decoded": decoded, "negatives_per_row": len(cols) - 2,
            "query_max_length": qlen, "doc_max_length": dlen}


# ----------------------------------------------------------------------------- timing


def loop_stats(stamps: list[float], start: float, batch: int, tokens: list[int], skip: int) -> dict:
    """Throughput from step-end stamps: examples/s and tokens/s over steps ``skip+1..N``; the
    loop's wall time from ``start`` (the first step's start) to the last step's end."""
    timed = stamps[-1] - stamps[skip - 1]
    n = len(stamps) - skip
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][skip - 1:]
    return {"loop_s": stamps[-1] - start, "timed_steps": n, "timed_s": timed,
            "examples_per_s": n * batch / timed, "tokens_per_s": sum(tokens[skip:]) / timed,
            "median_step_s": statistics.median(gaps)}


def run_rayembed(cfg, paths: list[str], args, tokens: list[int]) -> dict:
    import ray

    from rayembed.runtime import init_ray
    from rayembed.train import run_training

    init_ray(cfg.compute)
    t0 = time.perf_counter()
    model_dir = Path(run_training(cfg, paths, log_level="WARNING"))
    fit_s = time.perf_counter() - t0
    ray.shutdown()
    hist = [json.loads(x) for x in (model_dir.parent / "metrics.jsonl").read_text().splitlines()]
    stamps = [h["time"] for h in hist]
    out = loop_stats(stamps, stamps[0] - hist[0]["step_s"], args.batch_size, tokens, args.skip)
    tail = [h["loss"] for h in hist[-args.log_every:]]
    from safetensors import safe_open

    with safe_open(str(model_dir / "adapter_model.safetensors"), "pt") as f:
        trainable = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    out.update(model_dir=str(model_dir), fit_s=fit_s, other_s=fit_s - out["loop_s"], steps=len(hist),
               first_ids=[h.get("first_id") for h in hist], first_loss=hist[0]["loss"],
               last_window_loss=sum(tail) / len(tail), trainable_params=trainable)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ----------------------------------------------------------------------------- the peer


def build_peer(cfg, args):
    """SentenceTransformer(Transformer -> last-token Pooling -> Normalize) with LoRA, on the HF
    folder rayembed loads for ``model.name_or_path``."""
    import torch
    from peft import get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from tokenizers.processors import TemplateProcessing

    from rayembed.modeling.backbones import resolve_checkpoint
    from rayembed.modeling.loading import peft_lora_config

    mc = cfg.model
    where = resolve_checkpoint(mc.name_or_path, gguf_file=mc.gguf_file, cache=mc.cache_dir)
    torch.manual_seed(cfg.seed)  # as rayembed's worker does before it builds the model
    tr = modules.Transformer(
        str(where), max_seq_length=args.doc_len, model_kwargs={"dtype": torch.float32},
        # rayembed's two training lengths; the trainer's router_mapping names each column's task.
        query_length=args.query_len, document_length=args.doc_len,
        # Plain text in: sentence-transformers 6 otherwise renders texts through the chat template.
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    tok = tr.tokenizer
    if tok.pad_token_id is None:  # as rayembed's TextTokenizer does
        tok.pad_token = tok.eos_token
    # Exactly one trailing EOS, kept under truncation, as rayembed's tokenize_ids does: the
    # tokenizer's post-processor adds it (the truncation leaves room for it).
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tok.eos_token_id)])
    hidden = tr.model.config.hidden_size
    model = SentenceTransformer(modules=[tr, modules.Pooling(hidden, pooling_mode="lasttoken"), modules.Normalize()],
                                device="cpu")
    # rayembed's own LoraConfig for model.lora: the same modules, on the same (top) layers.
    tr.model = get_peft_model(tr.model, peft_lora_config(tr.model, mc.lora, mc.name_or_path))
    return model


def column_tasks(columns) -> dict[str, str]:
    return {c: "query" if c == "anchor" else "document" for c in columns}


def peer_token_check(model, rows: dict) -> int:
    """Texts the peer tokenises (as its trainer's collator does, per column task) to other ids
    than rayembed trained on."""
    bad = 0
    for col, task in column_tasks(rows["columns"]).items():
        texts, want = rows["columns"][col], rows["ids"][col]
        for i in range(0, len(texts), 64):
            feats = model.preprocess(texts[i:i + 64], task=task)
            got = _unpad(feats["input_ids"], feats["attention_mask"])
            bad += sum(a != b for a, b in zip(got, want[i:i + 64]))
    return bad


def run_peer(cfg, args, rows: dict, run_dir: Path) -> tuple[dict, object]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, DefaultBatchSampler
    from sentence_transformers.sentence_transformer import losses
    from transformers import TrainerCallback

    from rayembed.train.engine import lr_factor

    tc = cfg.train
    t0 = time.perf_counter()
    model = build_peer(cfg, args)
    build_s = time.perf_counter() - t0
    token_mismatches = peer_token_check(model, rows)
    t0 = time.perf_counter()
    dataset = Dataset.from_dict(rows["columns"])
    scale = 1.0 / tc.temperature
    if args.loss == "cached":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=args.mini_batch_size)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale)

    def same_order(dataset, batch_size, drop_last, **kw):
        return DefaultBatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size=batch_size,
                                   drop_last=drop_last, **kw)

    sampler = same_order if args.peer_sampler == "same" else BatchSamplers.NO_DUPLICATES
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "peer-trainer"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=tc.lr, warmup_steps=tc.warmup_steps, lr_scheduler_type="linear",
        weight_decay=tc.weight_decay, adam_beta1=tc.adam_betas[0], adam_beta2=tc.adam_betas[1],
        adam_epsilon=tc.adam_eps, max_grad_norm=tc.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, dataloader_drop_last=True, use_cpu=True, disable_tqdm=True,
        batch_sampler=sampler, router_mapping=column_tasks(rows["columns"]),
    )
    optimizers = (None, None)
    if args.peer_schedule == "same":
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps,
                                weight_decay=tc.weight_decay)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps)))

    class Clock(TrainerCallback):
        """Wall-clock stamps at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.start, self.stamps = 0.0, []

        def on_train_begin(self, *a, **k):
            self.start = time.time()

        def on_step_end(self, *a, **k):
            self.stamps.append(time.time())

    clock = Clock()
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset, loss=loss,
                                         callbacks=[clock], optimizers=optimizers)
    build_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - t1
    out = loop_stats(clock.stamps, clock.start, args.batch_size, rows["tokens"], args.skip)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update(build_s=build_s, other_s=build_s + train_call_s - out["loop_s"], steps=len(clock.stamps),
               first_window_loss=logged[0] if logged else None, last_window_loss=logged[-1] if logged else None,
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               attn_implementation=getattr(model[0].model.config, "_attn_implementation", None),
               torch_threads=torch.get_num_threads(), token_ids_mismatched=token_mismatches)
    return out, model


def export_peer(model, rayembed_dir: Path, out: Path, eval_len: int) -> dict:
    """The peer's adapter as a rayembed embedder folder (rayembed's config and tokenizer files),
    checked against the peer's own encode on probe texts."""
    import numpy as np

    from rayembed.modeling.embedder import CONFIG_NAME, Embedder

    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model[0].model.save_pretrained(str(out))  # adapter_model.safetensors + adapter_config.json
    for f in rayembed_dir.iterdir():
        if f.is_file() and (f.name == CONFIG_NAME or f.name.startswith(("tokenizer", "special_tokens", "chat_template"))):
            shutil.copy2(f, out / f.name)
    model[0].max_seq_length = eval_len
    mine = model.encode(PROBE_TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    emb = Embedder.from_pretrained(str(out), device="cpu")
    theirs = emb.encode(PROBE_TEXTS)
    return {"dir": str(out), "export_s": time.perf_counter() - t0,
            "probe_max_abs_diff": float(np.abs(mine - theirs).max())}


# ----------------------------------------------------------------------------- evaluation and report


def evaluate(models: dict, args) -> dict:
    from rayembed.config.eval import DatasetSpec
    from rayembed.evaluate.runner import evaluate_models
    from rayembed.runtime import resolve_data_dir

    specs = [DatasetSpec(name=name, path=DATASETS[name][0], format=DATASETS[name][1], max_docs=args.max_docs,
                         max_queries=args.max_queries) for name in args.datasets]
    res = evaluate_models(models, specs, data_dir=resolve_data_dir(), max_length=args.eval_len, batch_size=32,
                          top_k=100, plot=False, autocast=None if args.autocast == "none" else args.autocast)
    return {m: {ds: res["metrics"][m][ds]["ndcg@10"] for ds in args.datasets} for m in models}


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def table(res: dict, args) -> str:
    ds = args.datasets
    head = ["", "examples/s", "tokens/s", "train s", "other s", *[f"nDCG@10 {d}" for d in ds]]
    widths = [38, 11, 10, 9, 9, *[len(h) for h in head[5:]]]

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"

    def row(cells) -> str:
        return " ".join(cell(c).ljust(w) if i == 0 else cell(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [row(head)]
    for name, label in ((RAYEMBED, "rayembed (Ray Train, 1 worker)"), (PEER, f"sentence-transformers ({args.loss})")):
        r = res[name]
        lines.append(row([label, r["examples_per_s"], r["tokens_per_s"], r["loop_s"], r["other_s"],
                          *[res["ndcg@10"][name][d] for d in ds]]))
    rt = res["ratios"]
    vals = (rt["examples_per_s"], rt["tokens_per_s"], None, None, *[rt[f"ndcg@10 {d}"] for d in ds])
    lines.append(row(["ratio rayembed / sentence-transformers", *[f"{v:.2f}x" if v is not None else None for v in vals]]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mix", default=None, help="a training mix folder written by `rayembed data build` "
                   "(default: build STS-B pairs + MS MARCO subset crops, as bench/train_quality.py does)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16, help="examples per step, both sides")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 20, at least 1)")
    p.add_argument("--temperature", type=float, default=0.02, help="tau; the peer's scale is 1 / tau")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--lora-top-layers", type=int, default=0,
                   help="LoRA on the top N layers only (the demo's 8; 0: every layer)")
    p.add_argument("--query-len", type=int, default=48)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--eval-len", type=int, default=256, help="max tokens per text at evaluation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both trainings (rayembed: train.cpus_per_worker and the worker's "
                        "OMP_NUM_THREADS; its default 0.5 CPU per worker also means 1 thread)")
    p.add_argument("--eval-threads", type=int, default=None,
                   help="torch threads while evaluating (default: --threads; more threads than free cores "
                        "slow torch down badly on a busy machine)")
    p.add_argument("--skip", type=int, default=1, help="warm-up steps left out of examples/s (at least 1)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=["mnrl", "cached"], default="mnrl",
                   help="MultipleNegativesRankingLoss, or CachedMultipleNegativesRankingLoss (GradCache)")
    p.add_argument("--mini-batch-size", type=int, default=8, help="the cached loss's mini-batch")
    p.add_argument("--peer-sampler", choices=["same", "no_duplicates"], default="same",
                   help="same: rayembed's batches in rayembed's order; no_duplicates: BatchSamplers.NO_DUPLICATES")
    p.add_argument("--peer-schedule", choices=["same", "hf"], default="same",
                   help="same: rayembed's warm-up/decay curve on the peer's AdamW; hf: the trainer's linear schedule")
    p.add_argument("--datasets", default="msmarco-subset,cranfield")
    p.add_argument("--max-docs", type=int, default=0,
                   help="cap each evaluation corpus (0: whole collection). Judged documents of the kept queries "
                        "come first, so pair a cap with --max-queries")
    p.add_argument("--max-queries", type=int, default=0, help="evaluate the first N judged queries (0: all)")
    p.add_argument("--untuned", action="store_true", help="also evaluate the untuned backbone")
    p.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                   help="encoding precision in evaluation, the same for every model ('bfloat16': the demo's "
                        "autocast, about twice as fast; 'none': fp32)")
    p.add_argument("--run-dir", default=None)
    args = p.parse_args()
    args.warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    args.eval_threads = args.eval_threads or args.threads
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    if not 1 <= args.skip < args.steps:
        p.error("--skip must be at least 1 and below --steps")
    # Both trainings run with this many threads: the Ray worker inherits OMP_NUM_THREADS (Ray only
    # sets it when unset), the peer trains in this process.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        import datasets  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        p.error(f"{e}: the peer needs sentence-transformers' training extras: pip install sentence-transformers datasets")

    import torch

    from rayembed.data.mix import build_mix
    from rayembed.io import atomic_write_json
    from rayembed.runtime import setup_logging

    torch.set_num_threads(args.threads)
    setup_logging("WARNING")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="peer-train-"))
    cfg = make_config(args, run_dir)
    t_all = time.perf_counter()
    if args.mix:
        paths = [str(Path(args.mix).resolve())]
    else:
        paths = [str(Path(build_mix(cfg)).parent)]
    manifest = Path(paths[0]) / "manifest.json"
    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    data_rows = (info.get("train") or {}).get("rows", info.get("rows"))
    sliced = bool(args.max_docs or args.max_queries)
    print(f"training mix: {paths[0]} ({data_rows} rows); {args.model} + LoRA r{args.lora_r}, {args.steps} steps x "
          f"{args.batch_size} examples, 1 hard negative, {args.threads} thread(s) each", flush=True)

    rows = rayembed_rows(cfg, paths, args.steps)
    print(f"peer rows: {len(rows['columns']['anchor'])} (anchor, positive, {rows['negatives_per_row']} negative) "
          f"from rayembed's stream; {rows['token_ids_mismatched']} of {rows['texts']} texts do not tokenise "
          f"to rayembed's ids ({rows['decoded']} decoded from ids)", flush=True)

    results: dict = {"settings": {**vars(args), "paths": paths, "data_rows": data_rows}, "sliced": sliced}
    results[RAYEMBED] = run_rayembed(cfg, paths, args, rows["tokens"])
    same_rows = results[RAYEMBED]["first_ids"] == rows["first_ids"]
    print(f"rayembed: {results[RAYEMBED]['examples_per_s']:.2f} examples/s over steps {args.skip + 1}-{args.steps}; "
          f"same rows as the peer's dataset: {same_rows}", flush=True)

    torch.set_num_threads(args.threads)
    results[PEER], peer = run_peer(cfg, args, rows, run_dir)
    print(f"sentence-transformers: {results[PEER]['examples_per_s']:.2f} examples/s", flush=True)
    export = export_peer(peer, Path(results[RAYEMBED]["model_dir"]), run_dir / "peer-model", args.eval_len)
    results[PEER].update(model_dir=export["dir"], export_s=export["export_s"])
    results[PEER]["other_s"] += export["export_s"]
    del peer

    torch.set_num_threads(args.eval_threads)
    models = {RAYEMBED: results[RAYEMBED]["model_dir"], PEER: export["dir"]}
    if args.untuned:
        models[f"{args.model} (untuned)"] = args.model
    results["ndcg@10"] = evaluate(models, args)
    results["checks"] = {
        "same_rows_in_same_order": same_rows if args.peer_sampler == "same" else "same rows, reordered by NO_DUPLICATES",
        "texts": rows["texts"], "texts_decoded_from_ids": rows["decoded"],
        "texts_tokenised_differently": {RAYEMBED: rows["token_ids_mismatched"],
                                        PEER: results[PEER]["token_ids_mismatched"]},
        "trainable_params": {RAYEMBED: results[RAYEMBED]["trainable_params"], PEER: results[PEER]["trainable_params"]},
        "peer_export_probe_max_abs_diff": export["probe_max_abs_diff"],
    }
    r, s = results[RAYEMBED], results[PEER]
    results["ratios"] = {
        "examples_per_s": ratio(r["examples_per_s"], s["examples_per_s"]),
        "tokens_per_s": ratio(r["tokens_per_s"], s["tokens_per_s"]),
        **{f"ndcg@10 {d}": ratio(results["ndcg@10"][RAYEMBED][d], results["ndcg@10"][PEER][d]) for d in args.datasets},
    }
    results["total_s"] = time.perf_counter() - t_all
    for side in (r, s):
        side.pop("first_ids", None)

    print()
    print(f"{args.model} + LoRA r{args.lora_r}/a{args.lora_alpha} on {', '.join(args.lora_targets.split(','))}"
          f"{f' of the top {args.lora_top_layers} layers' if args.lora_top_layers else ''}; "
          f"{args.steps} steps x {args.batch_size} examples (1 hard negative), lr {args.lr:g}, warm-up {args.warmup}, "
          f"tau {args.temperature:g} (scale {1 / args.temperature:g}), lengths {args.query_len}/{args.doc_len}, "
          f"{args.threads} training thread(s); peer sampler {args.peer_sampler}, schedule {args.peer_schedule}")
    if sliced:
        print(f"EVALUATION SLICED: first {args.max_queries or 'all'} judged queries and at most "
              f"{args.max_docs or 'all'} documents per collection (not the whole collections)")
    else:
        print("evaluation: whole collections")
    print(f"evaluation encodes with autocast {args.autocast}")
    print(f"examples/s and tokens/s: steps {args.skip + 1}-{args.steps}; train s: all {args.steps} steps; "
          "other s: model loading, start-up, export")
    print(table(results, args))
    for name, v in results["ndcg@10"].items():
        if name not in (RAYEMBED, PEER):
            print(f"  {name}: " + ", ".join(f"{d} {x:.4f}" for d, x in v.items()))
    c = results["checks"]
    diff = c["texts_tokenised_differently"]
    print(f"checks: same rows in the same order: {c['same_rows_in_same_order']}; texts whose token ids differ from "
          f"rayembed's batches: {diff[RAYEMBED]} (rayembed's tokenizer), {diff[PEER]} (the peer's) of {c['texts']}; "
          "trainable params "
          f"{c['trainable_params'][RAYEMBED]:,} vs {c['trainable_params'][PEER]:,}; peer export vs its own encode: "
          f"max |diff| {c['peer_export_probe_max_abs_diff']:.1e}")
    def loss(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    print(f"loss, mean of the last {args.log_every} steps: rayembed {loss(r['last_window_loss'])}, "
          f"sentence-transformers {loss(s['last_window_loss'])} (-: fewer steps than --log-every)")
    rt = results["ratios"]
    met = all(v is not None and v >= 1.0 for k, v in rt.items() if k == "examples_per_s" or k.startswith("ndcg"))
    print(f"goal (rayembed >= peer on examples/s and every nDCG@10): {'met' if met else 'NOT met'}")
    out = REPO / "bench" / "out" / "peer_train.json"
    atomic_write_json(out, results)
    print(f"wrote {out} ({results['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

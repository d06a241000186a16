"""The per-worker training loop that Ray Train runs on every worker.

Everything it needs arrives in ``train_loop_config`` (the resolved config as a dict, the
stream spec, the output folder name); there are no module globals. Read top to bottom:

1. build the task (model) and the engine (DDP or DeepSpeed ZeRO);
2. restore the latest checkpoint, if any: engine shard, step, data position, metric history;
3. stream batches, skipping those the checkpoint already consumed;
4. per step: forward/backward (GradCache optional), optimizer step, metrics;
5. every ``checkpoint_every`` steps: ``ray.train.report(metrics, checkpoint)``;
6. at the end: export the embedder into the final checkpoint (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
ENGINE_DIR = "engine"
MODEL_DIR = "model"
PROBE_FILE = "probe.json"
# Fixed texts embedded by the in-memory model at the end of training; the saved model must
# reproduce these vectors (a check that export loses nothing).
PROBE_TEXTS = ["what is the boiling point of water", "Paris is the capital of France."]


@dataclasses.dataclass
class TrainState:
    """What a checkpoint records besides the engine: where training and the data stream are."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attempts: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def _batches(shard: Any, spec: Any, state: TrainState) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(epoch, index_in_epoch, batch)`` forever, resuming at the state's position.

    Each epoch re-reads the shard; its shuffle seed is the base seed plus the epoch, so epochs
    differ but any (epoch, index) is the same batch on every run.
    """
    from rayembed.data.stream import iter_train_batches

    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        spec_e = dataclasses.replace(spec, seed=spec.seed + epoch)
        n = 0
        for batch in iter_train_batches(shard, spec_e, skip_batches=skip):
            yield epoch, skip + n, batch
            n += 1
        if n == 0 and skip == 0:
            raise ValueError(
                f"The training stream gave no batch of {spec.batch_size} examples per worker. Use more "
                "data, or a smaller train.batch_size / more train.num_workers."
            )
        epoch, skip = epoch + 1, 0


def _all_mean(value: float, device: torch.device) -> float:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


# Ray Train's controller takes one report per worker each health-check poll (2 s by default), from
# a queue that holds one: a report sooner than that blocks the step until the next poll. Metrics-
# only reports are therefore sent at most once per poll; metrics.jsonl records every logged step.
REPORT_GAP_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


def _all_sum(value: float, device: torch.device) -> float:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config`` = {"cfg": resolved config dict, "stream": StreamSpec dict}."""
    import ray.train

    from rayembed.config import RayembedConfig, from_dict
    from rayembed.data.stream import StreamSpec
    from rayembed.train.engine import make_engine, worker_device
    from rayembed.train.tasks import make_task

    cfg = from_dict(RayembedConfig, config["cfg"])
    tc = cfg.train
    spec = StreamSpec(**config["stream"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        from rayembed.runtime import setup_logging

        setup_logging(config.get("log_level", "INFO"))
    torch.manual_seed(cfg.seed + rank)
    device = worker_device(tc.use_gpu)

    t_setup = time.perf_counter()
    task = make_task(cfg, device)
    engine = make_engine(task.model, tc, device)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = TrainState.from_json((Path(d) / STATE_FILE).read_text())
            engine.load(Path(d) / ENGINE_DIR)
        if rank == 0:
            logger.info("Resumed from checkpoint at step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch)
    state.attempts += 1
    resumed_from = state.step
    setup_s = time.perf_counter() - t_setup

    fail_rank = 1 if world > 1 else 0
    inject_failure = bool(tc.fail_at_step) and checkpoint is None and rank == fail_rank

    evaluator = None
    if tc.eval_every and tc.eval_dataset:
        from rayembed.train.evaluation import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg)

    from rayembed.train.flops import step_flops

    flops = step_flops(task.model, checkpointing=bool(tc.gradient_checkpointing))
    shard = ray.train.get_dataset_shard("train")
    stream = _batches(shard, spec, state)
    tokens_seen = 0.0
    t_window, window_examples, window_tokens, window_steps = time.perf_counter(), 0, 0.0, 0
    window_padded = 0.0
    last_report = float("-inf")
    step_times: list[float] = []
    metrics: dict[str, Any] = {}
    while state.step < tc.max_steps:
        t0 = time.perf_counter()
        epoch, index, batch = next(stream)
        t_data = time.perf_counter() - t0
        if inject_failure and state.step + 1 == tc.fail_at_step:
            _die_after_commit(rank, state.step + 1)
        if "q_input_ids" in batch and batch["q_input_ids"].device != device:
            for k in ("q_input_ids", "q_attention_mask", "d_input_ids", "d_attention_mask"):
                batch[k] = batch[k].to(device, non_blocking=True)
        lr = engine.lr
        out = task.step(engine, batch)
        grad_norm = engine.step()
        state.step += 1
        state.epoch, state.batch_in_epoch = epoch, index + 1
        dt = time.perf_counter() - t0
        step_times.append(dt)

        n_examples = batch["q_input_ids"].shape[0]
        window_examples += n_examples
        window_tokens += float(batch.get("num_tokens", 0))
        # What went through the model, padding included (less than the batch's padded tensors
        # under train.length_buckets).
        window_padded += float(out.get("tokens_fed") or batch["q_input_ids"].numel() + batch["d_input_ids"].numel())
        window_steps += 1
        loss = _all_mean(out["loss"], device)
        do_log = state.step % tc.log_every == 0 or state.step == tc.max_steps
        do_ckpt = state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps
        record = {
            "step": state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "epoch": epoch,
            "batch_in_epoch": index,
            "first_id": batch["id"][0] if batch.get("id") else None,
            "step_s": dt,
            "data_s": t_data,
            "time": time.time(),
        }
        state.history.append(record)
        if do_log or do_ckpt:
            elapsed = time.perf_counter() - t_window
            examples = _all_sum(window_examples, device)
            toks = _all_sum(window_tokens, device)
            padded = _all_sum(window_padded, device)
            tokens_seen += toks
            metrics = {
                **{k: v for k, v in record.items() if k != "first_id"},
                "examples_per_s": examples / max(elapsed, 1e-9),
                "tokens_per_s": toks / max(elapsed, 1e-9),
                # Model FLOPs on the non-padding tokens (train/flops.py); padding is waste, not work.
                "model_flops_per_s": toks * flops.per_token / max(elapsed, 1e-9),
                "padding_share": 1.0 - toks / padded if padded else 0.0,
                "tokens_seen": tokens_seen,
                "resumed_from_step": resumed_from,
                "attempts": state.attempts,
                "world_size": world,
                "setup_s": setup_s,
            }
            # The window's throughput also goes to metrics.jsonl, on the logged steps only.
            record.update({k: metrics[k] for k in ("examples_per_s", "tokens_per_s", "model_flops_per_s",
                                                   "padding_share")})
            if "local_docs" in out:
                metrics["local_docs"] = out["local_docs"]
                metrics["pool_docs"] = _all_sum(out["local_docs"], device)
            if rank == 0:
                logger.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f ex/s %.0f tok/s %.1f GFLOP/s (%.0f%% padding)",
                    state.step, tc.max_steps, loss, lr, grad_norm, metrics["examples_per_s"],
                    metrics["tokens_per_s"], metrics["model_flops_per_s"] / 1e9, 100 * metrics["padding_share"],
                )
            t_window, window_examples, window_tokens, window_steps = time.perf_counter(), 0, 0.0, 0
            window_padded = 0.0
            # Every rank must make the same report calls (each is a collective): rank 0's clock decides.
            report_due = do_ckpt or _all_sum(
                float(rank == 0 and time.perf_counter() - last_report >= REPORT_GAP_S), device) > 0
        if evaluator is not None and (state.step % tc.eval_every == 0 or state.step == tc.max_steps):
            scores = evaluator.evaluate(task, engine, rank)
            metrics.update(scores)
            record.update(scores)
        if do_ckpt:
            _report_checkpoint(metrics, state, engine, task, rank, final=state.step == tc.max_steps, cfg=cfg)
            last_report = time.perf_counter()
        elif do_log and report_due:
            ray.train.report(metrics)
            last_report = time.perf_counter()
    if rank == 0 and step_times:
        steady = step_times[1:] or step_times
        logger.info("Done: %d steps, mean step %.3f s after the first", state.step, sum(steady) / len(steady))


def _die_after_commit(rank: int, step: int) -> None:
    """``train.fail_at_step``: kill this worker, but only once Ray has committed its checkpoints.

    Ray Train's controller polls workers every couple of seconds and registers a checkpoint only
    when it has every rank's report of that round. A rank that writes no checkpoint files reports
    at once and would die before the controller saw rank 0's report: the retry would then find no
    checkpoint, start from step 0 and (``checkpoint is None``) inject the failure again. Waiting
    until every report made so far is committed makes the retry resume from the latest checkpoint,
    so the failure fires exactly once.
    """
    import ray.train
    from ray.train import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    logger.error("Injected failure on rank %d at step %d (train.fail_at_step)", rank, step)
    os._exit(1)


def _report_checkpoint(metrics: dict[str, Any], state: TrainState, engine: Any, task: Any, rank: int,
                       *, final: bool, cfg: Any) -> None:
    """Save this worker's shard (+ state, + the exported model when final) and report it."""
    import ray.train
    from ray.train import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix=f"rayembed-ckpt-{rank}-"))
    try:
        engine.save(tmp / ENGINE_DIR)
        if rank == 0:
            (tmp / STATE_FILE).write_text(state.to_json())
        if final:
            probe = _probe_vectors(task, engine, rank)
            if rank == 0 and probe is not None:
                (tmp / PROBE_FILE).write_text(json.dumps({"texts": PROBE_TEXTS, "vectors": probe}))
            with engine.full_parameters():
                if rank == 0:
                    merge = cfg.train.merge_lora or cfg.train.mode == "mntp"
                    task.export(tmp / MODEL_DIR, merge_lora=merge)
        has_files = any(tmp.iterdir())
        metrics = {**metrics, "checkpoint_step": state.step, "final": final}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)) if has_files else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe_vectors(task: Any, engine: Any, rank: int) -> list[list[float]] | None:
    """Embeddings of PROBE_TEXTS from the model as trained (all ranks take part under ZeRO)."""
    emb = getattr(task, "embedder", None)
    partitioned = type(engine).__name__ == "DeepSpeedEngine"
    if emb is None or (rank != 0 and not partitioned):
        return None
    was_training = emb.training
    emb.eval()
    try:
        vecs = emb.encode(PROBE_TEXTS, batch_size=len(PROBE_TEXTS), show_progress=False)
    finally:
        emb.train(was_training)
    return vecs.tolist()

"""`rayembed pipeline`: every stage, end to end, in one run directory on one Ray.

    synth  -> <run_dir>/synth     synthetic examples from an OpenAI-compatible LLM (local by default)
    data   -> <run_dir>/data      the training mix (synthetic + local sources), Parquet + manifest
    train  -> <run_dir>/train     LoRA contrastive training on Ray Train; the saved embedder
    index  -> <run_dir>/index/<corpus>   FAISS shards of each corpus, encoded by the trained model
    eval   -> <run_dir>/eval      nDCG@10 etc. of baselines, the untuned backbone and the trained model
    serve  -> <run_dir>/serve     the Ray Serve endpoint answers a few queries over HTTP, then stops

Each stage reads only the saved artifacts of the ones before it and records itself in
``<run_dir>/<stage>/_stage.json``, with a fingerprint of the config sections it used and of the
stages it read. A rerun skips a finished stage whose fingerprint still matches; a stage whose
config changed runs again, and so does every stage after it (``pipeline.force=true`` or
``--stages`` reruns finished stages too). A stage that needs an earlier stage's output refuses to
use it when it is stale, naming what changed. ``<run_dir>/report.md`` gathers the results table
and plots, and marks any stage whose results no longer match the config.

``run_dir`` may be a local folder or a URI (``s3://bucket/run``, any ``pyarrow.fs`` scheme). With a
URI, train and index write there directly; synth, data and eval are written to a local scratch
folder (``$RAYEMBED_CACHE/runs/<hash>``) and published to ``<run_dir>/<stage>`` with a completion
marker; later stages read them back through the verified download cache. The stage markers and
report.md are written to the URI last, so nothing the run needs stays on the driver's disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayembed.config import ConfigError, RayembedConfig, save_resolved, to_dict
from rayembed.config.data import SourceConfig
from rayembed.config.eval import DatasetSpec
from rayembed.io import atomic_write_text

logger = logging.getLogger(__name__)

MARKER = "_stage.json"


class Pipeline:
    def __init__(self, cfg: RayembedConfig):
        if cfg.train.mode == "rerank" and {"index", "eval", "serve"} & set(cfg.pipeline.stages):
            from rayembed.config import ConfigError

            raise ConfigError(
                "train.mode=rerank trains a reranker, but the pipeline's index, eval and serve stages need "
                "the embedder it trains. Train the reranker alone (rayembed train --config ... "
                "train.mode=rerank) and point serve.reranker.path at it, or drop those stages."
            )
        self.cfg = cfg
        from rayembed.cluster.storage import check_location, local_cache_root

        self.store = check_location(cfg.run_dir, what="run_dir")
        if self.store.is_local:
            self.run = Path(self.store.path)
            self.scratch = self.run
        else:
            self.run = None
            key = hashlib.sha256(self.store.uri.encode()).hexdigest()[:16]
            self.scratch = local_cache_root().parent / "runs" / key
        self.scratch.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- locations

    @property
    def remote(self) -> bool:
        return not self.store.is_local

    @property
    def where(self) -> str:
        """run_dir as the user gave it, resolved (a local folder or a URI)."""
        return str(self.run) if self.run is not None else self.store.uri

    def stage_dir(self, stage: str) -> Path:
        """The local folder a stage writes with local file APIs (the run folder itself when local)."""
        return self.scratch / stage

    def stage_out(self, stage: str) -> str:
        """Where a stage's outputs end up: a local folder or a URI below run_dir."""
        return str(self.stage_dir(stage)) if not self.remote else self.store.join(stage).uri

    def publish(self, stage: str) -> str:
        """Make a locally written stage folder available at :meth:`stage_out`; returns that."""
        if self.remote:
            from rayembed.cluster.storage import publish_folder

            publish_folder(self.stage_dir(stage), self.store.join(stage))
        return self.stage_out(stage)

    def local_copy(self, location: str) -> Path:
        """A local folder with a published stage folder's files (itself when it is local)."""
        from rayembed.cluster.storage import localize

        return localize(location, what="stage output")

    # -------------------------------------------------------------- bookkeeping

    def done(self, stage: str) -> dict[str, Any] | None:
        rel = f"{stage}/{MARKER}"
        return self.store.read_json(rel) if self.store.exists(rel) else None

    def finish(self, stage: str, info: dict[str, Any]) -> dict[str, Any]:
        self.store.write_json(f"{stage}/{MARKER}", info)
        return info

    def fingerprint(self, stage: str) -> dict[str, str]:
        """Hashes of what ``stage`` depends on: its config sections and the stages it reads.

        Paths the pipeline sets itself (output folders) and settings that cannot change a
        result (timeouts, concurrency, ports, secrets' locations) are left out.
        """
        c = to_dict(self.cfg)
        drop = {"output_dir", "storage_path", "max_in_flight", "request_timeout_s", "api_key_env",
                "api_key_file", "port", "log_to_driver"}

        def clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items() if k not in drop}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        def h(v: Any) -> str:
            return hashlib.sha256(json.dumps(clean(v), sort_keys=True, default=str).encode()).hexdigest()[:16]

        pc = c["pipeline"]
        parts: dict[str, Any] = {}
        upstream: list[str] = []
        if stage == "synth":
            parts = {"synth": c["synth"], "seed": c["seed"]}
        elif stage == "data":
            parts = {"data": c["data"], "data_dir": c["data_dir"], "seed": c["seed"]}
            synth = self.done("synth")
            upstream = ["synth"] if synth and synth.get("accepted") else []
        elif stage == "train":
            parts = {"model": c["model"], "train": c["train"], "seed": c["seed"]}
            upstream = ["data"]
        elif stage == "index":
            idx = {k: v for k, v in c["index"].items() if k not in ("corpus", "format", "embedder")}
            parts = {"index": idx, "pipeline.corpora": pc["corpora"], "data_dir": c["data_dir"], "model": c["model"]}
            upstream = ["train"]
        elif stage == "eval":
            parts = {"eval": c["eval"], "pipeline.baselines": pc["baselines"], "data_dir": c["data_dir"],
                     "pipeline.include_untuned": pc["include_untuned"], "model": c["model"]}
            upstream = ["train"] if self.done("train") else []
        elif stage == "serve":
            parts = {"serve": c["serve"], "pipeline.demo_queries": pc["demo_queries"]}
            upstream = ["index", "train"]
        out = {k: h(v) for k, v in parts.items()}
        for up in upstream:
            out[f"stage {up}"] = self.fingerprint(up)["all"]
        out["all"] = h(out)
        return out

    def changed(self, stage: str, info: dict[str, Any]) -> list[str]:
        """What differs between the config now and the one ``info`` (a stage marker) was made with."""
        old = info.get("fingerprint")
        now = self.fingerprint(stage)
        if not isinstance(old, dict):
            return ["(the stage was recorded without a fingerprint)"]
        if old.get("all") == now["all"]:
            return []
        return sorted(k for k in set(old) | set(now) if k != "all" and old.get(k) != now.get(k)) or ["(unknown)"]

    def need(self, stage: str) -> dict[str, Any]:
        info = self.done(stage)
        if info is None:
            raise FileNotFoundError(
                f"Stage '{stage}' has not finished in {self.where}; run it first "
                f"(rayembed pipeline --stages {stage} ...)."
            )
        diff = self.changed(stage, info)
        if diff:
            raise ConfigError(
                f"Stage '{stage}' in {self.where} was made with a different config ({', '.join(diff)} "
                f"changed since). Rerun it and the stages after it (rayembed pipeline --stages {stage} ... "
                "or pipeline.force=true), or restore the config it was made with."
            )
        return info

    def stage_cfg(self) -> RayembedConfig:
        return copy.deepcopy(self.cfg)

    # -------------------------------------------------------------- stages

    def synth(self) -> dict[str, Any]:
        from rayembed.synth import run_synth

        cfg = self.stage_cfg()
        cfg.synth.output_dir = str(self.stage_dir("synth"))
        # The folder is the pipeline's own: a run with another generation config is replaced
        # (the stage reruns because its fingerprint changed); the same config resumes.
        cfg.synth.overwrite = True
        summary = run_synth(cfg)
        return {"output": self.publish("synth"), "accepted": summary.get("accepted"),
                "rejected": summary.get("rejected"), "requests": summary.get("requests"),
                "rejected_by_reason": summary.get("rejected_by_reason", {})}

    def data(self) -> dict[str, Any]:
        from rayembed.data.mix import build_mix, read_manifest

        cfg = self.stage_cfg()
        out = self.stage_dir("data")
        cfg.data.output_dir = str(out)
        synth = self.done("synth")
        if synth and synth.get("accepted"):
            synth = self.need("synth")
            cfg.data.sources = [*cfg.data.sources, SourceConfig(
                name="synthetic", format="schema", path=str(self.local_copy(synth["output"])))]
        manifest_path = build_mix(cfg, out_dir=out)
        manifest = read_manifest(manifest_path)
        where = self.publish("data")
        return {"output": where, "manifest": f"{where}/{Path(manifest_path).relative_to(out).as_posix()}",
                "rows": {"train": manifest["train"]["rows"], "val": manifest["val"]["rows"],
                         "train_by_source": manifest["train"]["by_source"],
                         "train_by_task_type": manifest["train"]["by_task_type"]}}

    def train(self) -> dict[str, Any]:
        from rayembed.train import run_training

        data = self.need("data")
        cfg = self.stage_cfg()
        cfg.train.output_dir = self.stage_out("train")
        model_dir = run_training(cfg, train_paths=[data["output"]])
        return {"output": self.stage_out("train"), "embedder": str(model_dir)}

    def trained_model(self) -> str:
        return self.need("train")["embedder"]

    def index(self) -> dict[str, Any]:
        from rayembed.index import build_index

        embedder = self.trained_model()
        built = {}
        for corpus in self.cfg.pipeline.corpora:
            cfg = self.stage_cfg()
            cfg.index.corpus = corpus.path
            cfg.index.format = corpus.format
            cfg.index.embedder = embedder
            cfg.index.output_dir = f"{self.stage_out('index')}/{corpus.name}"
            manifest = build_index(cfg)
            built[corpus.name] = str(manifest).rsplit("/", 1)[0]
            logger.info("pipeline: indexed %s -> %s", corpus.name, manifest)
        return {"indexes": built}

    def eval(self) -> dict[str, Any]:
        from rayembed.evaluate.runner import evaluate_models, render_table

        ev = self.cfg.eval
        models: dict[str, str] = dict(self.cfg.pipeline.baselines)
        backbone = self.cfg.model.name_or_path
        if self.cfg.pipeline.include_untuned:
            models[f"{backbone} (untuned)"] = backbone
        indexes: dict[str, dict[str, str]] = {}
        if self.done("train"):
            models[f"{backbone} (trained)"] = self.trained_model()
            built = self.done("index")
            if built:  # searched instead of encoding those corpora again, where they match the dataset
                indexes[f"{backbone} (trained)"] = dict(built.get("indexes") or {})
        datasets = ev.datasets or [DatasetSpec()]
        results = evaluate_models(
            models, datasets, self.stage_dir("eval"), data_dir=self.cfg.data_dir,
            instructions=ev.instructions, query_instructions=ev.query_instructions, top_k=ev.top_k,
            batch_size=ev.batch_size, max_length=ev.max_length, bm25=ev.bm25, passkey=ev.passkey,
            index_type=ev.index_type, keep_indexes=ev.keep_indexes, plot=ev.plot, hybrid=ev.hybrid,
            indexes=indexes, device=self.cfg.model.device, dtype=self.cfg.model.dtype,
            autocast=self.cfg.model.autocast,
        )
        table = render_table(results)
        print("\n" + table)
        return {"output": self.publish("eval"), "table": table, "metrics": results["metrics"]}

    def serve(self) -> dict[str, Any]:
        import httpx

        from rayembed.serving import start_server, stop_server

        indexes = self.need("index")["indexes"]
        first = next(iter(indexes.values()))
        cfg = self.stage_cfg()
        from rayembed.serving.auth import resolve_api_key

        base = start_server(cfg, index_dir=first, embedder=self.trained_model(), host="127.0.0.1",
                            port=self.cfg.pipeline.serve_port)
        key = resolve_api_key(cfg.serve.api_key_env, cfg.serve.api_key_file)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answers = []
        try:
            with httpx.Client(base_url=base, timeout=120, headers=headers) as client:
                for q in self.cfg.pipeline.demo_queries:
                    t0 = time.perf_counter()
                    r = client.post("/search", json={"query": q, "k": 3})
                    r.raise_for_status()
                    ms = (time.perf_counter() - t0) * 1000
                    body = r.json()
                    res = body["results"][0]
                    hits = [{"doc_id": i, "score": sc, "text": t}
                            for i, sc, t in zip(res["ids"], res["scores"], res["texts"])]
                    answers.append({"query": q, "ms": round(ms, 1), "hits": hits,
                                    "index_version": body.get("index_version")})
                    print(f"\nQ: {q}   ({ms:.0f} ms over HTTP)")
                    for h in hits:
                        print(f"   {h.get('score', 0):.3f}  [{h.get('doc_id')}] {str(h.get('text', ''))[:110]}")
        finally:
            stop_server()
        self.store.write_json("serve/answers.json", answers)
        return {"base_url": base, "answers": answers}

    # -------------------------------------------------------------- driver

    def run_stages(self, stages: list[str], *, force: bool = False, explicit: bool = False) -> str:
        from rayembed.runtime import init_ray

        resolved = save_resolved(self.cfg, self.scratch)
        if self.remote:
            self.store.put_file(resolved, resolved.name)
        init_ray(self.cfg.compute)
        timings = {}
        funcs: dict[str, Callable[[], dict[str, Any]]] = {
            "synth": self.synth, "data": self.data, "train": self.train,
            "index": self.index, "eval": self.eval, "serve": self.serve,
        }
        try:
            for stage in stages:
                prev = self.done(stage)
                if prev and not (force or explicit):
                    diff = self.changed(stage, prev)
                    if not diff:
                        logger.info("pipeline: %s already finished in %s; skipping (pipeline.force=true reruns it)",
                                    stage, self.stage_out(stage))
                        continue
                    logger.info("pipeline: %s reruns: %s changed since it ran", stage, ", ".join(diff))
                logger.info("pipeline: ---- %s ----", stage)
                if prev:  # a rerun that fails halfway must not leave the old marker vouching for it
                    self.store.filesystem.delete_file(self.store.join(f"{stage}/{MARKER}").path)
                t0 = time.perf_counter()
                info = funcs[stage]()
                info["fingerprint"] = self.fingerprint(stage)
                info["seconds"] = round(time.perf_counter() - t0, 1)
                timings[stage] = info["seconds"]
                self.finish(stage, info)
                logger.info("pipeline: %s finished in %.1f s", stage, info["seconds"])
        finally:
            report = self.write_report()
        logger.info("pipeline: report at %s", report)
        return report

    def write_report(self) -> str:
        lines = ["# rayembed pipeline report", "", f"Run directory: `{self.where}`", ""]
        current: dict[str, dict[str, Any]] = {}
        stale: dict[str, list[str]] = {}
        for stage in ("synth", "data", "train", "index", "eval", "serve"):
            info = self.done(stage)
            if info is None:
                continue
            diff = self.changed(stage, info)
            if diff:
                stale[stage] = diff
            else:
                current[stage] = info
        if stale:
            lines += ["## Stale stages", "",
                      "These stages ran with a different config; their results are left out below. "
                      "Rerun them (`rayembed pipeline --stages ...` or `pipeline.force=true`).", ""]
            lines += [f"- {stage}: {', '.join(diff)} changed" for stage, diff in stale.items()] + [""]
        stage_rows = [f"| {stage} | {info.get('seconds', '')} |" for stage, info in current.items()]
        if stage_rows:
            lines += ["| stage | seconds |", "|---|---|", *stage_rows, ""]
        synth = current.get("synth")
        if synth:
            lines += ["## Synthetic data", "",
                      f"{synth.get('accepted')} examples accepted, {synth.get('rejected')} rejected, "
                      f"from {synth.get('requests')} requests. Rejections by reason: "
                      f"`{json.dumps(synth.get('rejected_by_reason', {}))}`.", ""]
        data = current.get("data")
        if data:
            lines += ["## Training mix", "", f"Manifest: `{data['manifest']}`", "",
                      "```json", json.dumps(data.get("rows", {}), indent=2), "```", ""]
        train = current.get("train")
        if train:
            lines += ["## Training", "", f"Saved embedder: `{train['embedder']}`", ""]
            if self.store.exists("train/loss_curve.png"):
                lines += ["![loss curve](train/loss_curve.png)", ""]
        index = current.get("index")
        if index:
            lines += ["## Indexes", ""] + [f"- {k}: `{v}`" for k, v in index["indexes"].items()] + [""]
        ev = current.get("eval")
        if ev:
            lines += ["## Retrieval quality", "", ev["table"], ""]
            if self.store.exists("eval/ndcg.png"):
                lines += ["![nDCG@10 per model](eval/ndcg.png)", ""]
        serve = current.get("serve")
        if serve:
            lines += ["## Endpoint", ""]
            for a in serve["answers"]:
                top = a["hits"][0] if a["hits"] else {}
                lines.append(f"- `{a['query']}` ({a['ms']} ms): [{top.get('doc_id')}] {str(top.get('text', ''))[:100]}")
            lines.append("")
        text = "\n".join(lines)
        if not self.remote:
            return str(atomic_write_text(self.run / "report.md", text))
        return self.store.write_bytes("report.md", text.encode())


def run_pipeline(cfg: RayembedConfig, stages: list[str] | None = None, *, force: bool | None = None) -> str:
    """Run ``stages`` (default: ``cfg.pipeline.stages``); returns where report.md is (a local path
    or a URI, as run_dir)."""
    explicit = stages is not None
    return Pipeline(cfg).run_stages(
        list(stages or cfg.pipeline.stages),
        force=cfg.pipeline.force if force is None else force,
        explicit=explicit,
    )

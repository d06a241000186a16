"""`rayembed pipeline`: every stage, end to end, in one run directory on one Ray.

    synth  -> <run_dir>/synth     synthetic examples from an OpenAI-compatible LLM (local by default)
    data   -> <run_dir>/data      the training mix (synthetic + local sources), Parquet + manifest
    train  -> <run_dir>/train     LoRA contrastive training on Ray Train; the saved embedder
    index  -> <run_dir>/index/<corpus>   FAISS shards of each corpus, encoded by the trained model
    eval   -> <run_dir>/eval      nDCG@10 etc. of baselines, the untuned backbone and the trained model
    serve  -> <run_dir>/serve     the Ray Serve endpoint answers a few queries over HTTP, then stops

Each stage reads only the saved artifacts of the ones before it and records itself in
``<run_dir>/<stage>/_stage.json``; a rerun skips finished stages (``pipeline.force=true`` or
``--stages`` reruns them). ``<run_dir>/report.md`` gathers the results table and plots.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayembed.config import RayembedConfig, save_resolved
from rayembed.config.data import SourceConfig
from rayembed.config.eval import DatasetSpec
from rayembed.io import atomic_write_json, atomic_write_text

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
        from rayembed.cluster.storage import local_folder

        self.run = local_folder(cfg.run_dir, what="run_dir", uri_keys="index.output_dir, train.output_dir and "
                                "serve.index_dir when the stages run one by one")
        self.run.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- bookkeeping

    def stage_dir(self, stage: str) -> Path:
        return self.run / stage

    def done(self, stage: str) -> dict[str, Any] | None:
        marker = self.stage_dir(stage) / MARKER
        return json.loads(marker.read_text()) if marker.exists() else None

    def finish(self, stage: str, info: dict[str, Any]) -> dict[str, Any]:
        atomic_write_json(self.stage_dir(stage) / MARKER, info)
        return info

    def need(self, stage: str) -> dict[str, Any]:
        info = self.done(stage)
        if info is None:
            raise FileNotFoundError(
                f"Stage '{stage}' has not finished in {self.run}; run it first "
                f"(rayembed pipeline --stages {stage} ...)."
            )
        return info

    def stage_cfg(self) -> RayembedConfig:
        return copy.deepcopy(self.cfg)

    # -------------------------------------------------------------- stages

    def synth(self) -> dict[str, Any]:
        from rayembed.synth import run_synth

        cfg = self.stage_cfg()
        cfg.synth.output_dir = str(self.stage_dir("synth"))
        summary = run_synth(cfg)
        return {"output": str(self.stage_dir("synth")), "accepted": summary.get("accepted"),
                "rejected": summary.get("rejected"), "requests": summary.get("requests"),
                "rejected_by_reason": summary.get("rejected_by_reason", {})}

    def data(self) -> dict[str, Any]:
        from rayembed.data.mix import build_mix, read_manifest

        cfg = self.stage_cfg()
        out = self.stage_dir("data")
        cfg.data.output_dir = str(out)
        synth = self.done("synth")
        if synth and synth.get("accepted"):
            cfg.data.sources = [*cfg.data.sources, SourceConfig(name="synthetic", format="schema", path=synth["output"])]
        manifest_path = build_mix(cfg, out_dir=out)
        manifest = read_manifest(manifest_path)
        return {"output": str(out), "manifest": str(manifest_path),
                "rows": {"train": manifest["train"]["rows"], "val": manifest["val"]["rows"],
                         "train_by_source": manifest["train"]["by_source"],
                         "train_by_task_type": manifest["train"]["by_task_type"]}}

    def train(self) -> dict[str, Any]:
        from rayembed.train import run_training

        data = self.need("data")
        cfg = self.stage_cfg()
        cfg.train.output_dir = str(self.stage_dir("train"))
        model_dir = run_training(cfg, train_paths=[data["output"]])
        return {"output": str(self.stage_dir("train")), "embedder": str(model_dir)}

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
            cfg.index.output_dir = str(self.stage_dir("index") / corpus.name)
            manifest = build_index(cfg)
            built[corpus.name] = str(Path(manifest).parent)
            logger.info("pipeline: indexed %s -> %s", corpus.name, manifest)
        return {"indexes": built}

    def eval(self) -> dict[str, Any]:
        from rayembed.evaluate.runner import evaluate_models, render_table

        ev = self.cfg.eval
        models: dict[str, str] = dict(self.cfg.pipeline.baselines)
        backbone = self.cfg.model.name_or_path
        if self.cfg.pipeline.include_untuned:
            models[f"{backbone} (untuned)"] = backbone
        if self.done("train"):
            models[f"{backbone} (trained)"] = self.trained_model()
        datasets = ev.datasets or [DatasetSpec()]
        results = evaluate_models(
            models, datasets, self.stage_dir("eval"), data_dir=self.cfg.data_dir,
            instructions=ev.instructions, query_instructions=ev.query_instructions, top_k=ev.top_k,
            batch_size=ev.batch_size, max_length=ev.max_length, bm25=ev.bm25, passkey=ev.passkey,
            index_type=ev.index_type, keep_indexes=ev.keep_indexes, plot=ev.plot, hybrid=ev.hybrid,
        )
        table = render_table(results)
        print("\n" + table)
        return {"output": str(self.stage_dir("eval")), "table": table, "metrics": results["metrics"]}

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
        atomic_write_json(self.stage_dir("serve") / "answers.json", answers)
        return {"base_url": base, "answers": answers}

    # -------------------------------------------------------------- driver

    def run_stages(self, stages: list[str], *, force: bool = False, explicit: bool = False) -> Path:
        from rayembed.runtime import init_ray

        save_resolved(self.cfg, self.run)
        init_ray(self.cfg.compute)
        timings = {}
        funcs: dict[str, Callable[[], dict[str, Any]]] = {
            "synth": self.synth, "data": self.data, "train": self.train,
            "index": self.index, "eval": self.eval, "serve": self.serve,
        }
        for stage in stages:
            if self.done(stage) and not (force or explicit):
                logger.info("pipeline: %s already finished in %s; skipping (pipeline.force=true reruns it)",
                            stage, self.stage_dir(stage))
                continue
            logger.info("pipeline: ---- %s ----", stage)
            t0 = time.perf_counter()
            info = funcs[stage]()
            info["seconds"] = round(time.perf_counter() - t0, 1)
            timings[stage] = info["seconds"]
            self.finish(stage, info)
            logger.info("pipeline: %s finished in %.1f s", stage, info["seconds"])
        report = self.write_report()
        logger.info("pipeline: report at %s", report)
        return report

    def write_report(self) -> Path:
        lines = ["# rayembed pipeline report", "", f"Run directory: `{self.run}`", ""]
        stage_rows = []
        for stage in ("synth", "data", "train", "index", "eval", "serve"):
            info = self.done(stage)
            if info:
                stage_rows.append(f"| {stage} | {info.get('seconds', '')} |")
        if stage_rows:
            lines += ["| stage | seconds |", "|---|---|", *stage_rows, ""]
        synth = self.done("synth")
        if synth:
            lines += ["## Synthetic data", "",
                      f"{synth.get('accepted')} examples accepted, {synth.get('rejected')} rejected, "
                      f"from {synth.get('requests')} requests. Rejections by reason: "
                      f"`{json.dumps(synth.get('rejected_by_reason', {}))}`.", ""]
        data = self.done("data")
        if data:
            lines += ["## Training mix", "", f"Manifest: `{data['manifest']}`", "",
                      "```json", json.dumps(data.get("rows", {}), indent=2), "```", ""]
        train = self.done("train")
        if train:
            lines += ["## Training", "", f"Saved embedder: `{train['embedder']}`", ""]
            curve = next(iter(sorted(Path(train["output"]).rglob("loss_curve.png"))), None)
            if curve:
                lines += [f"![loss curve]({curve.relative_to(self.run)})", ""]
        index = self.done("index")
        if index:
            lines += ["## Indexes", ""] + [f"- {k}: `{v}`" for k, v in index["indexes"].items()] + [""]
        ev = self.done("eval")
        if ev:
            lines += ["## Retrieval quality", "", ev["table"], ""]
            png = self.stage_dir("eval") / "ndcg.png"
            if png.exists():
                lines += [f"![nDCG@10 per model]({png.relative_to(self.run)})", ""]
        serve = self.done("serve")
        if serve:
            lines += ["## Endpoint", ""]
            for a in serve["answers"]:
                top = a["hits"][0] if a["hits"] else {}
                lines.append(f"- `{a['query']}` ({a['ms']} ms): [{top.get('doc_id')}] {str(top.get('text', ''))[:100]}")
            lines.append("")
        return atomic_write_text(self.run / "report.md", "\n".join(lines))


def run_pipeline(cfg: RayembedConfig, stages: list[str] | None = None, *, force: bool | None = None) -> Path:
    """Run ``stages`` (default: ``cfg.pipeline.stages``); returns the path of report.md."""
    explicit = stages is not None
    return Pipeline(cfg).run_stages(
        list(stages or cfg.pipeline.stages),
        force=cfg.pipeline.force if force is None else force,
        explicit=explicit,
    )

"""``rayembed eval``: score models on retrieval and STS datasets, next to BM25 and MiniLM.

Examples::

    rayembed eval --config jobs/configs/local/eval.yaml
    rayembed eval --model trained=runs/demo/model --model bm25=bm25 'eval.datasets=[{name: cranfield, path: cranfield}]'
    rayembed eval --passkey --model smollm2=smollm2-135m eval.passkey.lengths=[128,256]
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "eval",
        help="Evaluate embedders (and BM25) on BEIR, SMART/TREC and STS data; write a results table.",
        description=(
            "Evaluate every model in eval.models on every dataset in eval.datasets: nDCG@10, "
            "Recall@10/100, MRR@10 and MAP (pytrec_eval) for retrieval, Spearman for STS. Writes "
            "results.json, results.md and ndcg.png to eval.output_dir (default <run_dir>/eval)."
        ),
    )
    add_config_args(p)
    p.add_argument("--model", action="append", metavar="NAME=PATH", default=None,
                   help="A model to evaluate (repeatable); replaces eval.models. PATH: a saved embedder "
                        "folder, a registered name, or bm25.")
    p.add_argument("--passkey", action="store_true",
                   help="Run only the long-context passkey test (eval.passkey.*) for each model.")
    p.add_argument("--output-dir", help="Where to write (overrides eval.output_dir).")
    p.set_defaults(func=run)


def _parse_models(items: list[str]) -> dict[str, str]:
    from rayembed.config import ConfigError

    models: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item, item
        if not name or not path:
            raise ConfigError(f"--model {item!r}: write it as NAME=PATH, e.g. --model trained=runs/demo/model.")
        models[name] = path
    return models


def run(args: argparse.Namespace) -> int:
    import logging

    # bm25s sets its own logger to DEBUG on import; keep it at the level the user asked for.
    import bm25s  # noqa: F401

    from rayembed.cli import load_from_args
    from rayembed.config import save_resolved
    from rayembed.evaluate import evaluate_models, render_table
    from rayembed.evaluate.runner import run_passkey_for, write_results
    from rayembed.runtime import resolve_data_dir

    logging.getLogger("bm25s").setLevel(max(logging.getLogger().level, logging.INFO))
    cfg = load_from_args(args)
    ev = cfg.eval
    models = _parse_models(args.model) if args.model else dict(ev.models)
    from rayembed.cluster.storage import local_folder

    out_dir = local_folder(args.output_dir or ev.output_dir or f"{str(cfg.run_dir).rstrip('/')}/eval",
                           what="eval.output_dir" if (args.output_dir or ev.output_dir) else "run_dir")
    save_resolved(cfg, out_dir)
    common = dict(query_instructions=ev.query_instructions, batch_size=ev.batch_size,
                  max_length=ev.max_length, device=cfg.model.device, dtype=cfg.model.dtype,
                  autocast=cfg.model.autocast,
                  index_type=ev.index_type)
    if args.passkey:
        from rayembed.evaluate import load_retriever
        from rayembed.evaluate.runner import machine_info

        results = {"machine": machine_info(), "models": {}, "datasets": {}, "metrics": {}, "passkey": {}}
        for name, model in models.items():
            retriever = load_retriever(name, model, bm25=ev.bm25, **common)
            results["models"][name] = {"source": model, **retriever.describe()}
            results["passkey"][name] = run_passkey_for(retriever, ev.passkey)
        write_results(results, out_dir, plot=False)
    else:
        data_dir = resolve_data_dir(cfg.data_dir)
        results = evaluate_models(
            models, ev.datasets, out_dir, data_dir=data_dir, instructions=ev.instructions, top_k=ev.top_k,
            bm25=ev.bm25, passkey=ev.passkey, plot=ev.plot, keep_indexes=ev.keep_indexes, hybrid=ev.hybrid,
            **common,
        )
    print(render_table(results), end="")
    print(f"\nWrote {out_dir}/results.json and results.md")
    return 0

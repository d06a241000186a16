"""Synthetic-data generation throughput.

    python bench/synth.py                 # everything (SmolLM2 part takes a few minutes on CPU)
    python bench/synth.py --skip-llm      # scripted server only

1. The client actor (SynthWorker, the code each Ray Data actor runs) against the scripted
   OpenAI-compatible server, run in its own process, at zero latency and at a fixed 200 ms:
   requests/s, accepted rows/s, peak concurrency, and at 200 ms the share of the ideal
   throughput concurrency / latency (goal: >= 80% with 64 in flight).
2. The whole Ray Data pipeline (run_synth) at 200 ms: end to end, and steady state (between the
   first and last chunk commits, i.e. without actor start-up).
3. SmolLM2-135M-Instruct behind serve-llm: accept rate and throughput of real generation.

Figures go to stdout and to bench/out/synth.json. The machine may be shared: timings are noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

from _common import REPO  # sets the environment before Ray or rayembed load

sys.path.insert(0, str(REPO / "tests" / "synth"))


def _serve(latency_s: float, conn) -> None:
    from scripted_server import ScriptedLLM

    srv = ScriptedLLM(latency_s=latency_s)
    conn.send(srv.start())
    conn.recv()  # block until told to stop
    srv.stop()


class ServerProcess:
    """The scripted server in its own process, so it does not share a GIL with the client."""

    def __init__(self, latency_s: float):
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_serve, args=(latency_s, child), daemon=True)
        self.proc.start()
        self.url = self.parent.recv()

    def stop(self) -> None:
        self.parent.send("stop")
        self.proc.join(timeout=10)


def cfg_for(url: str, tmp: str, *extra: str):
    from rayembed.config import load_config

    return load_config(None, [
        f"run_dir={tmp}", f"synth.base_url={url}", "synth.model=scripted", "synth.max_in_flight=64",
        "synth.request_timeout_s=30", "synth.backoff_base_s=0.05", "synth.backoff_max_s=0.5", *extra,
    ])


def bench_client(latency_s: float, n: int) -> dict:
    from rayembed.synth.client import Secret
    from rayembed.synth.languages import LanguageSampler, language_weights
    from rayembed.synth.prompts import generation_specs
    from rayembed.synth.worker import SynthWorker, client_settings, validation_settings

    server = ServerProcess(latency_s)
    try:
        cfg = cfg_for(server.url, tempfile.mkdtemp())
        specs = [s.to_dict() for s in generation_specs(
            {"sts": n // 2, "bitext": n - n // 2}, 0, {}, LanguageSampler(language_weights()), 1, 256, 300)]
        w = SynthWorker(client_settings(cfg.synth, server.url), Secret("unused"), validation_settings(cfg.synth))
        w.process("generate", specs[:64])  # warm up connections
        t0, c0 = time.monotonic(), time.process_time()
        res = w.process("generate", specs)
        dt, cpu = time.monotonic() - t0, time.process_time() - c0
        w.close()
    finally:
        server.stop()
    st = res["stats"]
    out = {
        "latency_s": latency_s,
        "requests": st["requests"],
        "seconds": round(dt, 3),
        "requests_per_s": round(st["requests"] / dt, 1),
        "accepted_rows_per_s": round(st["accepted"] / dt, 1),
        "accept_rate": round(st["accepted"] / len(specs), 3),
        "peak_in_flight": st["peak_in_flight"],
        # CPU the client process spent per request: the load-independent cost, and the bound
        # it sets on one actor: 1000 / ms requests/s per core.
        "client_cpu_ms_per_request": round(1000 * cpu / st["requests"], 2),
    }
    if latency_s > 0:
        ideal = 64 / latency_s
        out["ideal_requests_per_s"] = ideal
        out["percent_of_ideal"] = round(100 * out["requests_per_s"] / ideal, 1)
    return out


def bench_pipeline(latency_s: float, n: int) -> dict:
    from rayembed.synth import run_synth

    server = ServerProcess(latency_s)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        cfg = cfg_for(server.url, tmp, f"synth.num_examples={{sts: {n}}}", "synth.chunk_size=64",
                      "synth.num_actors=1", "synth.chunks_in_flight_per_actor=4", "compute.num_cpus=4",
                      "compute.object_store_memory_mb=256", f"compute.temp_dir={tmp}/ray", "compute.log_to_driver=false")
        t0 = time.monotonic()
        s = run_synth(cfg)
        dt = time.monotonic() - t0
    finally:
        import ray

        ray.shutdown()
        server.stop()
    steady = s["this_run"]["generate_steady_requests_per_s"]
    return {
        "latency_s": latency_s,
        "requests": s["requests"],
        "accepted": s["accepted"],
        "end_to_end_s_incl_ray_start": round(dt, 2),
        "generate_stage_s": s["this_run"]["generate_s"],
        "steady_requests_per_s": steady,
        "steady_percent_of_ideal": round(100 * steady / (64 / latency_s), 1) if steady else None,
        "peak_in_flight": s["peak_in_flight"],
    }


def bench_smollm2() -> dict:
    from rayembed.config import load_config
    from rayembed.synth import run_synth

    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    cfg = load_config(REPO / "jobs/configs/local/synth.yaml", [
        f"run_dir={tmp}", "synth.num_examples={sts: 6, bitext: 2, short-long: 4}", "synth.tasks_per_brainstorm=6",
        "synth.max_tokens=192", "synth.brainstorm_max_tokens=256", "synth.llm_server.port=8149",
        f"compute.temp_dir={tmp}/ray", "compute.log_to_driver=false",
    ])
    t0 = time.monotonic()
    try:
        s = run_synth(cfg)
    finally:
        import ray

        ray.shutdown()
    dt = time.monotonic() - t0
    gen_s = s["this_run"]["generate_s"] + s["this_run"]["brainstorm_s"]
    planned = s["planned_generation_specs"]
    return {
        "model": "SmolLM2-135M-Instruct (fp32, CPU, serve-llm, batch 8)",
        "requests": s["requests"],
        "planned_generation_specs": planned,
        "accepted": s["accepted"],
        "accept_rate": round(s["accepted"] / planned, 3) if planned else 0.0,
        "rejected_by_reason": s["rejected_by_reason"],
        "brainstorm_tasks": s["brainstorm"]["tasks"],
        "completion_tokens": s["completion_tokens"],
        "stage_seconds": round(gen_s, 1),
        "requests_per_s": round(s["requests"] / gen_s, 3) if gen_s else None,
        "completion_tokens_per_s": round(s["completion_tokens"] / gen_s, 1) if gen_s else None,
        "end_to_end_s_incl_ray_and_model_load": round(dt, 1),
        "summary": s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per scripted-server measurement")
    ap.add_argument("--skip-llm", action="store_true", help="leave out the SmolLM2 measurement")
    ap.add_argument("--skip-pipeline", action="store_true", help="leave out the Ray Data pipeline measurement")
    args = ap.parse_args()
    from rayembed.runtime import setup_logging

    setup_logging("WARNING")
    results: dict = {"cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]}
    for lat in (0.0, 0.2):
        r = bench_client(lat, args.requests)
        results[f"client_latency_{int(lat * 1000)}ms"] = r
        line = (f"client  latency {lat * 1000:>4.0f} ms: {r['requests_per_s']:>7.1f} req/s, "
                f"{r['accepted_rows_per_s']:>7.1f} accepted rows/s, peak in flight {r['peak_in_flight']}, "
                f"client CPU {r['client_cpu_ms_per_request']} ms/request")
        if lat:
            line += f", {r['percent_of_ideal']}% of ideal {r['ideal_requests_per_s']:.0f} req/s (64 / {lat} s)"
        print(line, flush=True)
    if not args.skip_pipeline:
        r = bench_pipeline(0.2, args.requests)
        results["pipeline_latency_200ms"] = r
        print(f"pipeline latency  200 ms: {r['requests']} requests, steady {r['steady_requests_per_s']} req/s "
              f"({r['steady_percent_of_ideal']}% of ideal), generate stage {r['generate_stage_s']} s, "
              f"end to end {r['end_to_end_s_incl_ray_start']} s incl. Ray start", flush=True)
    if not args.skip_llm:
        r = bench_smollm2()
        results["smollm2_serve_llm"] = r
        print(f"SmolLM2 serve-llm: {r['accepted']}/{r['planned_generation_specs']} accepted "
              f"(accept rate {r['accept_rate']}), {r['requests']} requests in {r['stage_seconds']} s "
              f"({r['requests_per_s']} req/s, {r['completion_tokens_per_s']} completion tokens/s); "
              f"rejects: {r['rejected_by_reason']}", flush=True)
    results["load_avg_at_end"] = os.getloadavg()[0]
    from rayembed.io import atomic_write_json

    atomic_write_json(REPO / "bench" / "out" / "synth.json", results)
    print(f"wrote {REPO / 'bench' / 'out' / 'synth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The counts of a synth run: :class:`SynthStats` (one chunk's, or a stage's totals; they add up),
:class:`RunStats` (one ``run_synth`` call's), and :func:`build_summary`, the ``_summary.json`` they make.

A chunk's :class:`SynthStats` travels as a plain dict (:meth:`SynthStats.to_dict`): in the
actor's reply, and as the ``stats`` of the chunk's progress marker, which later runs read back.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """``a`` and ``b`` added key by key: a's keys first, in their order, then b's new ones."""
    out = dict(a)
    for k, n in b.items():
        out[k] = out.get(k, 0) + n
    return out


@dataclass
class SynthStats:
    """Counters of a chunk of requests, or the sum of many (``a + b``; peak_in_flight is the max)."""

    specs: int = 0
    requests: int = 0  # attempts, retries included
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    failed_requests: int = 0  # specs whose request failed (sent again by the next run)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rows_by_task_type: dict[str, int] = field(default_factory=dict)
    rows_by_language: dict[str, int] = field(default_factory=dict)
    tasks: int = 0  # brainstormed task descriptions
    peak_in_flight: int = 0
    elapsed_s: float = 0.0

    def __add__(self, other: SynthStats) -> SynthStats:
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                out[f.name] = add_counts(a, b)
            elif f.name == "peak_in_flight":
                out[f.name] = max(a, b)
            else:
                out[f.name] = a + b
        return SynthStats(**out)

    def after(self, prev: SynthStats | None, still_failed: int) -> SynthStats:
        """A chunk's stats once this attempt is committed on top of its earlier ones (``prev``):
        the counts add up, ``specs`` stays the chunk's, ``failed_requests`` is what is left to send."""
        st = prev + self if prev else dataclasses.replace(self)
        if prev:
            st.specs = prev.specs
        st.failed_requests = still_failed
        return st

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthStats:
        """Read back :meth:`to_dict` (a marker's ``stats``); keys it does not know are ignored."""
        return cls(**{f.name: (dict(d[f.name]) if isinstance(d[f.name], dict) else d[f.name])
                      for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class ThisRun:
    """What this call itself sent and kept (the stage totals also count chunks of earlier runs)."""

    requests: int = 0
    accepted: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)  # seconds per stage that sent requests
    commit_times: dict[str, list[float]] = field(default_factory=dict)  # per stage: seconds at each chunk commit
    chunk_requests: dict[str, list[int]] = field(default_factory=dict)  # per stage: requests of each chunk

    def steady_rate(self, stage: str) -> float | None:
        """Requests/s between the first and the last chunk commit (leaves out actor start-up)."""
        times = self.commit_times.get(stage, [])
        reqs = self.chunk_requests.get(stage, [])
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return round(sum(reqs[1:]) / (times[-1] - times[0]), 3)


@dataclass
class RunStats:
    """One ``run_synth`` call: the folder's totals per stage, the budget and failures it stops on,
    and what the call itself did."""

    output_dir: str
    seed: int
    endpoint: str  # the base URL, secrets redacted
    brainstorm: SynthStats = field(default_factory=SynthStats)
    generate: SynthStats = field(default_factory=SynthStats)
    unique_tasks: dict[str, int] = field(default_factory=dict)  # per task type, repeats dropped
    planned_specs: int = 0  # generation specs the config asks for
    cost_usd: float = 0.0  # the folder's spend: committed chunks of earlier runs and this one's
    sent: int = 0  # specs sent by this call, each counted once however many attempts it took
    failed: Counter = field(default_factory=Counter)  # this call's failed requests by reason
    resumed_chunks: int = 0
    new_chunks: int = 0
    stopped: str | None = None  # why the call stopped before the end (budget, failures)
    this_run: ThisRun = field(default_factory=ThisRun)
    elapsed_s: float = 0.0

    def committed(self, stage: str, st: SynthStats, failed: list[dict[str, Any]], t: float) -> None:
        """Count a chunk this call committed: its attempt's stats, failures, and commit time ``t``."""
        self.sent += st.specs
        self.failed.update(f["reason"] for f in failed)
        self.this_run.commit_times.setdefault(stage, []).append(t)
        self.this_run.chunk_requests.setdefault(stage, []).append(st.requests)
        self.cost_usd += st.cost_usd
        self.new_chunks += 1


def build_summary(run: RunStats, sc) -> dict[str, Any]:
    """The ``_summary.json`` of a run (``sc``: its ``synth`` config section)."""
    bs, gen = run.brainstorm, run.generate
    both = bs + gen
    reasons = dict(gen.rejected_by_reason)
    for r, n in bs.rejected_by_reason.items():
        reasons[f"brainstorm:{r}"] = n
    return {
        "output_dir": run.output_dir,
        "model": sc.model,
        "seed": run.seed,
        "requests": both.requests,
        "retries": both.retries,
        "retry_reasons": both.retry_reasons,
        # Requests whose spec is still to be sent again (the folder's), and this run's failures.
        "failed_requests": both.failed_requests,
        "failed_by_reason": dict(run.failed),
        "accepted": gen.accepted,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "prompt_tokens": both.prompt_tokens,
        "completion_tokens": both.completion_tokens,
        "cost_usd": round(run.cost_usd, 6),
        "rows_by_task_type": dict(sorted(gen.rows_by_task_type.items())),
        "rows_by_language": dict(sorted(gen.rows_by_language.items(), key=lambda kv: -kv[1])),
        "brainstorm": {
            "requests": bs.requests,
            "tasks": bs.tasks,
            "unique_tasks": run.unique_tasks,
        },
        "planned_generation_specs": run.planned_specs,
        "chunks_resumed": run.resumed_chunks,
        "chunks_new": run.new_chunks,
        "stopped_early": run.stopped,
        "peak_in_flight": both.peak_in_flight,
        "elapsed_s": round(run.elapsed_s, 3),
        "this_run": {
            "requests": run.this_run.requests,
            "accepted": run.this_run.accepted,
            "brainstorm_s": round(run.this_run.stage_s.get("brainstorm", 0.0), 3),
            "generate_s": round(run.this_run.stage_s.get("generate", 0.0), 3),
            "generate_steady_requests_per_s": run.this_run.steady_rate("generate"),
        },
        "base_url": run.endpoint,
    }

"""Gather every benchmark's figures (bench/out/*.json) into one report, bench/RESULTS.md.

    .venv/bin/python bench/report.py                     # after the bench scripts ran
    make bench                                           # runs them all, then this

The report states the machine and the date, lists every figure of every benchmark, computes
every ratio against its peer, and draws a plot where a picture reads better than a table.

Benchmarks write free-form JSON, so peers are found by shape, not by name:
- sibling objects with the same numeric keys (``{"plain": {"rows_per_s": ..}, "ray": {..}}``)
  are peers, each compared with the first one;
- sibling numbers that share a unit suffix (``embedder_docs_per_s`` and
  ``sentence_transformers_docs_per_s``) are peers, compared with the first one;
- rows of a list of objects (``serve: [{"concurrency": 1, ..}, {"concurrency": 8, ..}]``) are
  peers, each compared with the first row;
- numbers a benchmark computed itself under a name holding ``ratio`` or ``_over_`` are listed
  as they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Units that make two sibling numbers comparable when their names end in the same one.
UNIT_SUFFIXES = ("_per_s", "_qps", "_ms", "_s", "_seconds", "_mb", "_gb", "_bytes", "_tokens")
# Metrics worth a bar chart when peers report them (throughput and latency).
PLOT_HINTS = ("per_s", "qps", "_ms", "per_step_s")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf as (dotted.key, value); lists of scalars stay whole, lists of objects get [i]."""
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, x in enumerate(obj):
            out += flatten(x, f"{prefix}[{i}]")
    else:
        out.append((prefix, obj))
    return out


def _unit(key: str) -> tuple[str, str] | None:
    """``(who, what)`` of a key named ``<who>_<noun><unit>``: ``embedder_docs_per_s`` gives
    ``("embedder", "docs_per_s")``. Keys without a subject (``rows_per_s``) give None."""
    for suffix in UNIT_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            head = key[: -len(suffix)]
            who, sep, noun = head.rpartition("_")
            if sep and who:
                return who, f"{noun}{suffix}"
            return None
    return None


def peer_groups(obj: Any, path: str = "") -> list[dict[str, Any]]:
    """Groups of comparable figures: ``{"where", "metric", "members": [(name, value), ...]}``.

    The first member is the peer the others are compared with.
    """
    groups: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        subs = {k: v for k, v in obj.items() if isinstance(v, dict)}
        if len(subs) >= 2:
            metrics: dict[str, list[tuple[str, float]]] = {}
            for name, sub in subs.items():
                for m, v in sub.items():
                    if _num(v):
                        metrics.setdefault(m, []).append((name, v))
            for m, members in metrics.items():
                if len(members) >= 2:
                    groups.append({"where": path or "(top)", "metric": m, "members": members})
        by_unit: dict[str, list[tuple[str, float]]] = {}
        for k, v in obj.items():
            u = _unit(k)
            if u and _num(v) and "ratio" not in k and "_over_" not in k:
                by_unit.setdefault(u[1], []).append((u[0], v))
        for what, members in by_unit.items():
            if len(members) >= 2:
                groups.append({"where": path or "(top)", "metric": what, "members": members})
        for k, v in obj.items():
            groups += peer_groups(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list) and len(obj) >= 2 and all(isinstance(x, dict) for x in obj):
        keys = list(obj[0])
        label_key = next((k for k in keys if not isinstance(obj[0][k], (dict, list))), None)
        for m in keys:
            if m == label_key or not all(_num(x.get(m)) for x in obj):
                continue
            members = [(f"{label_key}={x.get(label_key)}" if label_key else f"[{i}]", x[m])
                       for i, x in enumerate(obj)]
            groups.append({"where": path, "metric": m, "members": members})
    return groups


def own_ratios(flat: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in flat if ("ratio" in k.split(".")[-1] or "_over_" in k.split(".")[-1]) and _num(v)]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
        info["load_average"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    return info


def plot_groups(name: str, groups: list[dict[str, Any]], out: Path) -> Path | None:
    """One figure per benchmark: a bar chart for each throughput/latency peer group (at most 6)."""
    chosen = [g for g in groups if any(h in g["metric"] for h in PLOT_HINTS)][:6]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayembed.io import atomic_path

    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.ravel(), chosen):
        labels = [m for m, _ in g["members"]]
        vals = [v for _, v in g["members"]]
        bars = ax.bar(range(len(vals)), vals, color=["#888888"] + ["#3b75af"] * (len(vals) - 1))
        ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=7)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{g['where']}: {g['metric']}", fontsize=8)
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    path = out / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def section(name: str, data: Any, mtime: float, plots_dir: Path | None, md_dir: Path) -> list[str]:
    when = dt.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
    lines = [f"## {name}", "", f"Measured {when} (bench/out/{name}.json).", ""]
    flat = flatten(data)
    groups = peer_groups(data)
    ratios = own_ratios(flat)
    if ratios:
        lines += ["Ratios the benchmark reports:", "", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ratios] + [""]
    if groups:
        lines += ["Ratios against the peer (the first of each group):", "",
                  "| where | metric | peer | other | peer value | other value | other / peer |",
                  "|---|---|---|---|---:|---:|---:|"]
        for g in groups:
            (p_name, p_val), *others = g["members"]
            for o_name, o_val in others:
                ratio = _fmt(o_val / p_val) if p_val else "–"
                lines.append(f"| {g['where']} | {g['metric']} | {p_name} | {o_name} | {_fmt(p_val)} | "
                             f"{_fmt(o_val)} | {ratio} |")
        lines.append("")
    if plots_dir is not None and groups:
        png = plot_groups(name, groups, plots_dir)
        if png is not None:
            lines += [f"![{name}]({os.path.relpath(png, md_dir)})", ""]
    lines += ["Every figure:", "", "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in flat] + [""]
    return lines


def build_report(out_dir: Path, md_path: Path, plots: bool = True) -> str:
    files = sorted(out_dir.glob("*.json"))
    m = machine()
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["# Benchmark results", "", f"Generated {now} by `bench/report.py` from {len(files)} file(s) in "
             f"`{os.path.relpath(out_dir, md_path.parent)}/`.", "", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items()]
    lines += ["", "Timings on a shared or busy machine are noisy; each benchmark's own JSON says how it "
              "guarded against that (alternating runs, best-of-n). Compare ratios within one file.", ""]
    if not files:
        lines += ["No benchmark output found. Run `make bench` (or a bench/*.py script) first.", ""]
    plots_dir = md_path.parent / "plots" if plots else None
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            lines += [f"## {f.stem}", "", f"Unreadable JSON ({e.msg} at line {e.lineno}); rerun bench/{f.stem}.py.", ""]
            continue
        lines += section(f.stem, data, f.stat().st_mtime, plots_dir, md_path.parent)
        for k, v in own_ratios(flatten(data)):
            summary.append(f"| {f.stem} | {k} | {_fmt(v)} |")
    if summary:
        idx = lines.index("## Machine")
        lines[idx:idx] = ["## Headline ratios", "", "| benchmark | ratio | value |", "|---|---|---:|",
                          *summary, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=HERE / "out", help="Where the bench JSON files are.")
    ap.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="The report to write.")
    ap.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "platform"))
    from rayembed.io import atomic_write_text

    text = build_report(args.out_dir, args.output, plots=not args.no_plots)
    atomic_write_text(args.output, text)
    n = len(list(args.out_dir.glob("*.json")))
    print(f"wrote {args.output} ({n} benchmark file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

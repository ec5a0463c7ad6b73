"""``fastnca plot``: figures of ``fastnca bench --json`` results.

One PNG per results file: a row per benchmark (op and configuration), time on the left
(forward and forward + backward per implementation, log scale, with the speed-up over the
suite's baseline) and memory on the right (peak during one forward + backward, else the
bytes autograd saves). Where a CUDA-graph replay was measured, a tick marks its time: the
kernels without the host's launch cost. Needs matplotlib (``pip install "fastnca[plot]"``).
"""
from __future__ import annotations

import json
import math
import os

from .common import BASELINES, baseline_ratios

_FWD, _BWD, _GRAPH = "#9ecae1", "#2171b5", "#08306b"
_MEM, _BASE = "#74c476", "#bdbdbd"


def groups(results: list[dict]) -> list[tuple[tuple[str, str, str], list[dict]]]:
    """(op, config, dtype) -> rows with at least one time or memory figure, in file order."""
    out: dict[tuple, list[dict]] = {}
    for r in results:
        if any(r.get(k) is not None for k in ("fwd_ms", "fwd_bwd_ms", "peak_mb", "saved_mb")):
            out.setdefault((r["op"], r["config"], r.get("dtype", "")), []).append(r)
    return list(out.items())


def _title(op: str, config: str, dtype: str) -> str:
    text = f"{op}  {config}  {dtype}"
    return text if len(text) <= 110 else text[:107] + "..."


def _time_panel(ax, op: str, rows: list[dict]) -> None:
    names = [r["impl"] for r in rows]
    ys = list(range(len(rows)))
    base = BASELINES.get(op)
    ratios = baseline_ratios(rows)
    both = any(r.get("fwd_ms") for r in rows) and any(r.get("fwd_bwd_ms") for r in rows)
    h = 0.38 if both else 0.7
    for field, colour, dy, label in (("fwd_ms", _FWD, -h / 2 if both else 0, "forward"),
                                     ("fwd_bwd_ms", _BWD, h / 2 if both else 0, "forward + backward")):
        vals = [r.get(field) for r in rows]
        if not any(vals):
            continue
        ax.barh([y + dy for y in ys], [v or 0 for v in vals], height=h, color=colour, label=label)
        for y, r, v, q in zip(ys, rows, vals, ratios):
            if v:
                tag = f" {v:.3g} ms" + (f"  {q[field]:.2g}x" if r["impl"] != base and field in q else "")
                ax.text(v, y + dy, tag, va="center", fontsize=7)
            graph = (r.get("extra") or {}).get(field.replace("_ms", "_graph_ms"))
            if graph:
                ax.plot([graph, graph], [y + dy - h / 2, y + dy + h / 2], color=_GRAPH, lw=2)
    ax.set_xscale("log")
    ax.set_yticks(ys, [n + (" (baseline)" if n == base else "") for n in names], fontsize=8)
    ax.invert_yaxis()
    graphs = any((r.get("extra") or {}).get(f) for r in rows for f in ("fwd_graph_ms", "fwd_bwd_graph_ms"))
    ax.set_xlabel("median ms per call (log)" + ("; tick: CUDA-graph replay" if graphs else ""), fontsize=8)
    _pad_log_axis(ax, [v for r in rows for v in (r.get("fwd_ms"), r.get("fwd_bwd_ms")) if v])
    ax.legend(fontsize=7, loc="lower right")


def _timed(rows: list[dict]) -> bool:
    return any(r.get("fwd_ms") or r.get("fwd_bwd_ms") for r in rows)


def _memory_panel(ax, op: str, rows: list[dict], labels: bool = False) -> None:
    """labels: name the implementations here (a benchmark with no time panel), with notes."""
    field = "peak_mb" if any(r.get("peak_mb") for r in rows) else "saved_mb"
    vals = [r.get(field) for r in rows]
    if not any(vals):
        ax.axis("off")
        return
    base = BASELINES.get(op)
    ys = list(range(len(rows)))
    ax.barh(ys, [v or 0 for v in vals], height=0.7,
            color=[_BASE if r["impl"] == base else _MEM for r in rows])
    for y, v, q in zip(ys, vals, baseline_ratios(rows)):
        if v:
            less = q.get(field, 0.0)
            ax.text(v, y, f" {v:.3g} MB" + (f"  {less:.2g}x less" if less > 1.05 else "")
                    + (f"  ({rows[y]['note']})" if labels and rows[y].get("note") else ""), va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(ys, [r["impl"] + (" (baseline)" if r["impl"] == base else "") for r in rows] if labels
                  else [""] * len(ys), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(("peak MB during fwd+bwd" if field == "peak_mb" else "MB saved for backward") + " (log)",
                  fontsize=8)
    _pad_log_axis(ax, [v for v in vals if v])


def _pad_log_axis(ax, vals: list[float]) -> None:
    """Room on the right of a log axis for the bars' labels."""
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_xlim(10 ** math.floor(math.log10(lo)), hi * 30)


def plot_file(path: str, out_dir: str) -> str:
    """Write ``out_dir/<stem>.png`` for one results file and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    found = groups(data.get("results", []))
    if not found:
        raise ValueError(f"{path}: no results with a time or memory figure")
    env = data.get("environment", {})
    heights = [0.5 + 0.32 * len(rows) for _, rows in found]
    fig, axes = plt.subplots(len(found), 2, figsize=(13, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]})
    grid = axes[0][0].get_gridspec()
    for i, ((key, rows), (left, right)) in enumerate(zip(found, axes)):
        if not _timed(rows):  # a memory-only benchmark: one wide panel, named bars
            left.remove()
            right.remove()
            left = fig.add_subplot(grid[i, :])
            _memory_panel(left, key[0], rows, labels=True)
        else:
            _time_panel(left, key[0], rows)
            _memory_panel(right, key[0], rows)
        left.set_title(_title(*key), fontsize=9, loc="left")
    commit = f", commit {str(env['git_commit'])[:7]}" if env.get("git_commit") else ""  # none outside a checkout
    fig.suptitle(f"fastnca bench on {env.get('device', '?')}: torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"CUDA {env.get('cuda')}{commit}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (sum(heights) + 0.8)))
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target

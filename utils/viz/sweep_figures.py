"""The figures of a hyper-parameter search, from its trials (Matplotlib on an Agg canvas, as the
run figures; not optuna.visualization, whose figures need plotly):

    history.png   each finished trial's score in trial order, and the best so far
    slices.png    the score against each searched key (log axis for log ranges); failed
                  trials as crosses at the bottom, so a region that diverges shows
"""
from __future__ import annotations

import math
from pathlib import Path

from utils.viz.figures import _figure, save_figure

HISTORY_FILE = "history.png"
SLICES_FILE = "slices.png"


def history_figure(rows: list[dict], path: Path) -> Path:
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    xs, ys = [r["number"] for r in done], [100 * r["value"] for r in done]
    ax.plot(xs, ys, "o", color="#1f77b4", label="trial")
    best, best_line = -math.inf, []
    for y in ys:
        best = max(best, y)
        best_line.append(best)
    ax.step(xs, best_line, where="post", color="black", lw=1.5, label="best so far")
    failed = [r["number"] for r in rows if r["state"] == "FAIL"]
    if failed and ys:
        ax.plot(failed, [min(ys)] * len(failed), "x", color="#d62728", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation class-averaged accuracy (%)")
    ax.set_title("Search history")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def slices_figure(rows: list[dict], params, path: Path) -> Path:
    fig = _figure(4.0 * len(params), 3.8)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    floor = min((100 * r["value"] for r in done), default=0.0)
    for i, p in enumerate(params):
        ax = fig.add_subplot(1, len(params), i + 1)
        for subset, marker, colour, ys in (
                (done, "o", "#1f77b4", [100 * r["value"] for r in done]),
                ([r for r in rows if r["state"] == "FAIL" and r[p.key] != ""], "x", "#d62728", None)):
            if not subset:
                continue
            xs = [r[p.key] for r in subset]
            if p.is_finite:  # categories at evenly spaced positions, labelled with their values
                labels = [str(v) for v in p.values]
                xs = [labels.index(str(x)) if str(x) in labels else -1 for x in xs]
                ax.set_xticks(range(len(labels)), labels)
            ax.plot(xs, ys if ys is not None else [floor] * len(xs), marker, color=colour, ls="")
        if p.kind == "log":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        if i == 0:
            ax.set_ylabel("validation All (%)")
    fig.suptitle("Score against each searched key (x: failed)")
    return save_figure(fig, path)


def draw_sweep_figures(rows: list[dict], params, sweep_dir: Path) -> list[Path]:
    return [history_figure(rows, sweep_dir / HISTORY_FILE), slices_figure(rows, params, sweep_dir / SLICES_FILE)]

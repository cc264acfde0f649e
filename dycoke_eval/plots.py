"""Accuracy against TFLOPs per model (the style of the paper's Figure 1, right), as PNG with its data.

One plot per table and model. Each method is a point at its eq. 8 TFLOPs: a filled circle for
ours, a larger hollow diamond for the paper's value, drawn above the circles, so a point where the
two coincide shows both. The y value is the mean of the table's percentage metrics (0-5 judge
scores, plan figures and FastVID's % of vanilla are left out; where the table has FastVID's Avg.,
that alone), over the same metrics for every point of a plot: those that every point has. The
axis label and the CSV's `metrics` column name them. A point that has none of the metrics the
others share is left out, and a note on the figure (and printed) names it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

NOT_PERCENT = {"retained_ratio", "tflops", "flops_ratio", "activitynetqa_score", "videodc", "params", "speedup",
               "total_latency_s", "gpu_memory_gb", "latency_per_example_s", "decode_ms_per_token", "accuracy_std",
               "avg_percent"}  # fmt: skip
SUMMARY = "avg_score"  # FastVID's Avg.: the mean of its four benchmarks, which the table's other columns break down
MARKERS = {  # ours: filled circles; the paper's: larger outlines drawn above them (zorder), so both show where they meet
    "ours": {"marker": "o", "s": 40, "zorder": 2},
    "paper": {"marker": "D", "s": 110, "zorder": 3, "linewidths": 1.5},
}


def accuracy_points(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """model, method, source (ours|paper), tflops, accuracy, metrics: one row per plotted point; and notes.

    Per model, `accuracy` is the mean over the percentage metrics every point of that model has
    (`metrics` names them), so no point's mean is over a different set. Where the points share no
    metric, those with the fewest are left out until they do; each is named in the notes.
    """
    metrics = [m for m in dict.fromkeys(c[0] for c in frame.columns if c[0]) if m not in NOT_PERCENT]
    metrics = [SUMMARY] if SUMMARY in metrics else metrics
    names = frame[[("", "model"), ("", "method")]].apply(tuple, axis=1)
    twice = names.duplicated(keep=False)  # rows of one model told apart by frames alone: the point's name says which
    candidates = []
    for index, row in frame.iterrows():
        tflops = row.get(("tflops", "ours"), math.nan)
        x = tflops if not pd.isna(tflops) else row.get(("tflops", "paper"), math.nan)
        method = f"{row[('', 'method')]}, {row.get(('', 'frames'), '?')} frames" if twice[index] else row[("", "method")]
        for source in ("ours", "paper"):
            have = [m for m in metrics if not pd.isna(row[(m, source)])]
            if have and not pd.isna(x):
                candidates.append({"model": row[("", "model")], "method": method, "source": source, "tflops": x,
                                   "values": {m: row[(m, source)] for m in have}})  # fmt: skip
    points, notes = [], []
    for model in dict.fromkeys(point["model"] for point in candidates):
        kept = [point for point in candidates if point["model"] == model]
        shared = _shared(kept, metrics)
        while not shared:  # the points share no metric: leave out those with the fewest until they do
            fewest = min(len(point["values"]) for point in kept)
            for point in [point for point in kept if len(point["values"]) == fewest]:
                notes.append(f"{model}: left out {point['method']} ({point['source']}): it has only {', '.join(point['values'])}")
            kept = [point for point in kept if len(point["values"]) > fewest]
            shared = _shared(kept, metrics)
        for point in kept:
            mean = sum(point["values"][m] for m in shared) / len(shared)
            points.append({**{key: point[key] for key in ("model", "method", "source", "tflops")}, "accuracy": mean,
                           "metrics": " ".join(shared)})  # fmt: skip
    return pd.DataFrame(points), notes


def _shared(points: list[dict], metrics: list[str]) -> list[str]:
    """The metrics every point has, in the table's order; every metric where there is no point (nothing to share)."""
    return [m for m in metrics if all(m in point["values"] for point in points)] if points else metrics


def draw_points(axes, group: pd.DataFrame) -> None:
    """Ours and the paper's points of one model on `axes`: a colour per method, a marker per source (`MARKERS`)."""
    colours = dict(zip(dict.fromkeys(group.method), plt.get_cmap("tab10").colors * 3, strict=False))
    for (method, source), point in group.groupby(["method", "source"], sort=False):
        colour = colours[method]
        axes.scatter(point.tflops, point.accuracy, label=f"{method} ({source})", edgecolors=colour,
                     facecolors=colour if source == "ours" else "none", **MARKERS[source])  # fmt: skip


def plot_accuracy_vs_flops(table: str, frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write {table}_{model}_accuracy_vs_tflops.png and its CSV for every model with points (`table`: table1, fastvid_table1)."""
    points, notes = accuracy_points(frame)
    for note in notes:
        print(f"plots: {table}: {note}")
    written = []
    for model, group in points.groupby("model", sort=False) if not points.empty else []:
        figure, axes = plt.subplots(figsize=(6, 4))
        draw_points(axes, group)
        metrics = group.metrics.iloc[0].split()
        shown = ", ".join(metrics) if len(metrics) <= 3 else f"{len(metrics)} metrics (the CSV's metrics column)"
        axes.set_xlabel("TFLOPs (eq. 8)")
        axes.set_ylabel(f"mean of {shown}", fontsize=8)
        axes.set_title(f"{table}: {model}")
        axes.legend(fontsize=6, loc="best")
        left_out = [note.removeprefix(f"{model}: ") for note in notes if note.startswith(f"{model}: ")]
        if left_out:
            figure.text(0.01, 0.01, "; ".join(left_out), fontsize=5)
        figure.tight_layout()
        path = out_dir / f"{table}_{model}_accuracy_vs_tflops.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        group.to_csv(path.with_suffix(".csv"), index=False)
        written.append(path)
    return written

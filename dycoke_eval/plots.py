"""Accuracy against TFLOPs per model (the style of the paper's Figure 1, right), as PNG with its data.

One plot per table and model. Each method is a point at its eq. 8 TFLOPs: filled for ours,
hollow for the paper's value. The y value is the mean of the table's percentage metrics that the
row has; 0-5 judge scores and plan figures are left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

NOT_PERCENT = {"retained_ratio", "tflops", "flops_ratio", "activitynetqa_score", "videodc", "params", "speedup",
               "total_latency_s", "gpu_memory_gb", "latency_per_example_s", "decode_ms_per_token", "accuracy_std"}  # fmt: skip


def accuracy_points(frame: pd.DataFrame) -> pd.DataFrame:
    """model, method, source (ours|paper), tflops, accuracy: one row per plotted point."""
    metrics = [m for m in dict.fromkeys(c[0] for c in frame.columns if c[0]) if m not in NOT_PERCENT]
    points = []
    for _, row in frame.iterrows():
        tflops = row.get(("tflops", "ours"), math.nan)
        for source in ("ours", "paper"):
            values = [row[(m, source)] for m in metrics if not pd.isna(row[(m, source)])]
            x = tflops if not pd.isna(tflops) else row.get(("tflops", "paper"), math.nan)
            if values and not pd.isna(x):
                points.append({"model": row[("", "model")], "method": row[("", "method")], "source": source,
                               "tflops": x, "accuracy": sum(values) / len(values), "metrics": len(values)})  # fmt: skip
    return pd.DataFrame(points)


def plot_accuracy_vs_flops(table: int, frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write table{N}_{model}_accuracy_vs_tflops.png and its CSV for every model with points."""
    points = accuracy_points(frame)
    written = []
    for model, group in points.groupby("model", sort=False) if not points.empty else []:
        figure, axes = plt.subplots(figsize=(6, 4))
        colours = dict(zip(dict.fromkeys(group.method), plt.get_cmap("tab10").colors, strict=False))
        for (method, source), point in group.groupby(["method", "source"], sort=False):
            colour = colours[method]  # a colour per method: filled for ours, an outline for the paper's value
            axes.scatter(point.tflops, point.accuracy, s=50, label=f"{method} ({source})", linewidths=1.5,
                         facecolors=colour if source == "ours" else "none", edgecolors=colour)  # fmt: skip
        axes.set_xlabel("TFLOPs (eq. 8)")
        axes.set_ylabel("mean accuracy over the table's % metrics")
        axes.set_title(f"Table {table}: {model}")
        axes.legend(fontsize=6, loc="best")
        figure.tight_layout()
        path = out_dir / f"table{table}_{model}_accuracy_vs_tflops.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        group.to_csv(path.with_suffix(".csv"), index=False)
        written.append(path)
    return written

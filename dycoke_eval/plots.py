"""Accuracy against TFLOPs per model (the style of the paper's Figure 1, right), as PNG with its data.

One plot per table and model. Each row of the table is a point at its eq. 8 TFLOPs, coloured by its series:
the method at one configuration, named by `report.series_name` in the same words in every table, so a
method's budgets (DyCoke's K, FastV's ratio, FastVID's R) are points of one colour. Ours are filled circles;
the paper's larger hollow diamonds, drawn above them, so a point where the two coincide shows both. Points of
different series at the same TFLOPs (FastVID's pre-LLM methods at one R) are spread a little apart along x so
that none hides another; the CSV keeps their TFLOPs. The x axis is logarithmic where the TFLOPs span a decade
or more, with a few plain-number ticks either way.

The y value is the mean of the table's percentage metrics (0-5 judge scores, plan figures and FastVID's % of
vanilla are left out), or the table's own summary where it has one (`SUMMARIES`), over the same metrics for
every point of a plot: those that every point has. The axis label names them in words, and the CSV's
`metrics` column by column. A point that has none of the metrics the others share is left out, and a note on
the figure (and printed) names it.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from dycoke_eval.paired import BENCHMARKS  # noqa: E402

NOT_PERCENT = {"retained_ratio", "tflops", "prefill_tflops_real", "flops_ratio", "activitynetqa_score", "videodc", "params",
               "speedup", "total_latency_s", "gpu_memory_gb", "latency_per_example_s", "decode_ms_per_token", "accuracy_std",
               "avg_percent"}  # fmt: skip
SUMMARIES = {  # a table's summary column -> what is plotted instead of every column (which would count parts twice)
    "avg_score": BENCHMARKS,  # FastVID's Avg.: its four benchmarks, which its ablations print without their Avg.
    "avg": ("avg",),  # MVBench, the mean of its 20 tasks (DyCoke's Tables 2 and 7)
    "videomme_avg": ("videomme_avg",),  # VideoMME over its three durations (DyCoke's Table 6)
}
METRIC_NAMES = {
    "activitynetqa_acc": "ActivityNet-QA", "nextqa_mc": "NExT-QA", "perceptiontest_val": "PerceptionTest",
    "videomme_wo_sub": "VideoMME without subtitles", "videomme_w_sub": "VideoMME with subtitles", "videomme_avg": "VideoMME",
    "videomme_short": "VideoMME short", "videomme_medium": "VideoMME medium", "videomme_long": "VideoMME long",
    "mvbench": "MVBench", "longvideobench": "LongVideoBench", "mlvu": "MLVU", "avg": "MVBench", "accuracy": "MVBench",
}  # fmt: skip
MARKERS = {  # ours: filled circles; the paper's: larger outlines drawn above them (zorder), so both show where they meet
    "ours": {"marker": "o", "s": 40, "zorder": 2},
    "paper": {"marker": "D", "s": 110, "zorder": 3, "linewidths": 1.5},
}
SOURCE_NAMES = {"ours": "measured here", "paper": "the paper's"}
SPREAD = 0.015  # how far apart points of different series at the same TFLOPs are drawn, as a share of the x span


def accuracy_points(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """model, series, row, source (ours|paper), tflops, accuracy, metrics: one row per plotted point; and notes.

    `frame` is a report table with its ("", "series") column (`report.build_table(..., for_plot=True)`); a
    series gets ', N frames' where the model's points differ in frames. Per model, `accuracy` is the mean over
    the percentage metrics every point of that model has (`metrics` names them), so no point's mean is over a
    different set. Where the points share no metric, those with the fewest are left out until they do; each is
    named in the notes.
    """
    metrics = [m for m in dict.fromkeys(c[0] for c in frame.columns if c[0]) if m not in NOT_PERCENT]
    metrics = next((list(SUMMARIES[summary]) for summary in SUMMARIES if summary in metrics), metrics)
    column = x_column(frame)
    candidates = []
    for _, row in frame.iterrows():
        tflops = row.get((column, "ours"), math.nan)
        x = tflops if not pd.isna(tflops) else row.get((column, "paper"), math.nan)
        for source in ("ours", "paper"):
            have = [m for m in metrics if not pd.isna(row.get((m, source), math.nan))]
            if have and not pd.isna(x):
                candidates.append({"model": row[("", "model")], "series": row[("", "series")], "row": row[("", "method")],
                                   "frames": row.get(("", "frames"), "-"), "source": source, "tflops": x,
                                   "values": {m: row[(m, source)] for m in have}})  # fmt: skip
    points, notes = [], []
    for model in dict.fromkeys(point["model"] for point in candidates):
        kept = [point for point in candidates if point["model"] == model]
        shared = _shared(kept, metrics)
        while not shared:  # the points share no metric: leave out those with the fewest until they do
            fewest = min(len(point["values"]) for point in kept)
            for point in [point for point in kept if len(point["values"]) == fewest]:
                notes.append(f"{model}: left out {point['row']} ({point['source']}): it has only {', '.join(point['values'])}")
            kept = [point for point in kept if len(point["values"]) > fewest]
            shared = _shared(kept, metrics)
        frames_differ = len({point["frames"] for point in kept}) > 1
        for point in kept:
            series = f"{point['series']}, {point['frames']} frames" if frames_differ else point["series"]
            mean = sum(point["values"][m] for m in shared) / len(shared)
            points.append({"model": model, "series": series, **{key: point[key] for key in ("row", "source", "tflops")},
                           "accuracy": mean, "metrics": " ".join(shared)})  # fmt: skip
    return pd.DataFrame(points), notes


def x_column(frame: pd.DataFrame) -> str:
    """The plot's x: a table that names `prefill_tflops_real` (the frontier) is drawn against the prefill's real FLOPs,
    measured from every sample's per-layer tokens; the papers' tables against eq. 8's TFLOPs, their unit."""
    return "prefill_tflops_real" if any(c[0] == "prefill_tflops_real" for c in frame.columns) else "tflops"


X_LABELS = {"tflops": "TFLOPs (eq. 8)", "prefill_tflops_real": "Prefill TFLOPs per sample (real count: measured, else planned)"}


def _shared(points: list[dict], metrics: list[str]) -> list[str]:
    """The metrics every point has, in the table's order; every metric where there is no point (nothing to share)."""
    return [m for m in metrics if all(m in point["values"] for point in points)] if points else metrics


def accuracy_label(metrics: list[str]) -> str:
    """The y axis in words: 'MVBench accuracy (%)', 'Mean accuracy over NExT-QA, PerceptionTest and VideoMME (%)'."""
    names = list(dict.fromkeys(METRIC_NAMES.get(metric, metric) for metric in metrics))
    if len(names) == 1:
        return f"{names[0]} accuracy (%)"
    return textwrap.fill(f"Mean accuracy over {', '.join(names[:-1])} and {names[-1]} (%)", width=60)


def log_scale(tflops: pd.Series) -> bool:
    """Whether the TFLOPs span a decade or more, where a linear axis would crowd the cheap methods together."""
    return tflops.max() >= 10 * tflops.min() > 0


def spread_x(points: pd.DataFrame, log: bool) -> pd.Series:
    """Each point's x as drawn: points of different series at the same TFLOPs (to 3 digits) moved apart by SPREAD
    of the x span (in decades on a log axis), around their TFLOPs in the order the series come; ours and the
    paper's of one series stay together, and a point alone at its TFLOPs stays there."""
    position = np.log10(points.tflops) if log else points.tflops.astype(float)
    span = position.max() - position.min()
    if span == 0:  # every point at one x: spread them as if the axis spanned a decade (log) or that x (linear)
        span = 1.0 if log else abs(position.max()) or 1.0
    drawn = points.tflops.astype(float)
    for _, same in points.groupby(points.tflops.map(lambda value: f"{value:.3g}"), sort=False):
        series = list(dict.fromkeys(same.series))
        for place, name in enumerate(series if len(series) > 1 else []):
            index = same.index[same.series == name]
            moved = position[index] + (place - (len(series) - 1) / 2) * SPREAD * span
            drawn[index] = 10**moved if log else moved
    return drawn


def draw_points(axes, group: pd.DataFrame) -> None:
    """One model's points on `axes`: a colour per series, a marker per source (`MARKERS`), coinciding series
    spread apart (`spread_x`), readable TFLOPs ticks, and a legend of the series and of the two markers."""
    log = log_scale(group.tflops)
    if log:
        axes.set_xscale("log")
    x = spread_x(group, log)
    colours = dict(zip(dict.fromkeys(group.series), plt.get_cmap("tab10").colors * 3, strict=False))
    for (series, source), point in group.groupby(["series", "source"], sort=False):
        colour = colours[series]
        axes.scatter(x[point.index], point.accuracy, edgecolors=colour, facecolors=colour if source == "ours" else "none",
                     **MARKERS[source])  # fmt: skip
    _tflops_ticks(axes.xaxis, group.tflops, log)
    handles = [Line2D([], [], linestyle="", marker="o", color=colour, label=series) for series, colour in colours.items()]
    handles += [
        Line2D([], [], linestyle="", marker=MARKERS[source]["marker"], markeredgecolor="0.3",
               markerfacecolor="0.3" if source == "ours" else "none", label=SOURCE_NAMES[source])
        for source in dict.fromkeys(group.source)
    ]  # fmt: skip
    axes.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _tflops_ticks(axis, tflops: pd.Series, log: bool) -> None:
    """At most about six ticks, each a plain number ('5', '20', '2.5'): no offset, no powers of ten."""
    if log:
        decades = math.log10(tflops.max() / tflops.min())
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 1.5 else (1.0, 2.0, 5.0) if decades < 3 else (1.0,)
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plot_accuracy_vs_flops(table: str, frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write {table}_{model}_accuracy_vs_tflops.png and its CSV for every model with points (`table`: table1, fastvid_table1)."""
    points, notes = accuracy_points(frame)
    for note in notes:
        print(f"plots: {table}: {note}")
    written = []
    for model, group in points.groupby("model", sort=False) if not points.empty else []:
        figure, axes = plt.subplots(figsize=(8, 4))
        draw_points(axes, group)
        axes.set_xlabel(X_LABELS[x_column(frame)])
        axes.set_ylabel(accuracy_label(group.metrics.iloc[0].split()), fontsize=8)
        axes.set_title(f"{table}: {model}")
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

"""Our results in the paper's table layout, our value beside the paper's and the difference.

    python -m dycoke_eval.report RESULTS_DIR [--tables 1 2]

Reads every cell under RESULTS_DIR/cells and the paper's numbers in dycoke_eval/paper/, and writes
RESULTS_DIR/report/tableN.{md,tex,csv} for every table it has data for, and a PNG per model of
accuracy against TFLOPs with its data (`plots.py`). Rows follow the paper
(model groups, then methods); a model the paper does not have (the tiny offline model) gets
its own group. Columns are the table's metrics, each as ours / paper / difference. Best and
second-best among the pruning methods (every row but full tokens) are marked per model and
metric, bold and underlined as in the paper; a value we do not have is a dash. FLOPs columns
come from the cell's plan (`accounting.plan_row`, recorded in run.json when the cell ran), so ours
are the eq. 8 cost of the cell that was run; our retained ratio is the measured one (mean over
tasks) where the cell recorded it, else the planned one. Cells are read through `store.py`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from dycoke_eval.accounting import PLAN_COLUMNS
from dycoke_eval.plots import plot_accuracy_vs_flops
from dycoke_eval.store import CellStore, method_settings

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # the paper's published numbers, shipped with the package
SETTINGS = ("model", "method", "k", "l", "p", "layer", "ratio", "frames")  # what a paper row names
METHOD_SETTINGS = SETTINGS[1:-1]  # the method and the settings a paper row names, without model and frames
NAMED_SETTINGS = ("layer", "ratio")  # method settings a paper row names besides k, l, p (FastV's)
PLANNED = {"retained_ratio", "tflops", "flops_ratio"}  # from accounting.plan_row, not measured
MVBENCH_CODES = {
    "action_sequence": "AS", "action_prediction": "AP", "action_antonym": "AA", "fine_grained_action": "FA",
    "unexpected_action": "UA", "object_existence": "OE", "object_interaction": "OI", "object_shuffle": "OS",
    "moving_direction": "MD", "action_localization": "AL", "scene_transition": "ST", "action_count": "AC",
    "moving_count": "MC", "moving_attribute": "MA", "state_change": "SC", "fine_grained_pose": "FP",
    "character_order": "CO", "egocentric_navigation": "EN", "episodic_reasoning": "ER", "counterfactual_inference": "CI",
}  # fmt: skip
TASK_METRICS = {  # task (fixture_ prefix and _deferred suffix dropped) -> [(lmms-eval metric, column, scale)]
    "activitynetqa": [("gpt_eval_accuracy", "activitynetqa_acc", 1), ("gpt_eval_score", "activitynetqa_score", 1)],
    "nextqa_mc_test": [("exact_match", "nextqa_mc", 100)],
    "perceptiontest_val_mc": [("accuracy", "perceptiontest_val", 100)],
    "video_dc499": [("gpt_eval_score", "videodc", 1)],
    "videomme": [("videomme_perception_score", "videomme_wo_sub", 1)],
    "videomme_w_subtitle": [("videomme_perception_score", "videomme_w_sub", 1)],
    **{f"mvbench_{name}": [("mvbench_accuracy", code, 1)] for name, code in MVBENCH_CODES.items()},
}
LOWER_IS_BETTER = {"tflops", "flops_ratio", "retained_ratio", "total_latency_s", "gpu_memory_gb", "latency_per_example_s",
                   "decode_ms_per_token", "params", "accuracy_std"}  # fmt: skip
NOT_RANKED = {"retained_ratio", "flops_ratio", "tflops", "params", "accuracy_std", "speedup"}


def cell_rows(results_dir: Path) -> pd.DataFrame:
    """One row per finished cell: its settings, its plan figures and its metrics in the paper's columns."""
    rows = []
    for cell in CellStore(results_dir).cells():
        if not cell.run.complete:
            if cell.run.failed_samples:
                print(f"report: skipped {cell.name}: {cell.run.failed_samples} samples failed (rerun its command to retry them)")
            continue
        plan = cell.plan()
        if plan is None:
            print(f"report: skipped {cell.missing_plan()}")
            continue
        row = {key: plan.get(key) for key in PLAN_COLUMNS}
        row.update({name: cell.run.method.get(name) for name in NAMED_SETTINGS})
        row["settings"] = json.dumps(method_settings(cell.run.method), sort_keys=True)  # every setting: no two collide
        measured = cell.retained_ratio()  # DyCoke's decode-time attendance, PruMerge's adaptive count: beats the plan
        if measured is not None:
            row["retained_ratio"] = measured
        for task, metrics in cell.metrics.items():
            for metric, column, scale in TASK_METRICS.get(task.removeprefix("fixture_").removesuffix("_deferred"), []):
                value = metrics.get(f"{metric},none")
                row[column] = value * scale if isinstance(value, (int, float)) else math.nan
        codes = [code for code in MVBENCH_CODES.values() if code in row]
        if len(codes) == len(MVBENCH_CODES):  # the paper's average is over all 20 subtasks
            row["avg"] = row["accuracy"] = sum(row[code] for code in codes) / len(codes)
        row.update(_efficiency_columns(cell.summaries))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "latency_per_example_s" in frame:  # speed-up against full tokens of the same model and frames, in this run
        frame["speedup"] = 1 / _to_full(frame, "latency_per_example_s")
    return frame


def _to_full(frame: pd.DataFrame, column: str) -> pd.Series:
    """`column` divided by the value of full tokens for the same model and frames (NaN without a full cell)."""
    full = frame[frame.method == "full"].set_index(["model", "frames"])[column]
    baseline = [full.get((m, f), math.nan) for m, f in zip(frame.model, frame.frames, strict=True)]
    return frame[column] / pd.Series(baseline, index=frame.index)


def _efficiency_columns(summaries: dict) -> dict[str, float]:
    """Tables 3 and 4: latency, peak memory (GPU reserved, or RSS on CPU) and decode ms/token of a measured cell."""
    measured = [s for s in summaries.values() if "latency_total_s" in s]
    if not measured:
        return {}
    samples = sum(s["samples"] - s["failed"] for s in measured)
    memory = [s["memory_peak_gb"].get("peak_reserved_gb", s["memory_peak_gb"].get("peak_rss_gb", math.nan)) for s in measured]
    decode = [s["seconds_mean"]["decode_per_token"] for s in measured if "decode_per_token" in s["seconds_mean"]]
    total = sum(s["latency_total_s"] for s in measured)
    return {
        "total_latency_s": total,
        "latency_per_example_s": total / samples if samples else math.nan,
        "gpu_memory_gb": max(memory),
        **({"decode_ms_per_token": 1e3 * sum(decode) / len(decode)} if decode else {}),
    }


def _key(frame: pd.DataFrame) -> pd.Series:
    def one(row) -> tuple:
        return tuple(
            None if pd.isna(row.get(s)) else (round(float(row[s]), 4) if s not in ("model", "method", "frames") else row[s])
            for s in SETTINGS
        )

    return frame.apply(one, axis=1)


def build_table(table: int, ours: pd.DataFrame, paper_dir: Path = PAPER_DIR, with_tflops: bool = False) -> pd.DataFrame | None:
    """The table as numbers: rows in the paper's order, columns (metric, ours|paper|diff); None without data.

    `with_tflops` adds our planned TFLOPs where the paper's layout has none (for plots).
    """
    paper = pd.read_csv(paper_dir / f"table{table}.csv")
    paper = paper.assign(**{name: math.nan for name in SETTINGS if name not in paper})  # tables without FastV rows
    metrics = [c for c in paper.columns if c not in (*SETTINGS, "table", "row")]
    if with_tflops and "tflops" not in metrics:
        metrics.insert(0, "tflops")
    measured = set(metrics) - PLANNED  # plan figures exist for every cell; a table needs one of its measured metrics
    if ours.empty or not measured & set(ours.columns) or ours[list(measured & set(ours.columns))].isna().all().all():
        return None
    paper_models = list(dict.fromkeys(paper.model))
    paper["key"], ours = _key(paper), ours.assign(key=_key(ours))
    extra = ours[~ours.model.isin(paper_models)]  # models the paper does not have, e.g. the tiny offline model
    # Rows for models the paper lacks: the first model's rows, once per method and settings (any frame count).
    template = paper[paper.model == paper_models[0]].drop_duplicates(subset=list(METHOD_SETTINGS))
    rows = []
    for model in paper_models + list(dict.fromkeys(extra.model)):
        group = (
            paper[paper.model == model]
            if model in paper_models
            else template.assign(model=model, **dict.fromkeys(metrics, math.nan))
        )
        for _, paper_row in group.iterrows():
            if model in paper_models:
                match = ours[ours.key.map(lambda key, wanted=paper_row.key: key == wanted)]
            else:  # METHOD_SETTINGS (the key without model and frames) as the paper row names them, any frame count
                match = extra[(extra.model == model) & extra.key.map(lambda key, wanted=paper_row.key: key[1:-1] == wanted[1:-1])]
            for label, our_row in _variants(paper_row["row"], match):
                row = {("", "model"): model, ("", "method"): label}
                for metric in metrics:
                    mine, theirs = our_row.get(metric, math.nan), paper_row.get(metric, math.nan)
                    row[(metric, "ours")], row[(metric, "paper")] = mine, theirs
                    row[(metric, "diff")] = (
                        mine - theirs if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) else math.nan
                    )
                rows.append(row)
    frame = pd.DataFrame(rows)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def _variants(label: str, match: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """One row per distinct method setting (and frame count) among the cells matching a paper row.

    Cells whose settings differ beyond what the paper row names (PruMerge's variant or mode,
    DyCoke's mode or threshold, ...) are never merged: each gets its own row, labelled with the
    settings that tell them apart.
    """
    if match.empty:
        return [(label, pd.Series(dtype=object))]
    groups = list(match.groupby(["settings", "frames"], sort=True))
    if len(groups) == 1:
        return [(label, groups[0][1].iloc[-1])]
    parsed = [({**json.loads(settings), "frames": frames}, cells.iloc[-1]) for (settings, frames), cells in groups]
    differing = sorted({key for settings, _ in parsed for key in settings if any(s.get(key) != settings[key] for s, _ in parsed)})
    return [(f"{label} [{', '.join(f'{key}={settings.get(key)}' for key in differing)}]", row) for settings, row in parsed]


def marks(frame: pd.DataFrame) -> dict[tuple[int, tuple[str, str]], str]:
    """{(row, column): 'best' | 'second'} among pruning methods, per model and metric, for ours and the paper's values."""
    found = {}
    pruning = ~frame[("", "method")].str.startswith("Full")
    for _, group in frame[pruning].groupby(frame[("", "model")]):
        for metric, source in [c for c in frame.columns if c[1] in ("ours", "paper") and c[0] not in NOT_RANKED]:
            values = group[(metric, source)].dropna()
            ranked = values.sort_values(ascending=metric in LOWER_IS_BETTER).drop_duplicates()
            for place, label in zip(ranked.index[:2], ("best", "second"), strict=False):
                for row in values[values == ranked[place]].index:
                    found[(row, (metric, source))] = label
    return found


def _format(metric: str, value: float, signed: bool) -> str:
    sign = "+" if signed else ""
    if metric.endswith("ratio"):
        return f"{value * 100:{sign}.2f}%"
    if metric == "tflops":
        return f"{value:{sign}.4g}"
    return f"{value:{sign}.2f}"


def render(frame: pd.DataFrame, style: str) -> pd.DataFrame:
    """Numbers as text: a dash where missing, best bold and second underlined ('md' or 'tex')."""
    found = marks(frame)
    wrap = {"md": {"best": "**{}**", "second": "<u>{}</u>"}, "tex": {"best": r"\textbf{{{}}}", "second": r"\underline{{{}}}"}}[
        style
    ]
    text = frame.astype(object).copy()
    for column in frame.columns:
        if column[0] == "":
            continue
        for row, value in frame[column].items():
            if not isinstance(value, (int, float)) or math.isnan(value):
                text.loc[row, column] = "-"
                continue
            shown = _format(column[0], value, signed=column[1] == "diff")
            text.loc[row, column] = wrap[found[(row, column)]].format(shown) if (row, column) in found else shown
    return text


def write_table(table: int, frame: pd.DataFrame, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = [" ".join(part for part in column if part) for column in frame.columns]
    markdown = render(frame, "md").set_axis(flat, axis=1).to_markdown(index=False)
    (out_dir / f"table{table}.md").write_text(f"# Table {table}\n\n{markdown}\n")
    (out_dir / f"table{table}.tex").write_text(render(frame, "tex").set_axis(flat, axis=1).to_latex(index=False))
    frame.set_axis(flat, axis=1).to_csv(out_dir / f"table{table}.csv", index=False, na_rep="-")
    return markdown


def efficiency_summary(results_dir: Path) -> pd.DataFrame:
    """Measured cells against full tokens of the same model and frames: speed, memory and KV-cache ratios."""
    rows = []
    for cell in CellStore(results_dir).cells():
        summaries = [s for s in cell.summaries.values() if "latency_total_s" in s]
        if not cell.run.complete or not summaries:
            continue
        shared = _efficiency_columns(cell.summaries)
        samples = sum(s["samples"] - s["failed"] for s in summaries)
        rows.append({
            "model": cell.run.model, "frames": cell.run.config.get("frames"), "method": cell.run.method.get("name"),
            "k": cell.run.method.get("k"), "samples": samples, "device": cell.run.runtime.get("device"),
            "latency_per_example_s": shared["latency_per_example_s"],
            "prefill_s": sum(s.get("prefill_mean_s", math.nan) * (s["samples"] - s["failed"]) for s in summaries) / samples,
            "decode_ms_per_token": shared.get("decode_ms_per_token", math.nan),
            "peak_memory_gb": shared["gpu_memory_gb"],
            "kv_cache_mib": sum(s["kv_cache_bytes_mean"] for s in summaries) / len(summaries) / 2**20,
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["speedup"] = 1 / _to_full(frame, "latency_per_example_s")
    frame["memory_ratio"] = _to_full(frame, "peak_memory_gb")
    frame["kv_cache_ratio"] = _to_full(frame, "kv_cache_mib")
    return frame


def render_report(results_dir: Path, tables: list[int] | None = None, paper_dir: Path = PAPER_DIR) -> dict[int, pd.DataFrame]:
    """Write every table with data under results_dir/report; returns the tables written."""
    efficiency = efficiency_summary(results_dir)
    if not efficiency.empty:
        (results_dir / "report").mkdir(parents=True, exist_ok=True)
        efficiency.to_csv(results_dir / "report" / "efficiency.csv", index=False)
        markdown = efficiency.to_markdown(index=False, floatfmt=".3f")
        (results_dir / "report" / "efficiency.md").write_text(f"# Efficiency against full tokens (same run)\n\n{markdown}\n")
        print(f"\nEfficiency ({results_dir / 'report' / 'efficiency.md'}):\n{markdown}")
    ours = cell_rows(results_dir)
    written = {}
    for table in tables or sorted(int(p.stem.removeprefix("table")) for p in paper_dir.glob("table*.csv")):
        frame = build_table(table, ours, paper_dir)
        if frame is not None:
            markdown = write_table(table, frame, results_dir / "report")
            plot_accuracy_vs_flops(table, build_table(table, ours, paper_dir, with_tflops=True), results_dir / "report")
            print(f"\nTable {table} ({results_dir / 'report' / f'table{table}.md'}):\n{markdown}")
            written[table] = frame
    if not written:
        print(f"report: no finished cell under {results_dir / 'cells'} has a metric of any paper table")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke_eval.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--tables", type=int, nargs="*", help="only these tables (default: every table with data)")
    args = parser.parse_args(argv)
    render_report(args.results_dir, args.tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Our results in the paper's table layout, our value beside the paper's and the difference.

    python -m dycoke_eval.report RESULTS_DIR [--tables 1 2]

Reads every cell under RESULTS_DIR/cells and the paper's numbers in dycoke_eval/paper/, and writes, for every
table it has data for, RESULTS_DIR/report/tableN.{md,tex} (compact: per metric one column, ours with our
difference from the paper's, "75.00 (-3.20)"), tableN_wide.md (ours / paper / difference per metric) and
tableN.csv (every column), and a PNG per model of accuracy against TFLOPs with its data (`plots.py`). Rows
follow the paper (model groups, then methods); a model the paper does not have (the tiny offline model) gets
its own group, and a row the paper labels "Ours" is labelled with the method's name. Best and second-best
among the pruning methods (every row but full tokens) are marked per model and metric, bold and underlined as
in the paper; a value we do not have is a dash. FLOPs columns come from the cell's plan
(`plans.plan_row`, recorded in run.json when the cell ran), so ours are the eq. 8 cost of the cell that
was run; our retained ratio is the measured one (mean over tasks) where the cell recorded it, else the planned
one. Cells are read through `store.py`.

Rows are told apart: the paper's label, with the row's settings where the paper uses one label
twice (Table 5's "DyCoke (K=0.7, L=3, P=0.7)"); a frames column where the rows differ in frames;
a samples column where the rows' cells evaluated different samples. Where several complete cells
match a row (a `limit=1` run beside a full one, Table 3's measured cells beside Table 2's), the one
with the table's evaluation (`_pick`: the same tasks, per-task sample counts and run settings as
the table's other rows), else the row's largest, is shown, and every cell skipped is printed with
the reason. The .tex is escaped by pandas' LaTeX writer: text between a pair of `$` is math,
everything else is escaped; it fits the line width (`to_latex`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dycoke_eval.breakdowns import VIDEOMME_DURATIONS, videomme_durations
from dycoke_eval.config import CONF_DIR
from dycoke_eval.paired import (
    AVERAGE,
    BENCHMARKS,
    PAIRED,
    PairedDifference,
    benchmark,
    column_scores,
    estimate,
    paired_difference,
)
from dycoke_eval.plans import PLAN_COLUMNS
from dycoke_eval.plots import plot_accuracy_vs_flops
from dycoke_eval.store import Cell, CellStore, method_settings

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # the paper's published numbers, shipped with the package
NAMED_SETTINGS = (  # method settings a paper row names besides k, l, p (which the plan records)
    "layer", "ratio",  # FastV
    "form", "retention", "cluster_ratio", "in_llm",  # VisionZip, FastVID; PruneVid
    "segmentation", "d", "merging",  # FastVID's ablations
    "frame_tokens", "tau", "retention_ratio", "cost",  # VisionZip's S, HoliTom's tau; FlashVID's R; FrameFusion's budget
)  # fmt: skip
SETTINGS = ("model", "method", "k", "l", "p", *NAMED_SETTINGS, "frames")  # what a paper row can name; a table: its CSV's
# a paper row's own text: the table, its label, its retention block, where it is from, and whether the harness runs it
# (`runs: False`: a method not here, or one whose settings the paper does not state; the row shows the paper's alone)
LABELS = ("table", "row", "R", "source", "runs")
RELATIVE = "avg_percent"  # a table with FastVID's "% of vanilla" column compares every row with vanilla, sample by sample
PLANNED = {"retained_ratio", "tflops", "flops_ratio", "prefill_tflops_real"}  # every cell has them: no table alone
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
    "videomme": [("videomme_perception_score", "videomme_wo_sub", 1), ("videomme_perception_score", "videomme_avg", 1)],
    "videomme_w_subtitle": [("videomme_perception_score", "videomme_w_sub", 1)],
    "longvideobench_val_v": [("lvb_acc", "longvideobench", 100)],
    "egoschema_subset": [("score", "egoschema_subset", 100)],  # lmms-eval's aggregation gives a fraction
    **{f"mvbench_{name}": [("mvbench_accuracy", code, 1)] for name, code in MVBENCH_CODES.items()},
}
LOWER_IS_BETTER = {"tflops", "prefill_tflops_real", "flops_ratio", "retained_ratio", "total_latency_s", "gpu_memory_gb",
                   "latency_per_example_s", "decode_ms_per_token", "params", "accuracy_std"}  # fmt: skip
NOT_RANKED = {"retained_ratio", "flops_ratio", "tflops", "prefill_tflops_real", "params", "accuracy_std", "speedup"}
RUN_SETTINGS = ("prompt", "seed", "max_new_tokens")  # run settings besides the method's that change a cell's numbers
DEFAULT_RUN = {key: yaml.safe_load((CONF_DIR / "config.yaml").read_text())[key] for key in RUN_SETTINGS}  # preferred on ties
FULL_KEY = ["model", "frames", "evaluation", "run"]  # speed-up: against full tokens with the same of these


def cell_rows(cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell (from a `CellStore`): its settings, its plan figures and its metrics in the paper's columns.

    Besides the paper's columns a row says what it was computed from: `cell` (the folder's name),
    `limit`, `run` (the run settings besides the method's that change results: prompt, seed,
    max_new_tokens), `counts` ({task: samples scored, None where the cell recorded no count}) and
    `sources` ({column: the tasks it is computed from}); `build_table` uses them to pick cells.
    """
    rows = []
    for cell in cells:
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
        row["run"] = _json({key: cell.run.config.get(key) for key in RUN_SETTINGS})
        row["cell"], row["limit"] = cell.name, cell.run.config.get("limit")
        row["stand_in_judge"] = stand_in_judge(cell.results)
        measured = cell.retained_ratio()  # DyCoke's decode-time attendance, PruMerge's adaptive count: beats the plan
        if measured is not None:
            row["retained_ratio"] = measured
        # prefill TFLOPs, real count: measured from every sample's per-layer tokens and prompt, else the plan's
        row["prefill_tflops_real"] = cell.prefill_tflops_real() or plan.get("prefill_tflops_real")
        sources: dict[str, list[str]] = {}
        for task, metrics in cell.metrics.items():
            for metric, column, scale in TASK_METRICS.get(_task_name(task), []):
                value = metrics.get(f"{metric},none")
                row[column] = value * scale if isinstance(value, (int, float)) else math.nan
                sources[column] = [task]
        codes = [code for code in MVBENCH_CODES.values() if code in row]
        if len(codes) == len(MVBENCH_CODES):  # the paper's average is over all 20 subtasks
            row["avg"] = row["accuracy"] = sum(row[code] for code in codes) / len(codes)
            sources["avg"] = sources["accuracy"] = [task for code in codes for task in sources[code]]
        row.update(_sample_columns(cell, sources))
        if all(_number_or_none(row.get(column)) is not None for column in BENCHMARKS):  # FastVID's Avg.: their mean
            row[AVERAGE] = sum(row[column] for column in BENCHMARKS) / len(BENCHMARKS)
            sources[AVERAGE] = [task for column in BENCHMARKS for task in sources[column]]
        efficiency = _efficiency_columns(cell.summaries)
        row.update(efficiency)
        measured_tasks = sorted(task for task, summary in cell.summaries.items() if "latency_total_s" in summary)
        sources.update(dict.fromkeys([*efficiency, "speedup"], measured_tasks) if efficiency else {})
        row["sources"] = sources
        row["counts"] = {task: _scored(cell.summaries.get(task)) for tasks in sources.values() for task in tasks}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "latency_per_example_s" in frame:  # speed-up against full tokens of the same model, frames and evaluation
        frame["speedup"] = 1 / _to_full(frame.assign(evaluation=frame.counts.map(_json)), "latency_per_example_s", FULL_KEY)
    return frame


JUDGED = {"activitynetqa_acc", "activitynetqa_score", "videodc"}  # columns a GPT judge scores


def stand_in_judge(results: dict[str, Any]) -> str | None:
    """The endpoint(s) of a cell's verdicts that are not OpenAI's API (a local or other stand-in), else None."""
    from dycoke_eval.judge.client import is_openai_api

    judges = results.get("dycoke_eval_judge", {}).get("judges", [])
    others = sorted({judge["endpoint"] for judge in judges if not is_openai_api(judge.get("endpoint", ""))})
    return ", ".join(others) or None


def _sample_columns(cell: Cell, sources: dict[str, list[str]]) -> dict[str, Any]:
    """The columns computed from a cell's logged samples, and `scores`: every column's per-sample strata
    (`paired.column_scores`), for the paired comparison with vanilla. MVBench: every subtask's answered samples
    pooled (lmms-eval weights a group's subtasks by size, and its MVBench accuracy leaves empty answers out);
    VideoMME by duration (`breakdowns.videomme_durations`). Adds each column's tasks to `sources`."""
    tasks = {_task_name(task): task for task in cell.sample_tasks() if benchmark(_task_name(task))}
    samples = {name: cell.samples(task) for name, task in tasks.items()}
    columns: dict[str, Any] = {"scores": column_scores(samples)}
    for column in ("mvbench", "mlvu"):  # pooled over their questions (`paired.SAMPLE_METRICS`)
        if column in columns["scores"]:
            columns[column] = estimate(columns["scores"][column])
            sources[column] = [task for name, task in tasks.items() if benchmark(name) == column]
    if "videomme" in samples:
        by_duration = videomme_durations(samples["videomme"])
        for duration in VIDEOMME_DURATIONS:
            value = by_duration[duration]
            if value is not None:
                columns[f"videomme_{duration}"] = value
                sources[f"videomme_{duration}"] = [tasks["videomme"]]
    return columns


def _task_name(task: str) -> str:
    """lmms-eval's task name as TASK_METRICS knows it: the fixture_ prefix and the _deferred suffix dropped."""
    return task.removeprefix("fixture_").removesuffix("_deferred")


def _scored(summary: dict | None) -> int | None:
    """Samples of one task that have a result (samples less failed); None where the cell recorded no count."""
    if not summary or "samples" not in summary:
        return None
    return summary["samples"] - summary.get("failed", 0)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _to_full(frame: pd.DataFrame, column: str, keys: list[str]) -> pd.Series:
    """`column` divided by the value of full tokens with the same `keys` (NaN without such a full-tokens cell)."""
    full = frame[frame.method == "full"].drop_duplicates(keys).set_index(keys)[column]
    baseline = [full.get(tuple(values), math.nan) for values in frame[keys].itertuples(index=False)]
    return frame[column] / pd.Series(baseline, index=frame.index, dtype=float)


def _efficiency_columns(summaries: dict) -> dict[str, float]:
    """Tables 3 and 4: latency end to end and in the model alone (a cell measured before samples recorded it has
    none), peak memory (GPU reserved, or RSS on CPU) and decode ms/token of a measured cell."""
    measured = [s for s in summaries.values() if "latency_total_s" in s]
    if not measured:
        return {}
    samples = sum(s["samples"] - s["failed"] for s in measured)
    memory = [s["memory_peak_gb"].get("peak_reserved_gb", s["memory_peak_gb"].get("peak_rss_gb", math.nan)) for s in measured]
    decode = [s["seconds_mean"]["decode_per_token"] for s in measured if "decode_per_token" in s["seconds_mean"]]
    model = [
        (s["seconds_mean"]["model_latency"], s["samples"] - s["failed"]) for s in measured if "model_latency" in s["seconds_mean"]
    ]
    total = sum(s["latency_total_s"] for s in measured)
    return {
        "total_latency_s": total,
        "latency_per_example_s": total / samples if samples else math.nan,
        **({"model_latency_per_example_s": sum(mean * n for mean, n in model) / sum(n for _, n in model)} if model else {}),
        "gpu_memory_gb": max(memory),
        **({"decode_ms_per_token": 1e3 * sum(decode) / len(decode)} if decode else {}),
    }


def _key(frame: pd.DataFrame, settings: list[str]) -> pd.Series:
    """Each row's `settings` (model first, frames last), comparable between the paper's CSV and our cells."""

    def value(row, name):
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, (str, bool, np.bool_)) or name in ("model", "method", "frames"):
            return bool(value) if isinstance(value, np.bool_) else value
        return round(float(value), 4)

    return frame.apply(lambda row: tuple(value(row, name) for name in settings), axis=1)


def _stem(table: int | str) -> str:
    """The paper CSV's name: DyCoke's tables by number (1 -> table1), any other by its name (fastvid_table1)."""
    return f"table{table}" if isinstance(table, int) else table


def _title(table: int | str) -> str:
    return f"table {table}" if isinstance(table, int) else table


def build_table(table: int | str, ours: pd.DataFrame, paper_dir: Path = PAPER_DIR, for_plot: bool = False) -> pd.DataFrame | None:
    """The table as numbers: rows in the paper's order, columns (metric, ours|paper|diff); None without data.

    `table`: DyCoke's by number, FastVID's by name (`fastvid_table1`, the CSV's name). The first columns
    name the row: model, method (the paper's label, its "Ours" replaced by the method's name (`_our_label`);
    settings appended where the paper's label alone is shared by rows of one model and frame count), R
    (FastVID's retention block, where the paper has one), frames (only where the table's rows differ in
    frames) and samples (only where the rows' cells evaluated different samples). A row matches the cells
    whose settings are the ones the table's CSV names. Where several cells match a row, `_pick` chooses
    one; `frame.attrs["notes"]` says which cells were skipped and why. `for_plot` adds our planned TFLOPs
    where the paper's layout has none, and a series column: each row's name in legends (`series_name`).

    A table with FastVID's "% of vanilla" column (`RELATIVE`) divides each row's Avg. by that of the
    vanilla row of its model and frames, and adds (metric, "vs vanilla") to every column with per-sample
    scores: the row's difference from vanilla over the samples both cells scored, with its 95% interval
    (`paired.paired_difference`).
    """
    paper = pd.read_csv(paper_dir / f"{_stem(table)}.csv")
    settings = [name for name in SETTINGS if name in paper.columns]  # what this table's rows name
    paper = paper.assign(**{name: math.nan for name in SETTINGS if name not in paper})
    metrics = [c for c in paper.columns if c not in (*SETTINGS, *LABELS)]
    if for_plot and "tflops" not in metrics:
        metrics.insert(0, "tflops")
    measured = set(metrics) - PLANNED  # plan figures exist for every cell; a table needs one of its measured metrics
    if ours.empty or not measured & set(ours.columns) or ours[list(measured & set(ours.columns))].isna().all().all():
        return None
    paper["row"] = _distinct_labels(paper.assign(row=paper.apply(lambda row: _our_label(row["row"], row["method"]), axis=1)))
    paper_models = list(dict.fromkeys(paper.model))
    paper["key"], ours = _key(paper, settings), ours.assign(key=_key(ours, settings))
    extra = ours[~ours.model.isin(paper_models)]  # models the paper does not have, e.g. the tiny offline model
    # Rows for models the paper lacks: the first model's rows, once per method and settings (any frame count).
    template = paper[paper.model == paper_models[0]].drop_duplicates(subset=settings[1:-1])
    slots = []  # (model, paper row, what tells its cells from the paper's settings, the cells that could fill it)
    for model in paper_models + list(dict.fromkeys(extra.model)):
        group = (
            paper[paper.model == model]
            if model in paper_models
            else template.assign(model=model, frames=math.nan, **dict.fromkeys(metrics, math.nan))
        )
        for _, paper_row in group.iterrows():
            if str(paper_row.get("runs")) == "False":  # the paper's number alone: no cell is it
                match = ours.iloc[:0]
            elif model in paper_models:
                match = ours[ours.key.map(lambda key, wanted=paper_row.key: key == wanted)]
            else:  # the method's settings (the key without model and frames) as the paper row names them, any frame count
                match = extra[(extra.model == model) & extra.key.map(lambda key, wanted=paper_row.key: key[1:-1] == wanted[1:-1])]
            slots += [(model, paper_row, variant, cells) for variant, cells in _variants(match)]
    picked, notes = _pick(table, slots, metrics)
    runs = {evaluation.run for _, evaluation in picked if evaluation is not None}
    relative = RELATIVE in metrics
    vanilla = {}  # (model, frames) -> the cell shown in the vanilla row
    for (model, paper_row, _, _), (our_row, _) in zip(slots, picked, strict=True):
        if paper_row["method"] == "full" and not our_row.empty:
            vanilla.setdefault((model, our_row["frames"]), our_row)
    rows, stand_ins = [], set()
    for (model, paper_row, variant, _), (our_row, evaluation) in zip(slots, picked, strict=True):
        if isinstance(our_row.get("stand_in_judge"), str) and any(
            pd.notna(our_row.get(c, math.nan)) for c in JUDGED & set(metrics)
        ):
            stand_ins.add(our_row["stand_in_judge"])
        frames = our_row.get("frames", paper_row["frames"])
        base = vanilla.get((model, frames)) if relative and not our_row.empty else None
        if base is not None:
            our_row = _against_vanilla(our_row, base)
        if len(runs) > 1 and evaluation is not None:  # rows run differently (max_new_tokens, prompt, seed): say how
            differing = [(key, value) for key, value in evaluation.run if any(dict(run).get(key) != value for run in runs)]
            variant = f"{variant} [{', '.join(f'{key}={value}' for key, value in differing)}]"
        row = {
            ("", "model"): model,
            ("", "method"): paper_row["row"] + variant,
            **({("", "series"): series_name(paper_row["method"], paper_row) + variant} if for_plot else {}),
            **({("", "R"): f"{paper_row['R']:.0%}"} if "R" in paper_row else {}),
            ("", "frames"): "-" if pd.isna(frames) else str(int(frames)),
            ("", "samples"): "-" if evaluation is None else _samples_text(evaluation.counts),
        }
        for metric in metrics:
            mine, theirs = our_row.get(metric, math.nan), paper_row.get(metric, math.nan)
            row[(metric, "ours")], row[(metric, "paper")] = mine, theirs
            row[(metric, "diff")] = (
                mine - theirs if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) else math.nan
            )
            if relative and metric in PAIRED:
                row[(metric, "vs vanilla")] = our_row.get(f"{metric} vs vanilla", math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    if frame[("", "frames")].replace("-", None).nunique() < 2:  # one frame count: the paper's caption says which
        frame = frame.drop(columns=[("", "frames")])
    if len({evaluation.counts for _, evaluation in picked if evaluation is not None}) < 2:  # the same samples in every row
        frame = frame.drop(columns=[("", "samples")])
    frame.attrs["notes"] = notes
    frame.attrs["stand_in_judges"] = sorted(stand_ins)
    return frame


def _against_vanilla(row: pd.Series, vanilla: pd.Series) -> pd.Series:
    """The row with its % of vanilla and, per column with per-sample scores, its paired difference from vanilla."""
    row = row.copy()
    if _number_or_none(row.get(AVERAGE)) is not None and _number_or_none(vanilla.get(AVERAGE)):
        row[RELATIVE] = 100 * row[AVERAGE] / vanilla[AVERAGE]
    if row["cell"] == vanilla["cell"]:
        return row
    ours, theirs = (r.get("scores") if isinstance(r.get("scores"), dict) else {} for r in (row, vanilla))
    for column in PAIRED:
        if column in ours and column in theirs:
            row[f"{column} vs vanilla"] = paired_difference(ours[column], theirs[column]) or math.nan
    return row


def _number_or_none(value) -> float | None:
    """A number that is there (not None, not NaN), else None."""
    return value if isinstance(value, (int, float)) and not math.isnan(value) else None


LABEL_SETTINGS = {"k": "K", "l": "L", "p": "P", "layer": "layer", "ratio": "ratio"}  # how a label names a setting
METHOD_NAMES = {  # a method's name in labels and legends, by its config's name (conf/method/)
    "full": "Full tokens", "dycoke": "DyCoke", "dycoke_ttm": "DyCoke (TTM only)", "dycoke_no_dp": "DyCoke w/o DP",
    "dycoke_random": "DyCoke, random pruning", "fastv": "FastV", "prumerge": "PruMerge",
    "prumerge_official": "PruMerge (released arithmetic)", "visionzip": "VisionZip",
    "prunevid": "PruneVid", "fastvid": "FastVID", "random": "Random tokens", "pooling": "Pooling",
}  # fmt: skip
BUDGETS = {"k", "ratio", "retention", "cluster_ratio"}  # how many tokens a method keeps: its points along a plot's x
SERIES_SETTINGS = [name for name in ("l", "p", *NAMED_SETTINGS) if name not in BUDGETS]  # what else tells series apart


def _our_label(label: str, method: str) -> str:
    """The paper's label with its self-reference replaced by the method's name, since in our report "Ours" would
    read as our runs: 'Ours ($K=0.7$)' -> 'DyCoke ($K=0.7$)', 'Our DySeg' -> 'FastVID (DySeg)', 'FastVID (Ours)' ->
    'FastVID'."""
    name = METHOD_NAMES.get(method, method)
    label = re.sub(r"\s*\(ours\)", "", label, flags=re.IGNORECASE)
    label = re.sub(r"^ours\b", lambda _: name, label, flags=re.IGNORECASE)
    return re.sub(r"^our (.+)$", lambda found: f"{name} ({found[1]})", label, flags=re.IGNORECASE)


def series_name(method: str, settings: Mapping[str, Any]) -> str:
    """A method at one configuration in the same words in every table's legend, where the paper's labels vary
    ('Full Tokens', 'Vanilla', 'Ours ($K = 0.7$)'): the method's name, then its settings other than its budget
    (`BUDGETS`, which the plot's x shows) that differ from its config's defaults, as in 'FastV (layer=2)'."""
    defaults = _method_defaults(method)
    named = [
        f"{LABEL_SETTINGS.get(name, name)}={_setting_text(settings[name])}"
        for name in SERIES_SETTINGS
        if not pd.isna(settings.get(name)) and _setting(settings[name]) != _setting(defaults.get(name))
    ]
    return f"{METHOD_NAMES.get(method, method)} ({', '.join(named)})" if named else METHOD_NAMES.get(method, method)


@functools.cache
def _method_defaults(method: str) -> dict[str, Any]:
    """The settings of conf/method/<method>.yaml, with those of the configs it extends (its `defaults`)."""
    path = CONF_DIR / "method" / f"{method}.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else {}
    inherited = [_method_defaults(parent) for parent in config.pop("defaults", []) if parent != "_self_"]
    return {name: value for settings in [*inherited, config] for name, value in settings.items()}


def _setting(value) -> Any:
    """A setting as the paper's CSV and a config both give it: 3.0 and 3 alike, 'False' and false alike."""
    if isinstance(value, (bool, np.bool_)) or value in ("True", "False"):
        return str(value) == "True"
    return round(float(value), 4) if isinstance(value, (int, float)) else value


def _setting_text(value) -> str:
    value = _setting(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _distinct_labels(paper: pd.DataFrame) -> pd.Series:
    """The paper's row labels, with the row's settings appended where one model and frame count has the label twice.

    Table 5's ablation rows are all "DyCoke" in the paper's text, told apart by its K, L and P
    columns: here "DyCoke (K=0.7, L=3, P=0.7)". Where the methods differ too, the method is named first.
    """
    labels = paper["row"].copy()
    blocks = ["model", "frames", *(["R"] if "R" in paper else []), "row"]  # FastVID's rows: one label per retention block
    for _, group in paper.groupby(blocks, sort=False, dropna=False):
        if len(group) < 2:
            continue
        for index, row in group.iterrows():
            named = [f"{short}={row[name]:g}" for name, short in LABEL_SETTINGS.items() if not pd.isna(row[name])]
            labels[index] = f"{row['row']} ({', '.join(([row.method] if group.method.nunique() > 1 else []) + named)})"
    return labels


def _variants(match: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The cells matching a paper row, in groups that each get a row: one group per method setting and frame count.

    Cells whose settings differ beyond what the paper row names (PruMerge's variant or mode,
    DyCoke's mode or threshold, ...) are never merged: each group gets its own row, its label followed
    by the settings that tell them apart (' [variant=plus]'; frames are the frames column's), the text
    returned with the group. Within a group the cells differ only in what they evaluated (tasks, limit,
    prompt, seed, max_new_tokens, measured or not); `_pick` chooses among them.
    """
    if match.empty:
        return [("", match)]
    parsed = [(json.loads(settings), cells) for (settings, _), cells in match.groupby(["settings", "frames"], sort=True)]
    differing = sorted({key for settings, _ in parsed for key in settings if any(s.get(key) != settings[key] for s, _ in parsed)})
    if not differing:
        return [("", cells) for _, cells in parsed]
    return [(f" [{', '.join(f'{key}={settings.get(key)}' for key in differing)}]", cells) for settings, cells in parsed]


@dataclass(frozen=True)
class Evaluation:
    """What a cell evaluated, as far as one table is concerned."""

    run: tuple[tuple[str, Any], ...]  # RUN_SETTINGS as the cell ran them
    counts: tuple[tuple[str, int | str], ...]  # (task, samples scored) over the tasks the table's columns come from
    columns: tuple[str, ...]  # the table's measured columns the cell has (a column not judged yet counts)

    def rank(self) -> tuple:
        """Larger is preferred: more of the table's columns, then more samples and tasks, then the default run settings."""
        total = sum(_number(count) for _, count in self.counts)
        defaults = sum(DEFAULT_RUN.get(key) == value for key, value in self.run)
        return len(self.columns), total, len(self.counts), defaults

    def differences(self, other: Evaluation) -> tuple[str, str]:
        """How this evaluation and `other` differ, as two texts: this one's side and the other's."""
        mine, theirs = [], []
        if self.counts != other.counts:
            mine.append(_describe(self.counts))
            theirs.append(_describe(other.counts))
        run, other_run = dict(self.run), dict(other.run)
        if run != other_run:
            keys = [key for key in run if run[key] != other_run.get(key)]
            mine.append(", ".join(f"{key}={run[key]}" for key in keys))
            theirs.append(", ".join(f"{key}={other_run.get(key)}" for key in keys))
        if self.columns != other.columns:
            for side, columns, rest in ((mine, self.columns, other.columns), (theirs, other.columns, self.columns)):
                missing = [column for column in rest if column not in columns]
                without = f" (not {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})" if missing else ""
                side.append(f"{len(columns)} of the table's measured columns{without}")
        return "; ".join(mine), "; ".join(theirs)


def _number(count: int | str) -> float:
    """Samples a count stands for: a recorded count, a limit (at most that many), 'all' (as many as there are)."""
    return count if isinstance(count, int) else math.inf if count == "all" else float(count.removeprefix("limit="))


def _pick(table: int | str, slots: list, metrics: list[str]) -> tuple[list[tuple[pd.Series, Evaluation | None]], list[str]]:
    """One cell per row, chosen so that the table's rows share one evaluation where they can; and what was skipped.

    A cell's `Evaluation` for the table: its run settings (prompt, seed, max_new_tokens), the
    samples it scored in each task the table's columns come from (from its summaries; where it
    recorded none, its limit), and which of the table's measured columns it has. The table's
    evaluation is the one with the most of the table's columns (Table 3 wants the measured cells,
    not Table 2's cells of the same settings), then the one the most rows have a cell for, then the
    largest, then the one with the default run settings. Each row takes its cell with the table's
    evaluation, else its best by `Evaluation.rank`; among cells that evaluated the same, the one
    without a limit, then by name. Every cell not taken is named in a note with the reason, and so
    is every row whose evaluation is not the table's. A cell that has none of the table's tasks
    is no candidate where the row has one that has.
    """
    options = []
    for *_, cells in slots:
        choices = [(_evaluation(row, metrics), row) for _, row in cells.iterrows()]
        options.append([c for c in choices if c[0].counts] or choices)
    tally = Counter(evaluation for choices in options for evaluation in {e for e, _ in choices} if evaluation.counts)
    target = max(tally, key=lambda e: (len(e.columns), tally[e], *e.rank()[1:]), default=None)
    picked, notes = [], []
    for (model, paper_row, variant, _), choices in zip(slots, options, strict=True):
        if not choices:
            picked.append((pd.Series(dtype=object), None))
            continue
        label = paper_row["row"] + variant
        best = [c for c in choices if c[0] == target] or choices
        top = max(evaluation.rank() for evaluation, _ in best)
        tied = [c for c in best if c[0].rank() == top]
        evaluation, chosen = min(tied, key=lambda c: (not pd.isna(c[1]["limit"]), _json(dict(c[0].run)), c[1]["cell"]))
        picked.append((chosen, evaluation))
        where = f"report: {_title(table)}: {model} {label!r}"
        for other_evaluation, other in choices:
            if other["cell"] == chosen["cell"]:
                continue
            if other_evaluation == evaluation:
                why = f"it evaluated the same as cell {chosen['cell']}, which is shown ({_describe(evaluation.counts)})"
            else:
                mine, theirs = other_evaluation.differences(evaluation)
                whose = "the table's rows have" if evaluation == target else f"cell {chosen['cell']}, which is shown, has"
                why = f"it has {mine}; {whose} {theirs}"
            notes.append(f"{where}: skipped cell {other['cell']}: {why}")
        if target is not None and evaluation != target:
            mine, theirs = evaluation.differences(target)
            notes.append(f"{where} comes from cell {chosen['cell']}, which has {mine}; the table's rows have {theirs}")
    return picked, notes


def _evaluation(row: pd.Series, metrics: list[str]) -> Evaluation:
    """The cell's `Evaluation` for a table with these metrics; 'limit=N' or 'all' for a task without a recorded count."""
    sources, counts = row.get("sources"), row.get("counts")
    sources, counts = (sources, counts) if isinstance(sources, dict) else ({}, {})
    tasks = sorted({task for metric in metrics for task in sources.get(metric, ())})
    limit = "all" if pd.isna(row.get("limit")) else f"limit={row['limit']:g}"
    return Evaluation(
        run=tuple(sorted(json.loads(row.get("run") or "{}").items())),
        counts=tuple((task, counts[task] if counts.get(task) is not None else limit) for task in tasks),
        columns=tuple(metric for metric in metrics if metric in sources),
    )


def _describe(counts: tuple) -> str:
    """'3 samples in each of 2 tasks (nextqa_mc_test, videomme)', or per task where they differ."""
    if not counts:
        return "none of the table's tasks"
    tasks = [task for task, _ in counts]
    shown = ", ".join(tasks[:4]) + (f" and {len(tasks) - 4} more" if len(tasks) > 4 else "")
    different = {count for _, count in counts}
    if len(different) > 1:
        return "; ".join(f"{task}: {_count_text(count)}" for task, count in counts)
    where = f"each of {len(tasks)} tasks" if len(tasks) > 1 else "1 task"
    return f"{_count_text(different.pop())} in {where} ({shown})"


def _count_text(count: int | str) -> str:
    if isinstance(count, int):
        return f"{count} sample{'s' if count != 1 else ''}"
    return "every sample (count not recorded)" if count == "all" else f"{count} (count not recorded)"


def _samples_text(counts: tuple) -> str:
    """The samples column: '3 x 2 tasks' (samples per task), where counts differ their total; the limit where not recorded."""
    if not counts:
        return "none"
    values = [count for _, count in counts]
    tasks = f"{len(values)} task{'s' if len(values) != 1 else ''}"
    if len(set(values)) == 1:
        return f"{values[0]} x {tasks}"
    if all(isinstance(count, int) for count in values):
        return f"{sum(values)} in {tasks}"
    return f"{', '.join(dict.fromkeys(str(count) for count in values))} in {tasks}"


def marks(frame: pd.DataFrame) -> dict[tuple[int, tuple[str, str]], str]:
    """{(row, column): 'best' | 'second'} among pruning methods, per model (and frame count) and metric, ours and the paper's."""
    found = {}
    pruning = ~frame[("", "method")].str.startswith(("Full", "Vanilla"))
    blocks = [column for column in (("", "model"), ("", "frames"), ("", "R")) if column in frame.columns]
    for _, group in frame[pruning].groupby([frame[column] for column in blocks]):
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
    if metric == "tflops" and not signed:  # 1.27 to 262.5: four digits; a difference to two decimals, as other metrics
        return f"{value:.4g}"
    return f"{value:{sign}.2f}"


MARKS = {"md": {"best": "**{}**", "second": "<u>{}</u>"}, "tex": {"best": r"\textbf{{{}}}", "second": r"\underline{{{}}}"}}


def render(frame: pd.DataFrame, style: str) -> pd.DataFrame:
    """Every column as text (the wide layout): a dash where missing, best bold and second underlined, in markdown
    ('md') or LaTeX ('tex', where a number's % is escaped too)."""
    found = marks(frame)
    text = frame.astype(object).copy()
    for column in frame.columns:
        if column[0] != "":
            text[column] = [_cell_text(column, value, found.get((row, column)), style) for row, value in frame[column].items()]
    return text


def _cell_text(column: tuple[str, str], value, mark: str | None, style: str) -> str:
    if isinstance(value, PairedDifference):
        return str(value)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    shown = _format(column[0], value, signed=column[1] == "diff")
    shown = shown.replace("%", r"\%") if style == "tex" else shown
    return MARKS[style][mark].format(shown) if mark else shown


def compact(frame: pd.DataFrame, style: str) -> pd.DataFrame:
    """The default layout, narrow enough for a page: one column per metric, ours and our difference from the
    paper's in one cell, '75.00 (-3.20)' (ours alone where the paper has no value, a dash where we have none),
    ours marked as `render` marks it; of the paired differences from vanilla, the Avg.'s. The wide layout
    (`render`) has the paper's values and every paired difference."""
    text = render(frame, style)
    columns = {}
    for metric, part in frame.columns:
        if metric == "" or (metric, part) == (AVERAGE, "vs vanilla"):
            columns[(metric, part)] = text[(metric, part)]
        elif part == "ours":
            pairs = zip(text[(metric, "ours")], text[(metric, "diff")], strict=True)
            columns[(metric, "")] = [ours if "-" in (ours, diff) else f"{ours} ({diff})" for ours, diff in pairs]
    return pd.DataFrame(columns, index=frame.index)


LATEX_HEADER = "% Needs \\usepackage{graphicx} (\\resizebox) and \\usepackage{booktabs} (the rules).\n"


def to_latex(frame: pd.DataFrame) -> str:
    """The compact table as a booktabs tabular, shrunk to the line width where it is wider (graphicx's `\\resizebox`,
    which leaves a narrower table as it is), every text cell and header escaped by pandas' LaTeX writer (Styler).

    Escaping is pandas' "latex-math": text between a pair of `$` is kept as math (the paper's labels,
    "DyCoke ($K=0.7$)", render as in the paper), and everything else, a lone `$` included, is escaped
    (`%`, `_`, `&`, `#`, `{`, ...). The numbers are ours (`render`'s 'tex' style): best and second best are
    `\\textbf` and `\\underline` around our value, not our difference from the paper's.
    """
    text = compact(frame, "tex")
    flat = _flat(text.columns)
    labels = [name for name, column in zip(flat, text.columns, strict=True) if column[0] == ""]
    styler = text.set_axis(flat, axis=1).style.hide(axis="index")
    styler = styler.format(escape="latex-math", subset=labels).format_index(escape="latex-math", axis=1)
    tabular = styler.to_latex(hrules=True, column_format="l" * len(labels) + "r" * (len(flat) - len(labels)))
    return f"{LATEX_HEADER}\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n{tabular}}}\n"


def _flat(columns: pd.MultiIndex) -> list[str]:
    return [" ".join(part for part in column if part) for column in columns]


def _markdown(text: pd.DataFrame) -> str:
    """A text table as markdown: its cells as they are (no number parsing), labels left and values right."""
    align = ["left" if column[0] == "" else "right" for column in text.columns]
    return text.set_axis(_flat(text.columns), axis=1).to_markdown(index=False, disable_numparse=True, colalign=align)


COMPACT_NOTE = (
    "Each cell: ours (ours minus the paper's), a dash where we have no value; bold and underlined: our best and second "
    "best among the pruning methods. The paper's values beside ours: {name}_wide.md; every figure: {name}.csv."
)
STAND_IN_NOTE = (
    "Judged columns (ActivityNet-QA, VideoDC) of our rows come from a stand-in judge at {endpoints}, not OpenAI's API: "
    "they exercise the path and are not comparable with the paper's GPT-4o-mini scores."
)
SPEEDUP_NOTE = (
    "speedup: end to end, video decode and preprocessing included (Table 3 sets it beside the paper's); "
    "model_speedup: the model alone (vision encoder, compression and generate)."
)
PAIRED_NOTE = (
    "vs vanilla: our value minus vanilla's (same model and frames) over the samples both cells scored, in points, "
    "with its 95% interval; * where the interval excludes 0."
)


def write_table(table: int | str, frame: pd.DataFrame, out_dir: Path) -> str:
    """{name}.md and .tex (the compact layout), {name}_wide.md (ours, the paper's and the difference) and {name}.csv
    (every column); returns the compact markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _stem(table)
    title = f"Table {table}" if isinstance(table, int) else name
    paired = f"\n{PAIRED_NOTE}\n" if any(column[1] == "vs vanilla" for column in frame.columns) else ""
    if judges := frame.attrs.get("stand_in_judges"):
        paired += f"\n{STAND_IN_NOTE.format(endpoints=', '.join(judges))}\n"
    markdown = _markdown(compact(frame, "md"))
    (out_dir / f"{name}.md").write_text(f"# {title}\n\n{markdown}\n\n{COMPACT_NOTE.format(name=name)}\n{paired}")
    wide = _markdown(render(frame, "md"))
    (out_dir / f"{name}_wide.md").write_text(f"# {title}: ours, the paper's and the difference\n\n{wide}\n{paired}")
    (out_dir / f"{name}.tex").write_text(to_latex(frame))
    frame.set_axis(_flat(frame.columns), axis=1).to_csv(out_dir / f"{name}.csv", index=False, na_rep="-")
    return markdown


def efficiency_summary(cells: list[Cell]) -> pd.DataFrame:
    """Measured cells against full tokens of the same model, frames, samples and run settings: speed, memory, KV cache.

    Two speed-ups: `speedup` end to end (video decode and preprocessing included), the one the paper's Table 3
    reports, and `model_speedup`, the model's stages alone (`timing.MODEL_STAGES`), which the input pipeline
    does not dilute.
    """
    rows = []
    for cell in cells:
        summaries = [s for s in cell.summaries.values() if "latency_total_s" in s]
        if not cell.run.complete or not summaries:
            continue
        shared = _efficiency_columns(cell.summaries)
        samples = sum(s["samples"] - s["failed"] for s in summaries)
        rows.append({
            "model": cell.run.model, "frames": cell.run.config.get("frames"), "method": cell.run.method.get("name"),
            "k": cell.run.method.get("k"), "samples": samples, "device": cell.run.runtime.get("device"),
            "latency_per_example_s": shared["latency_per_example_s"],
            "model_latency_per_example_s": shared.get("model_latency_per_example_s", math.nan),
            "prefill_s": sum(s.get("prefill_mean_s", math.nan) * (s["samples"] - s["failed"]) for s in summaries) / samples,
            "decode_ms_per_token": shared.get("decode_ms_per_token", math.nan),
            "peak_memory_gb": shared["gpu_memory_gb"],
            "kv_cache_mib": sum(s["kv_cache_bytes_mean"] for s in summaries) / len(summaries) / 2**20,
            "prefill_bound_real": (cell.plan() or {}).get("prefill_bound_real", math.nan),
            "prefill_bound_eq8": (cell.plan() or {}).get("prefill_bound_eq8", math.nan),
            "run": _json({key: cell.run.config.get(key) for key in RUN_SETTINGS}),
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    same = ["model", "frames", "samples", "run"]
    frame["speedup"] = 1 / _to_full(frame, "latency_per_example_s", same)
    frame["model_speedup"] = 1 / _to_full(frame, "model_latency_per_example_s", same)
    frame["prefill_speedup"] = 1 / _to_full(frame, "prefill_s", same)
    # the share of what the model's real prefill FLOPs allow (and eq. 8's, the papers' unit) that the prefill reached
    frame["of_real_bound"] = frame.prefill_speedup / frame.prefill_bound_real
    frame["of_eq8_bound"] = frame.prefill_speedup / frame.prefill_bound_eq8
    frame["memory_ratio"] = _to_full(frame, "peak_memory_gb", same)
    frame["kv_cache_ratio"] = _to_full(frame, "kv_cache_mib", same)
    return frame.drop(columns="run")


def render_report(
    results_dir: Path, tables: list[int | str] | None = None, paper_dir: Path = PAPER_DIR, show: bool = False
) -> dict[int | str, pd.DataFrame]:
    """Write every table with data under results_dir/report; returns the tables written.

    Tables: DyCoke's by number, the others by their CSV's name (`fastvid_table1`); by default every table in `paper_dir`.

    Prints one line per table (its path, rows and the cells it shows) unless `show`, which prints the tables too.
    """
    cells = CellStore(results_dir).cells()  # read once: the efficiency summary and the tables share them
    efficiency = efficiency_summary(cells)
    if not efficiency.empty:
        (results_dir / "report").mkdir(parents=True, exist_ok=True)
        efficiency.to_csv(results_dir / "report" / "efficiency.csv", index=False)
        markdown = (
            efficiency.astype(object).where(efficiency.notna(), None).to_markdown(index=False, floatfmt=".3f", missingval="-")
        )
        (results_dir / "report" / "efficiency.md").write_text(
            f"# Efficiency against full tokens (same run)\n\n{markdown}\n\n{SPEEDUP_NOTE}\n"
        )
        print(f"efficiency: {results_dir / 'report' / 'efficiency.md'} ({len(efficiency)} measured cells)")
        if show:
            print(markdown)
    ours = cell_rows(cells)
    written = {}
    for table in tables or paper_tables(paper_dir):
        frame = build_table(table, ours, paper_dir)
        if frame is not None:
            for note in frame.attrs["notes"]:
                print(note)
            if judges := frame.attrs["stand_in_judges"]:
                print(f"report: {_title(table)}: " + STAND_IN_NOTE.format(endpoints=", ".join(judges)))
            markdown = write_table(table, frame, results_dir / "report")
            plot_accuracy_vs_flops(_stem(table), build_table(table, ours, paper_dir, for_plot=True), results_dir / "report")
            filled = int(frame[[c for c in frame.columns if c[1] == "ours"]].notna().any(axis=1).sum())
            where = results_dir / "report" / f"{_stem(table)}.md"
            also = "also .tex, _wide.md, .csv and plots"
            print(f"{_title(table)}: {where} ({also}): {filled} of {len(frame)} rows have our values")
            if show:
                print(markdown)
            written[table] = frame
    if not written:
        print(f"report: no finished cell under {results_dir / 'cells'} has a metric of any paper table")
    return written


def paper_tables(paper_dir: Path = PAPER_DIR) -> list[int | str]:
    """Every table in `paper_dir`: DyCoke's by number, in order, then the others by name."""
    stems = sorted(path.stem for path in paper_dir.glob("*.csv"))
    numbered = sorted(int(stem.removeprefix("table")) for stem in stems if stem.removeprefix("table").isdigit())
    return [*numbered, *(stem for stem in stems if not stem.removeprefix("table").isdigit())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke_eval.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--tables", type=_table, nargs="*", help="only these: 1 2 fastvid_table1 (default: all with data)")
    parser.add_argument("--show", action="store_true", help="print the tables too, not only where they were written")
    args = parser.parse_args(argv)
    if not (args.results_dir / "cells").is_dir():
        print(f"dycoke_eval.report: no cell folders under {args.results_dir}/cells: give the results_dir a run wrote "
              "(`results` by default)", file=sys.stderr)  # fmt: skip
        return 2
    known = paper_tables()
    if unknown := [table for table in args.tables or [] if table not in known]:
        print(f"dycoke_eval.report: --tables {' '.join(map(str, unknown))}: no such paper table; tables: "
              f"{' '.join(map(str, known))}", file=sys.stderr)  # fmt: skip
        return 2
    render_report(args.results_dir, args.tables, show=args.show)
    return 0


def _table(text: str) -> int | str:
    return int(text) if text.isdigit() else text


if __name__ == "__main__":
    raise SystemExit(main())

"""Nightly regression: compare a run's cells with a committed baseline, per method and metric.

    python -m dycoke_eval.nightly compare RESULTS_DIR [--baseline results/baselines/nightly.json] [--run-name nightly] [--all]
    python -m dycoke_eval.nightly refresh RESULTS_DIR [--baseline ...] [--run-name nightly]

A method is identified by its model, name and every setting (`tiny/fastv(layer=5,ratio=0.35)`),
so two settings of one method are never compared with each other: a changed setting shows up as a
method missing from the run, a changed code path as a moved number. Quality metrics must stay
within an absolute band around the baseline. Efficiency figures (the share of visual tokens
entering the LLM, the achieved retained ratio, generate time relative to full in the same run)
must stay within their bands too.
GPT-judged metrics are compared only when a judge is configured; the report says when they are
skipped. `compare` prints the figures that moved beyond their band, then one summary line, and exits 1
when any did (a figure or a method missing from the run counts as moved); `--all` prints every figure.
`refresh` writes the baseline from a run and records where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import pandas as pd

from dycoke_eval.provenance import git_state, package_versions
from dycoke_eval.store import CellStore, method_label, write_json_atomic

DEFAULT_BASELINE = Path("results") / "baselines" / "nightly.json"  # relative to where the command runs, like results/
JUDGED_METRICS = ("gpt_eval_score", "gpt_eval_accuracy")
DEFAULT_BANDS = {  # absolute tolerance by kind of figure
    "percent": 1.0,  # accuracy in percent points
    "fraction": 0.01,  # accuracy as a fraction of 1
    "score": 0.05,  # 0-5 judge scores
    "visual_token_share": 0.02,
    "retained_ratio": 0.02,
    "generate_time_vs_full": 0.25,  # timings are noisy: a wide band
}


def _band_kind(name: str, value: float) -> str:
    if name in DEFAULT_BANDS:
        return name
    if "gpt_eval_score" in name:
        return "score"
    return "percent" if abs(value) > 1 else "fraction"


def collect(results_dir: Path, run_name: str) -> dict[str, dict[str, float]]:
    """{model/method(settings): {figure: value}} over the complete cells of `run_name` under results_dir/cells.

    A method is keyed by every setting (`method_label`), so FastV at two ratios or PruMerge in two
    modes are two entries, never one.
    """
    figures: dict[str, dict[str, float]] = {}
    generate_seconds: dict[str, float] = {}
    full_key: dict[str, str] = {}  # model -> the key of its full-token cell
    for cell in CellStore(results_dir).cells():
        if not cell.run.complete or cell.run.run_name != run_name:
            continue
        model = cell.run.model
        method = f"{model}/{method_label(cell.run.method)}"
        if cell.run.method["name"] == "full":
            full_key[model] = method
        row = {
            f"{task}/{metric.split(',')[0]}": value
            for task, metrics in cell.metrics.items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and "_stderr" not in metric and metric not in ("judged", "judge_failed")
        }
        if (share := cell.visual_token_share()) is not None:
            row["visual_token_share"] = share
            measured = cell.retained_ratio()
            row["retained_ratio"] = share if measured is None else measured  # a method that measures none keeps this share
            summaries = [s for s in cell.summaries.values() if s.get("visual_tokens_full_mean")]
            generate_seconds[method] = mean(s["seconds_mean"].get("generate", 0.0) for s in summaries)
        figures[method] = row
    for method, seconds in generate_seconds.items():
        full = generate_seconds.get(full_key.get(method.split("/", 1)[0], ""), 0.0)
        if full > 0:
            figures[method]["generate_time_vs_full"] = seconds / full
    return figures


COLUMNS = ["method", "figure", "baseline", "now", "change", "band", "regressed"]


def compare(current: dict[str, dict[str, float]], baseline: dict[str, Any], judged: bool) -> tuple[pd.DataFrame, list[str]]:
    """A row per compared figure (`COLUMNS`: with whether it moved beyond its band) and notes on what was not compared."""
    bands = {**DEFAULT_BANDS, **baseline.get("bands", {})}
    rows, notes = [], []
    for method, expected in baseline["methods"].items():
        if method not in current:
            rows.append({"method": method, "figure": "(all)", "baseline": None, "now": None, "change": None, "band": None,
                         "regressed": True})  # fmt: skip
            continue
        for figure, before in expected.items():
            if any(judged_metric in figure for judged_metric in JUDGED_METRICS) and not judged:
                notes.append(f"{method} {figure}: not compared, no judge configured")
                continue
            now = current[method].get(figure)
            band = bands[_band_kind(figure, before)]
            change = None if now is None else now - before
            regressed = now is None or abs(change) > band
            rows.append({"method": method, "figure": figure, "baseline": before, "now": now, "change": change,
                         "band": band, "regressed": regressed})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS), notes


def figures_text(table: pd.DataFrame) -> str:
    """Compared figures as a text table: values to 4 digits, the change signed, 'missing' where the run lacks one."""
    text = {
        "method": table.method,
        "figure": table.figure,
        "baseline": table.baseline.map(_number_text),
        "now": table.now.map(lambda value: "missing" if pd.isna(value) else _number_text(value)),
        "change": table.change.map(lambda value: _number_text(value, "+")),
        "band": table.band.map(_number_text),
        "status": table.regressed.map({True: "moved", False: "within"}),
    }
    return pd.DataFrame(text).to_string(index=False)


def _number_text(value, sign: str = "") -> str:
    return "-" if pd.isna(value) else f"{value:{sign}.4g}"


def summary(table: pd.DataFrame, notes: list[str]) -> str:
    """'nightly: 42 figures compared, 2 moved beyond tolerance, 40 within', and how many judged ones were not."""
    moved = int(table.regressed.sum())
    line = f"nightly: {_figures(len(table))} compared, {moved} moved beyond tolerance, {len(table) - moved} within"
    return line + (f"; {_figures(len(notes), 'GPT-judged ')} not compared (no judge configured)" if notes else "")


def _figures(count: int, kind: str = "") -> str:
    return f"{count} {kind}figure{'' if count == 1 else 's'}"


def refresh(results_dir: Path, run_name: str, path: Path) -> dict[str, Any]:
    current = collect(results_dir, run_name)
    if not current:
        raise SystemExit(f"dycoke_eval.nightly: no complete cell of run {run_name!r} under {results_dir / 'cells'}")
    baseline = {
        "source": {
            "results_dir": str(results_dir),
            "run_name": run_name,
            "git": git_state(),
            "versions": package_versions(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },  # fmt: skip
        "bands": DEFAULT_BANDS,
        "methods": current,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, baseline, sort_keys=True)
    print(f"baseline: {path} ({len(current)} methods, from {results_dir}, commit {baseline['source']['git']['commit']})")
    return baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke_eval.nightly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("compare", "refresh"))
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--run-name", default="nightly")
    parser.add_argument("--judged", action=argparse.BooleanOptionalAction, default=bool(os.environ.get("OPENAI_API_KEY")),
                        help="compare GPT-judged metrics (default: when OPENAI_API_KEY is set)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="print every compared figure and every note, not only what moved")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        refresh(args.results_dir, args.run_name, args.baseline)
        return 0
    if not args.baseline.exists():
        print(f"dycoke_eval.nightly: no baseline at {args.baseline}; create one with `refresh`", file=sys.stderr)
        return 2
    table, notes = compare(collect(args.results_dir, args.run_name), json.loads(args.baseline.read_text()), args.judged)
    shown = table if args.all else table[table.regressed]
    if not shown.empty:
        print(figures_text(shown))
    for note in notes if args.all else []:
        print(f"note: {note}")
    print(summary(table, notes))
    return 1 if table.regressed.any() else 0


if __name__ == "__main__":
    raise SystemExit(main())

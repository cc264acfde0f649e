"""The field's newer comparison tables (HoliTom, VidCom2, FlashVID, FrameFusion) and the `frontier`: the published
numbers as data (each row saying where it was read), the sweeps that run their rows, and the frontier's report."""

import json
import math

import pandas as pd
import pytest
from conftest import run_app
from test_fastvid_tables import FASTV, VANILLA, fake_cell, sweep_cells, world

from dycoke_eval.config import group_options
from dycoke_eval.report import PAPER_DIR, _method_defaults, render_report

TABLES = [
    "holitom_table1",
    "holitom_table2",
    "vidcom2_table2",
    "vidcom2_qwen3_vl",
    "flashvid_table1",
    "flashvid_table9",
    "flashvid_qwen2_5_vl",
    "framefusion_main",
]
SETTINGS = ["k", "layer", "ratio", "form", "frame_tokens", "retention", "cluster_ratio", "in_llm", "tau", "retention_ratio",
            "cost"]  # fmt: skip
NOT_IN_FRONTIER = {  # methods the frontier leaves out, and why (its sweep's comment says the same)
    "prumerge": "its count is each frame's outliers: no retention setting",
    "prumerge_official": "its count is each frame's outliers: no retention setting",
    "dycoke": "DyCoke's decode-time pruning does not change the prefill; TTM alone is the frontier's DyCoke",
    "dycoke_random": "Table 5's ablation of DyCoke",
    "dycoke_no_dp": "Table 5's ablation of DyCoke",
}


def paper(table: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / f"{table}.csv")


def _normal(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    try:
        return round(float(value), 4)
    except ValueError:
        return value


def named(table: str) -> list[str]:
    """The settings the table's rows name (as the report matches cells to rows: by these alone)."""
    return [name for name in SETTINGS if name in paper(table).columns]


def key(model, method, frames, settings, names) -> tuple:
    return (model, method, int(frames), *(_normal(settings.get(name)) for name in names))


def run_rows(table: str) -> list[tuple]:
    rows = paper(table)
    return sorted((key(r.model, r.method, r.frames, r._asdict(), named(table)) for r in rows[rows.runs].itertuples()), key=str)


# The published numbers


@pytest.mark.parametrize("table", [*TABLES, "frontier"])
def test_every_row_says_where_its_numbers_were_read_and_whether_the_harness_runs_it(table):
    rows = paper(table)
    assert rows.source.str.len().gt(20).all() and rows.runs.dtype == bool
    assert rows[rows.runs].method.isin(group_options("method")).all()  # a row the harness runs names one of its methods


def test_the_transcribed_rows_hold_the_papers_numbers():
    holitom = paper("holitom_table1").set_index(["row", "R"])
    assert holitom.loc[("HoliTom", 0.25), ["mvbench", "egoschema", "longvideobench", "videomme_wo_sub"]].tolist() == [
        58.4, 61.2, 56.7, 58.9]  # fmt: skip
    assert holitom.loc[("HoliTom (w/o M)", 0.1), ["tflops", "flops_ratio"]].tolist() == [3.4, 0.083]
    vidcom2 = paper("vidcom2_table2").set_index(["model", "row", "R"])
    assert vidcom2.loc[("llava_video_7b", "VidCom2", 0.15), ["mvbench", "videomme_wo_sub", "paper_avg_percent"]].tolist() == [
        53.3, 58.3, 88.5]  # fmt: skip
    flashvid = paper("flashvid_table1").set_index(["model", "row", "R"])
    assert flashvid.loc[("llava_ov_7b", "FlashVID", 0.1), ["videomme_wo_sub", "egoschema_subset", "mvbench"]].tolist() == [
        57.8, 62.4, 57.4]  # fmt: skip
    assert paper("framefusion_main").set_index("row").loc["FrameFusion", "nextqa_mc"] == 81.8


MISPRINTS = {  # averages a paper prints that its own cells do not give, kept as printed: (table, row, R) -> |printed - mean|
    ("flashvid_table1", "PruneVid", 0.15): 0.15,  # 55.7 printed, the cells give 55.85
    ("flashvid_qwen2_5_vl", "FastV", 0.1): 0.92,  # 57.3 printed, the cells give 56.375 (its 91.6% of vanilla is 56.4's)
}


@pytest.mark.parametrize(
    "table", ["holitom_table1", "holitom_table2", "flashvid_table1", "flashvid_table9", "flashvid_qwen2_5_vl"]
)
def test_holitoms_and_flashvids_averages_are_the_mean_of_their_four_benchmarks_as_printed(table):
    """A check of the transcription against the papers' own arithmetic: Avg is the mean of VideoMME, EgoSchema (the
    full set), LongVideoBench and MVBench, to the print's rounding, but for the misprints named here."""
    rows = paper(table).dropna(subset=["paper_avg"])
    off = (rows[["mvbench", "egoschema", "longvideobench", "videomme_wo_sub"]].mean(axis=1) - rows.paper_avg).abs()
    misprint = rows.apply(lambda r: (table, r.row, r.R) in MISPRINTS, axis=1)
    assert (off[~misprint] <= 0.05 + 1e-9).all(), rows[off > 0.05][["row", "R"]]
    assert off[misprint].round(2).tolist() == [v for (t, _, _), v in MISPRINTS.items() if t == table]


def test_vidcom2s_average_is_the_mean_share_of_vanilla_over_its_seven_columns():
    columns = ["mvbench", "longvideobench", "mlvu", "videomme_wo_sub", "videomme_short", "videomme_medium", "videomme_long"]
    rows = paper("vidcom2_table2")
    for model, group in rows.groupby("model"):
        vanilla = group[group.method == "full"][columns].iloc[0]
        share = (group[columns] / vanilla).mean(axis=1) * 100
        assert ((share - group.paper_avg_percent).abs() <= 0.1).all(), model


# The sweeps


RESOLVED = {"fastvid": {"tau": 0.9}}  # settings a config leaves null that the run records as they resolve on LLaVA


def cell_key(cell: dict[str, str], table: str) -> tuple:
    """The row a sweep's cell fills: its method's config, null settings resolved, then the cell's own overrides."""
    settings = {**_method_defaults(cell["method"]), **RESOLVED.get(cell["method"], {})}
    settings.update({s: cell[f"method.{s}"] for s in SETTINGS if f"method.{s}" in cell})
    return key(cell["model"], cell["method"], cell["frames"], settings, named(table))


@pytest.mark.parametrize("table", [*TABLES, "frontier"])
def test_every_sweep_expands_to_the_rows_of_its_table_that_the_harness_runs(table):
    cells = [cell_key(c, table) for c in sweep_cells(table)]
    assert sorted(cells, key=str) == run_rows(table) and len(set(cells)) == len(cells)


def test_the_frontier_runs_every_method_at_25_15_and_10_percent_or_says_why_not():
    rows = paper("frontier")
    methods = set(group_options("method")) - {"full"}
    assert set(rows.method) - {"full"} | set(NOT_IN_FRONTIER) == methods
    budgets = rows[rows.method != "full"].groupby(["method", "form", "in_llm"], dropna=False).R.apply(sorted)
    assert all(r == [0.1, 0.15, 0.25] for m, r in budgets.items() if m[0] != "dycoke_ttm")
    assert rows[rows.method == "dycoke_ttm"].R.tolist() == [0.25]  # TTM keeps at least one frame in four
    assert {(c["model"], c["frames"]) for c in sweep_cells("frontier")} == {("llava_ov_7b", "32")}


@pytest.mark.slow  # a dry run through the app, 7 s: in `make test-slow` (the expansion above is checked in `make test`)
def test_the_frontiers_dry_run_plans_its_rows_with_their_real_prefill_flops(tmp_path):
    proc = run_app("+sweep=frontier", "dry_run=true", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = pd.read_csv(tmp_path / "frontier" / "plan.csv")
    planned = [key(r["model"], r["method"], r["frames"], r, named("frontier")) for r in plan.to_dict("records")]
    assert sorted(planned, key=str) == run_rows("frontier")
    full = plan[plan.method == "full"].prefill_tflops_real.iloc[0]
    assert plan[plan.method != "full"].prefill_tflops_real.between(0, full, inclusive="neither").all()


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_the_dry_run_of_every_papers_sweep_plans_the_rows_it_runs(table, tmp_path):
    proc = run_app(f"+sweep={table}", "dry_run=true", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = pd.read_csv(tmp_path / table / "plan.csv")
    planned = [key(r["model"], r["method"], r["frames"], r, named(table)) for r in plan.to_dict("records")]
    assert sorted(planned, key=str) == run_rows(table)


# The frontier's report


def measured_cell(results_dir, name, method, rights, tflops):
    """A finished LLaVA-OV-7B cell whose samples recorded `tflops` real prefill TFLOPs each."""
    fake_cell(results_dir, name, "llava_ov_7b", 32, method, world(rights), 1.0)
    results = json.loads((results_dir / "cells" / name / "results.json").read_text())
    for summary in results["dycoke_eval"].values():
        summary["prefill_tflops_real_mean"] = tflops
    (results_dir / "cells" / name / "results.json").write_text(json.dumps(results))


def test_the_frontier_report_pairs_every_row_with_vanilla_and_plots_accuracy_against_the_measured_prefill_flops(tmp_path):
    measured_cell(tmp_path, "vanilla", {"name": "full"}, VANILLA, 60.0)
    measured_cell(tmp_path, "tome25", {"name": "tome", "retention": 0.25}, FASTV, 12.5)
    frame = render_report(tmp_path, ["frontier"])["frontier"].set_index([("", "method"), ("", "R")])
    tome = frame.loc[("ToMe", "25%")]
    assert tome[("prefill_tflops_real", "ours")] == 12.5
    paired = tome[("mvbench", "vs vanilla")]
    assert paired.mean == pytest.approx(100 * (4 / 8 - 6 / 8)) and paired.samples == 8 and paired.low < paired.mean < paired.high
    points = pd.read_csv(tmp_path / "report" / "frontier_llava_ov_7b_accuracy_vs_tflops.csv")
    assert sorted(points.tflops) == [12.5, 60.0] and set(points.source) == {"ours"}


def test_egoschemas_subset_is_reported_as_a_percentage_beside_flashvids_subset_column(tmp_path):
    measured_cell(tmp_path, "vanilla", {"name": "full"}, VANILLA, 60.0)
    results_path = tmp_path / "cells" / "vanilla" / "results.json"
    results = json.loads(results_path.read_text())
    results["results"]["egoschema_subset"] = {"score,none": 0.625}  # lmms-eval's aggregation: a fraction
    results_path.write_text(json.dumps(results))
    frame = render_report(tmp_path, ["flashvid_table1"])["flashvid_table1"]
    vanilla = frame[(frame[("", "model")] == "llava_ov_7b") & (frame[("", "method")] == "Vanilla")].iloc[0]
    assert vanilla[("egoschema_subset", "ours")] == 62.5 and vanilla[("egoschema_subset", "paper")] == 62.2

"""FastVID's Tables 1-4: the paper's numbers as data, the sweeps that run their rows, and the report's paired
comparison with vanilla (per-sample differences and their 95% interval), on hand-made cells."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_app
from hydra.core.override_parser.overrides_parser import OverridesParser
from lmms_eval.api.metrics import paired_ttest
from omegaconf import OmegaConf
from scipy import stats

from dycoke_eval.config import CONF_DIR
from dycoke_eval.paired import PairedDifference, column_scores, paired_difference, stratified_interval
from dycoke_eval.report import PAPER_DIR, build_table, render, render_report
from hydra_plugins.dycoke_eval_sweeper.grids_sweeper import expand_grids

TABLES = [f"fastvid_table{n}" for n in range(1, 5)]
BENCHMARKS = ["mvbench", "longvideobench", "mlvu", "videomme_wo_sub"]
SETTINGS = ["k", "layer", "ratio", "form", "retention", "cluster_ratio", "in_llm", "segmentation", "d", "merging"]


def paper(table: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / f"{table}.csv")


# The paper's numbers


def test_table1_has_every_row_of_the_paper_for_both_models():
    table = paper("fastvid_table1")
    blocks = table.groupby(["model", "frames", "R"]).size().to_dict()
    assert blocks == {("llava_ov_7b", 32, 1.0): 1, ("llava_ov_7b", 32, 0.32): 1, ("llava_ov_7b", 32, 0.25): 6,
                      ("llava_ov_7b", 32, 0.2): 5, ("llava_ov_7b", 32, 0.15): 5, ("llava_ov_7b", 32, 0.1): 5,
                      ("llava_video_7b", 64, 1.0): 1, ("llava_video_7b", 64, 0.32): 1, ("llava_video_7b", 64, 0.25): 6,
                      ("llava_video_7b", 64, 0.1): 5}  # fmt: skip
    ov = table[table.model == "llava_ov_7b"].set_index(["row", "R"])
    assert ov.loc[("Vanilla", 1.0), BENCHMARKS].tolist() == [56.9, 56.4, 65.2, 58.6]
    durations = ["videomme_short", "videomme_medium", "videomme_long"]
    assert ov.loc[("FastVID", 0.1), [*durations, "avg_score", "avg_percent"]].tolist() == [67.4, 56.0, 48.6, 58.1, 98.0]


# A known misprint: LLaVA-Video, VisionZip after pooling, R=25%: Avg. 61.5 (and 96.7% = 61.5 / 63.6), but its four
# benchmarks (58.3, 58.3, 66.6, 61.9) average 61.275. Every other row agrees with itself.
MISPRINT = ("llava_video_7b", "VisionZip (after pooling)", 0.25)


@pytest.mark.parametrize("table", TABLES)
def test_avg_and_percent_of_vanilla_follow_from_the_task_columns_as_the_paper_rounds_them(table):
    frame = paper(table)
    mean = frame[BENCHMARKS].mean(axis=1)
    vanilla = frame[frame.method == "full"].set_index("model")
    vanilla_mean = vanilla[BENCHMARKS].mean(axis=1)
    misprint = frame[["model", "row", "R"]].apply(tuple, axis=1) == MISPRINT
    printed = frame.avg_score.notna()
    assert ((frame.avg_score - mean).abs()[printed & ~misprint] <= 0.05 + 1e-9).all()  # Avg. is the mean, rounded
    # % of vanilla is Avg. over vanilla's Avg. from unrounded accuracies: each of the eight inputs is off by at most
    # 0.05 from its printed value (0.05 / 59 = 0.085% each, twice) and the % is rounded (0.05).
    percent = 100 * mean / frame.model.map(vanilla_mean)
    assert ((frame.avg_percent - percent).abs()[~misprint] <= 0.22).all()
    if misprint.any():
        row = frame[misprint].iloc[0]
        assert row.avg_score == 61.5 and mean[misprint].iloc[0] == pytest.approx(61.275)
        assert row.avg_percent == pytest.approx(100 * 61.5 / 63.6, abs=0.05)  # the % follows the printed Avg.


def test_videomme_overall_is_the_mean_of_its_three_durations():
    frame = paper("fastvid_table1")
    durations = frame[["videomme_short", "videomme_medium", "videomme_long"]].mean(axis=1)
    assert ((frame.videomme_wo_sub - durations).abs() <= 0.1 + 1e-9).all()  # 900 questions each; both sides rounded


def test_the_ablations_default_rows_and_vanilla_are_table1s():
    one = paper("fastvid_table1").set_index(["model", "row", "R"])
    for table, label in (("fastvid_table2", "Our DySeg"), ("fastvid_table3", "d=0.4"), ("fastvid_table4", "Our DTM")):
        frame = paper(table).set_index(["model", "row"])
        for model in dict.fromkeys(frame.index.get_level_values(0)):
            assert frame.loc[(model, label), BENCHMARKS].tolist() == one.loc[(model, "FastVID", 0.1), BENCHMARKS].tolist()
            assert frame.loc[(model, "Vanilla (Table 1)"), [*BENCHMARKS, "avg_score"]].tolist() == one.loc[
                (model, "Vanilla", 1.0), [*BENCHMARKS, "avg_score"]].tolist()  # fmt: skip


# Sweeps


def sweep_cells(table: str, arguments: list[str] = ()) -> list[dict[str, str]]:
    """The sweep's cells as {key: value}, expanded from its YAML (no composition: the method configs may be elsewhere)."""
    grids = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sweep" / f"{table}.yaml").hydra.sweeper.grids)
    return [dict(a.split("=", 1) for a in cell) for cell in expand_grids(OverridesParser.create(), None, grids, list(arguments))]


def _normal(value) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)) or str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    try:
        return round(float(value), 4)
    except ValueError:
        return value


def row_key(model, method, frames, settings: dict) -> tuple:
    return (model, method, int(frames), *(_normal(settings.get(name)) for name in SETTINGS))


@pytest.mark.parametrize("table", TABLES)
def test_every_fastvid_sweep_expands_to_its_tables_rows(table):
    cells = [
        row_key(c["model"], c["method"], c["frames"], {s: c.get(f"method.{s}") for s in SETTINGS}) for c in sweep_cells(table)
    ]
    rows = [row_key(r.model, r.method, r.frames, r._asdict()) for r in paper(table).itertuples()]
    assert sorted(cells, key=str) == sorted(rows, key=str) and len(set(cells)) == len(cells)


def test_fastvid_sweeps_run_each_model_at_its_frames_and_narrow_by_model():
    cells = sweep_cells("fastvid_table1")
    assert {(c["model"], c["frames"]) for c in cells} == {("llava_ov_7b", "32"), ("llava_video_7b", "64")}
    video = sweep_cells("fastvid_table1", ["model=llava_video_7b", "limit=50"])
    assert len(video) == 13 and {c["frames"] for c in video} == {"64"} and {c["limit"] for c in video} == {"50"}
    order = [(c["model"], c["frames"]) for c in cells]
    assert order == sorted(order)  # one checkpoint load per model


@pytest.mark.slow  # four dry runs through the app, 12 s: in `make test-slow` (each sweep's expansion is checked above)
@pytest.mark.parametrize("table", TABLES)
def test_the_dry_run_plans_every_row_with_the_papers_settings(table, tmp_path):
    proc = run_app(f"+sweep={table}", "dry_run=true", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = pd.read_csv(tmp_path / table / "plan.csv")
    planned = [row_key(r["model"], r["method"], r["frames"], r) for r in plan.to_dict("records")]
    rows = paper(table)
    assert sorted(planned, key=str) == sorted(
        (row_key(r.model, r.method, r.frames, r._asdict()) for r in rows.itertuples()), key=str
    )
    fastvid = plan[plan.method == "fastvid"]
    # the paper's unstated defaults; tau (null in the config) as it resolves on LLaVA: each release's own 0.9
    assert (fastvid[["c", "tau", "p", "beta"]] == [8, 0.9, 4, 0.6]).all().all()
    merged = plan.assign(key=planned).merge(rows.assign(key=[row_key(r.model, r.method, r.frames, r._asdict())
                                                             for r in rows.itertuples()]), on="key")  # fmt: skip
    close = merged[merged.method_x.isin(["fastvid", "fastv", "dycoke_ttm"])]
    assert ((close.retained_ratio_x - close.retained_ratio_y).abs() < 0.01).all(), close[["key", "retained_ratio_x"]]
    compressed = plan[plan.method != "full"]
    assert plan.tflops.gt(0).all() and compressed.flops_ratio.between(0, 1, inclusive="neither").all()  # eq. 8 for every row


# Per-sample scores and the paired interval


def test_one_stratum_is_the_paired_t_interval_of_lmms_eval_and_scipy():
    ours = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    vanilla = [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    mean, low, high = stratified_interval([(1.0, [a - b for a, b in zip(ours, vanilla, strict=True)])])
    expected = paired_ttest(ours, vanilla)
    assert (mean, low, high) == pytest.approx((expected["mean_diff"], expected["ci_lower"], expected["ci_upper"]))
    interval = stats.ttest_rel(ours, vanilla).confidence_interval(0.95)
    assert (low, high) == pytest.approx((interval.low, interval.high))


def test_strata_add_their_weighted_means_and_variances_with_welch_satterthwaite_freedom():
    # Stratum A (weight 1/2): 1, 0, 0, 1: mean 1/2, variance 1/3, n 4. Stratum B (1/2): 0, -1, 0: mean -1/3, variance 1/3, n 3.
    mean, low, high = stratified_interval([(0.5, [1, 0, 0, 1]), (0.5, [0, -1, 0])])
    a, b = 0.25 * (1 / 3) / 4, 0.25 * (1 / 3) / 3  # w^2 s^2 / n: 1/48 and 1/36, together 7/144
    freedom = (7 / 144) ** 2 / (a**2 / 3 + b**2 / 2)
    assert mean == pytest.approx(1 / 12) and freedom == pytest.approx(4.4545, abs=1e-4)
    half = stats.t.ppf(0.975, freedom) * math.sqrt(7) / 12
    assert (low, high) == pytest.approx((1 / 12 - half, 1 / 12 + half))


def test_only_samples_both_cells_scored_are_paired_and_the_text_marks_intervals_without_zero():
    ours = {("x", ""): {("t", i): s for i, s in enumerate([0, 0, 0, 100, 0, 100])}}  # docs 0-5
    vanilla = {("x", ""): {("t", i): 100.0 for i in range(2, 9)}}  # docs 2-8: pairs 2, 3, 4, 5
    paired = paired_difference(ours, vanilla)
    assert paired.samples == 4 and paired.mean == pytest.approx(-50.0)
    expected = paired_ttest([0, 100, 0, 100], [100] * 4)
    assert (paired.low, paired.high) == pytest.approx((expected["ci_lower"], expected["ci_upper"]))
    assert str(PairedDifference(-1.24, -2.91, 0.46, 9)) == "-1.2 [-2.9, +0.5]"
    assert str(PairedDifference(-3.1, -4.8, -1.4, 9)) == "-3.1 [-4.8, -1.4] *"
    assert paired_difference(ours, {("y", ""): {("t", 0): 1.0}}) is None  # nothing in common


def lvb(doc, right):
    return {"doc_id": doc, "lvb_acc": {"id": str(doc), "answer": "A", "parsed_pred": "A" if right else "B"}}


def mlvu(doc, kind, right):
    return {"doc_id": doc, "mlvu_percetion_score": {"task_type": kind, "answer": "A", "pred_answer": "A" if right else "C"}}


def videomme(doc, duration, right):
    return {
        "doc_id": doc,
        "videomme_perception_score": {"duration": duration, "answer": "B", "pred_answer": "B" if right else "D"},
    }


def mvbench(doc, right, answered=True):
    answer = ("A" if right else "B") if answered else ""
    return {"doc_id": doc, "mvbench_accuracy": {"pred_answer": answer, "gt_answer": "A", "score": int(right and answered)}}


def test_each_benchmark_is_scored_as_lmms_eval_aggregates_it():
    samples = {
        "mvbench_action_count": [mvbench(0, True), mvbench(1, False), mvbench(2, False, answered=False)],
        "mvbench_state_change": [mvbench(0, True)],
        "longvideobench_val_v": [lvb(0, True), lvb(1, False)],
        "mlvu_dev": [mlvu(0, "count", True), mlvu(1, "count", False), mlvu(2, "order", True)],
        "videomme": [videomme(0, "short", True), videomme(1, "short", False), videomme(2, "long", True)],
    }
    columns = column_scores(samples)
    mean = lambda strata: np.mean([np.mean(list(s.values())) for s in strata.values()])  # noqa: E731
    assert mean(columns["mvbench"]) == pytest.approx(100 * 2 / 3)  # pooled, the empty answer left out
    assert mean(columns["mlvu"]) == pytest.approx(100 * 2 / 3)  # pooled, as FastVID's lmms-eval; 0.7.3: the type mean
    assert mean(columns["videomme_wo_sub"]) == pytest.approx(100 * 2 / 3) and mean(columns["videomme_long"]) == 100
    assert set(columns["avg_score"]) == {("mvbench", ""), ("longvideobench", ""), ("mlvu", ""), ("videomme_wo_sub", "")}


# The report, on hand-made cells


def fake_cell(results_dir, name, model, frames, method, samples, plan_ratio):
    """A finished cell as the app writes one (format 2, plan recorded), from per-sample rows; metrics as lmms-eval's."""
    cell = results_dir / "cells" / name
    cell.mkdir(parents=True)
    settings = {key: value for key, value in method.items() if key != "name"}
    plan = {"model": model, "method": method["name"], "k": settings.get("k"), "l": None, "p": None, "frames": frames,
            "retained_ratio": plan_ratio, "tflops": 10.0 * plan_ratio, "flops_ratio": plan_ratio}  # fmt: skip
    config = {"model": {"name": model}, "frames": frames, "limit": None, "prompt": "paper", "seed": 0, "max_new_tokens": None}
    (cell / "run.json").write_text(json.dumps({"format": 2, "config": config, "method": method, "plan": plan, "complete": True}))
    correct = lambda rows, metric, ok: 100 * np.mean([ok(r[metric]) for r in rows])  # noqa: E731
    metrics = {task: {} for task in samples}
    for task, rows in samples.items():
        (cell / f"samples_{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        if task.startswith("mvbench_"):
            metrics[task]["mvbench_accuracy,none"] = correct(rows, "mvbench_accuracy", lambda v: v["score"])
    metrics["longvideobench_val_v"]["lvb_acc,none"] = correct(samples["longvideobench_val_v"], "lvb_acc",
                                                               lambda v: v["parsed_pred"] == v["answer"]) / 100  # fmt: skip
    kinds = {r["mlvu_percetion_score"]["task_type"] for r in samples["mlvu_dev"]}
    metrics["mlvu_dev"]["mlvu_percetion_score,none"] = np.mean([
        correct([r for r in samples["mlvu_dev"] if r["mlvu_percetion_score"]["task_type"] == kind], "mlvu_percetion_score",
                lambda v: v["pred_answer"] == v["answer"]) for kind in kinds])  # fmt: skip
    metrics["videomme"]["videomme_perception_score,none"] = correct(samples["videomme"], "videomme_perception_score",
                                                                    lambda v: v["pred_answer"] == v["answer"])  # fmt: skip
    summaries = {task: {"samples": len(rows), "failed": 0} for task, rows in samples.items()}
    (cell / "results.json").write_text(json.dumps({"results": metrics, "dycoke_eval": summaries}))


def world(rights: dict[str, list[bool]]) -> dict[str, list[dict]]:
    """Per-sample rows of every benchmark from 0/1 answers: MVBench in two subtasks, MLVU in two types, VideoMME in
    three durations."""
    return {
        "mvbench_action_count": [mvbench(i, r) for i, r in enumerate(rights["mvbench"][:4])],
        "mvbench_state_change": [mvbench(i, r) for i, r in enumerate(rights["mvbench"][4:])],
        "longvideobench_val_v": [lvb(i, r) for i, r in enumerate(rights["lvb"])],
        "mlvu_dev": [mlvu(i, "count" if i < 4 else "order", r) for i, r in enumerate(rights["mlvu"])],
        "videomme": [videomme(i, ("short", "medium", "long")[i % 3], r) for i, r in enumerate(rights["videomme"])],
    }


VANILLA = {"mvbench": [1, 1, 0, 1, 1, 0, 1, 1], "lvb": [1, 0, 1, 1, 1, 0], "mlvu": [1, 1, 0, 1, 0, 1, 1, 1],
           "videomme": [1, 1, 1, 0, 1, 1, 1, 0, 1]}  # fmt: skip
FASTV = {"mvbench": [1, 0, 0, 1, 0, 0, 1, 1], "lvb": [0, 0, 1, 1, 0, 0], "mlvu": [1, 0, 0, 1, 0, 1, 0, 1],
         "videomme": [1, 0, 1, 0, 1, 0, 0, 0, 1]}  # fmt: skip


@pytest.fixture
def fastvid_report(tmp_path):
    ov = ("llava_ov_7b", 32)
    fake_cell(tmp_path, "vanilla", *ov, {"name": "full"}, world(VANILLA), 1.0)
    fake_cell(tmp_path, "fastv25", *ov, {"name": "fastv", "layer": 2, "ratio": 0.25}, world(FASTV), 0.25)
    fake_cell(tmp_path, "fastv_layer5", *ov, {"name": "fastv", "layer": 5, "ratio": 0.25}, world(VANILLA), 0.25)  # no row
    fake_cell(tmp_path, "dycoke32", *ov, {"name": "dycoke_ttm", "k": 0.9, "mode": "paper"}, world(VANILLA), 0.323)
    fastvid = {"name": "fastvid", "retention": 0.1, "segmentation": "dyseg", "d": 0.4, "merging": "dtm", "c": 8, "tau": 0.9}
    fake_cell(tmp_path, "fastvid10", *ov, fastvid, world(FASTV), 0.097)
    return tmp_path, render_report(tmp_path, ["fastvid_table1", "fastvid_table3"])


def ov_rows(frame):
    ov = frame[frame[("", "model")] == "llava_ov_7b"]
    return ov.set_index([("", "method"), ("", "R")])


def test_rows_match_the_cells_with_the_papers_settings_and_show_avg_and_percent_of_vanilla(fastvid_report):
    table = ov_rows(fastvid_report[1]["fastvid_table1"])
    vanilla, fastv = table.loc[("Vanilla", "100%")], table.loc[("FastV", "25%")]
    mvbench, lvb, mlvu, vmme = 100 * 6 / 8, 100 * 4 / 6, 100 * 6 / 8, 100 * 7 / 9
    assert [vanilla[(c, "ours")] for c in BENCHMARKS] == pytest.approx([mvbench, lvb, mlvu, vmme])
    assert vanilla[("avg_score", "ours")] == pytest.approx((mvbench + lvb + mlvu + vmme) / 4)
    assert vanilla[("videomme_short", "ours")] == pytest.approx(100 * 2 / 3)  # docs 0, 3, 6: right, wrong, right
    fastv_avg = (100 * 4 / 8 + 100 * 2 / 6 + 100 * 4 / 8 + 100 * 4 / 9) / 4
    assert fastv[("avg_score", "ours")] == pytest.approx(fastv_avg)
    assert fastv[("avg_percent", "ours")] == pytest.approx(100 * fastv_avg / vanilla[("avg_score", "ours")])
    assert fastv[("avg_percent", "paper")] == 96.1 and vanilla[("avg_percent", "ours")] == pytest.approx(100.0)
    assert fastv[("retained_ratio", "ours")] == 0.25 and table.loc[("DyCoke", "32%"), ("retained_ratio", "ours")] == 0.323
    assert table.loc[("FastVID", "10%"), ("avg_score", "ours")] == pytest.approx(fastv_avg)  # its settings matched
    assert pd.isna(table.loc[("FastV", "20%"), ("avg_score", "ours")])  # the layer-5 cell is no paper row


def test_the_paired_interval_against_vanilla_is_the_hand_computed_one(fastvid_report):
    table = ov_rows(fastvid_report[1]["fastvid_table1"])
    fastv = table.loc[("FastV", "25%")]
    lvb = fastv[("longvideobench", "vs vanilla")]
    expected = paired_ttest([100 * x for x in FASTV["lvb"]], [100 * x for x in VANILLA["lvb"]])
    assert (lvb.mean, lvb.low, lvb.high, lvb.samples) == pytest.approx(
        (expected["mean_diff"], expected["ci_lower"], expected["ci_upper"], 6)
    )
    # Avg.: a quarter of each benchmark, each pooled over its questions.
    diff = {name: 100 * (np.array(FASTV[name]) - np.array(VANILLA[name])) for name in VANILLA}
    strata = [(1 / 4, diff["mvbench"]), (1 / 4, diff["lvb"]), (1 / 4, diff["mlvu"]),
              (1 / 4, diff["videomme"])]  # fmt: skip
    terms = [(w**2 * d.var(ddof=1) / len(d), len(d)) for w, d in strata]
    spread = sum(t for t, _ in terms)
    half = stats.t.ppf(0.975, spread**2 / sum(t**2 / (n - 1) for t, n in terms)) * math.sqrt(spread)
    middle = sum(w * d.mean() for w, d in strata)
    avg = fastv[("avg_score", "vs vanilla")]
    assert middle == pytest.approx(fastv[("avg_score", "ours")] - table.loc[("Vanilla", "100%"), ("avg_score", "ours")])
    assert (avg.mean, avg.low, avg.high) == pytest.approx((middle, middle - half, middle + half))
    assert pd.isna(table.loc[("Vanilla", "100%"), ("avg_score", "vs vanilla")])  # vanilla against itself: nothing to say


def test_the_rendered_table_shows_the_interval_marks_per_retention_block_and_explains_the_interval(fastvid_report):
    results, tables = fastvid_report
    text = ov_rows(render(tables["fastvid_table1"], "md"))
    assert text.loc[("FastV", "25%"), ("longvideobench", "vs vanilla")] == str(
        tables["fastvid_table1"].pipe(ov_rows).loc[("FastV", "25%"), ("longvideobench", "vs vanilla")]
    )
    assert text.loc[("DyCoke", "32%"), ("mvbench", "vs vanilla")] == "+0.0 [+0.0, +0.0]"  # the same answers as vanilla
    assert text.loc[("Vanilla", "100%"), ("mvbench", "ours")] == "75.00"  # vanilla is never ranked
    assert text.loc[("FastV", "25%"), ("mvbench", "ours")] == "**50.00**"  # the best of its block, alone with data
    markdown = (results / "report" / "fastvid_table1.md").read_text()
    header = [name.strip() for name in markdown.splitlines()[2].split("|")[1:-1]]
    assert markdown.startswith("# fastvid_table1") and header == [
        "model", "method", "R", "frames", "retained_ratio", *BENCHMARKS, "videomme_short", "videomme_medium",
        "videomme_long", "avg_score", "avg_score vs vanilla", "avg_percent",
    ]  # fmt: skip
    assert "95% interval; * where the interval excludes 0" in markdown  # the default table: Avg.'s interval only
    wide = (results / "report" / "fastvid_table1_wide.md").read_text()
    assert "mvbench vs vanilla" in wide and "95% interval; * where the interval excludes 0" in wide
    assert (results / "report" / "fastvid_table1.csv").read_text().count("vs vanilla") == 8


def test_plots_put_each_method_in_one_series_over_its_budgets_and_average_the_four_benchmarks(fastvid_report):
    results, _ = fastvid_report
    points = pd.read_csv(results / "report" / "fastvid_table1_llava_ov_7b_accuracy_vs_tflops.csv")
    assert set(points.metrics) == {" ".join(BENCHMARKS)}  # FastVID's Avg., from its four benchmarks
    paper = points[points.source == "paper"].groupby("series").row.count().to_dict()
    assert paper == {"Full tokens": 1, "DyCoke (TTM only)": 1, "FastV (layer=2)": 1, "FastVID": 1}  # at our cells' TFLOPs
    assert set(points[points.source == "ours"].series) == {"Full tokens", "DyCoke (TTM only)", "FastV (layer=2)", "FastVID"}
    ablation = pd.read_csv(results / "report" / "fastvid_table3_llava_ov_7b_accuracy_vs_tflops.csv")
    (d04,) = ablation[(ablation.source == "paper") & (ablation.row == "d=0.4")].accuracy  # the paper prints no Avg. here
    assert d04 == pytest.approx((55.9 + 56.3 + 62.7 + 57.3) / 4) and ablation.series.tolist().count("FastVID") == 2


def test_an_ablation_table_compares_with_table1s_vanilla_cell(fastvid_report):
    table = ov_rows(fastvid_report[1]["fastvid_table3"])
    assert table.loc[("Vanilla (Table 1)", "100%"), ("avg_percent", "paper")] == 100
    row = table.loc[("d=0.4", "10%")]
    assert row[("avg_percent", "paper")] == 98.0 and row[("avg_percent", "ours")] == pytest.approx(
        100 * table.loc[("d=0.4", "10%"), ("avg_score", "ours")] / table.loc[("Vanilla (Table 1)", "100%"), ("avg_score", "ours")]
    )
    assert isinstance(row[("avg_score", "vs vanilla")], PairedDifference)
    assert table[("avg_score", "ours")].notna().sum() == 2  # vanilla and d=0.4: no other d was run


@pytest.mark.parametrize("table", TABLES)
def test_no_fastvid_table_has_two_rows_that_read_the_same(table):
    """Every paper row, and a model the paper lacks, rendered: no two rows with the same model, R, frames and label."""
    metrics = set(paper(table).columns) - {"table", "row", "R", "model", "method", "frames", *SETTINGS}
    ours = pd.DataFrame([{
        "model": "tiny", "method": "full", "frames": 8, "settings": "{}", "run": "{}", "cell": "tiny_full", "limit": None,
        "counts": {}, "sources": {}, **dict.fromkeys(metrics, 1.0),
    }])  # fmt: skip
    frame = build_table(table, ours)
    shown = [column for column in (("", "model"), ("", "R"), ("", "frames"), ("", "method")) if column in frame.columns]
    names = frame[shown].apply(tuple, axis=1)
    assert not names.duplicated().any(), names[names.duplicated(keep=False)].tolist()
    assert (
        len(frame) == len(paper(table)) + (paper(table).model == paper(table).model.iloc[0]).sum()
    )  # tiny: the first model's rows


def test_the_qwen_sweep_runs_the_released_setting_beside_vanilla_and_its_dry_run_plans_the_published_rows(tmp_path):
    """`fastvid_qwen`: FastVID's Qwen2.5-VL release (R = 0.27 on VideoMME) and vanilla, at the frames, pixel bounds and
    position numbering the sweep names; the one published figure is FastVID's own log's."""
    table = paper("fastvid_qwen")
    assert table.set_index("method").loc["fastvid", ["retained_ratio", "videomme_wo_sub"]].tolist() == [0.241, 62.9]
    cells = sweep_cells("fastvid_qwen")
    assert {(c["model"], c["frames"], c["model.max_pixels"], c["model.position_numbering"]) for c in cells} == {
        ("qwen2_5_vl_7b", "64", "401408", "released")}  # fmt: skip
    assert int(cells[0]["model.max_pixels"]) == max(16384 * 28 * 28 * 2 // 64, int(1.05 * 16 * 28 * 28))
    proc = run_app("+sweep=fastvid_qwen", "dry_run=true", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = pd.read_csv(tmp_path / "fastvid_qwen" / "plan.csv")
    named = [s for s in SETTINGS if s in table.columns]  # what the published rows name
    planned = sorted(row_key(r["model"], r["method"], r["frames"], {s: r[s] for s in named}) for r in plan.to_dict("records"))
    assert planned == sorted(row_key(r.model, r.method, r.frames, r._asdict()) for r in table.itertuples())
    assert plan[plan.method == "fastvid"].tau.tolist() == [0.84]  # the Qwen2.5-VL release's, what the cell runs

"""The report: the paper's layout, our values beside the paper's, marks and dashes, from hand-made cells."""

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dycoke_eval.accounting import plan_row
from dycoke_eval.config import CONF_DIR
from dycoke_eval.report import cell_rows, render, render_report

QA = {"activitynetqa_deferred": {"gpt_eval_accuracy,none": 50.0, "gpt_eval_score,none": 2.8},
      "nextqa_mc_test": {"exact_match,none": 0.78}, "videomme": {"videomme_perception_score,none": 58.0}}  # fmt: skip


def write_cell(results_dir, name, overrides, metrics, recorded_plan=True, **run_fields):
    """A cell folder as the app writes it (format 2, its plan recorded); `recorded_plan=False` writes one from
    before run.json recorded plans, whose config has no accounting dimensions either. `run_fields` add to run.json."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["tasks=table1", *overrides])
    cell = results_dir / "cells" / name
    cell.mkdir(parents=True)
    run = {"config": OmegaConf.to_container(cfg, resolve=True), "method": instantiate(cfg.method).describe(), "complete": True}
    if recorded_plan:
        run.update(format=2, plan=plan_row(cfg))
    (cell / "run.json").write_text(json.dumps({**run, **{key: value(cfg) for key, value in run_fields.items()}}))
    (cell / "results.json").write_text(json.dumps({"results": metrics}))
    return cell


@pytest.fixture
def report(tmp_path):
    write_cell(tmp_path, "full", ["model=llava_ov_7b", "method=full"], QA)
    nextqa = lambda v: {**QA, "nextqa_mc_test": {"exact_match,none": v}}  # noqa: E731
    write_cell(tmp_path, "fastv", ["model=llava_ov_7b", "method=fastv"], nextqa(0.70))
    write_cell(tmp_path, "dycoke", ["model=llava_ov_7b", "method=dycoke", "method.k=0.7"], nextqa(0.75))
    write_cell(tmp_path, "prumerge", ["model=llava_ov_7b", "method=prumerge"], nextqa(0.60))
    measured = {"nextqa_mc_test": {"method_stats_mean": {"retained_ratio": 0.31}}, "videomme": {"method_stats_mean": {}}}
    results_file = tmp_path / "cells" / "prumerge" / "results.json"
    results_file.write_text(json.dumps({**json.loads(results_file.read_text()), "dycoke_eval": measured}))
    write_cell(tmp_path, "unfinished", ["model=llava_ov_7b", "method=dycoke", "method.k=0.5"], nextqa(0.99))
    (tmp_path / "cells" / "unfinished" / "run.json").write_text(json.dumps({"complete": False}))
    return tmp_path, render_report(tmp_path)


def rows(frame, model):
    return frame[frame[("", "model")] == model].set_index(("", "method"))


def test_tables_with_data_are_rendered_in_the_papers_row_order(report):
    _, tables = report
    assert 1 in tables and 5 in tables and 2 not in tables  # no MVBench cell, so no Table 2
    table1 = tables[1]
    assert list(dict.fromkeys(table1[("", "model")])) == ["llava_ov_0.5b", "llava_ov_7b", "llava_ov_72b"]
    assert list(rows(table1, "llava_ov_7b").index) == ["Full Tokens", "FastV", "PruMerge", "Ours ($K=0.3, L=3, P=0.7$)",
                                                       "Ours ($K=0.5, L=3, P=0.7$)", "Ours ($K=0.7, L=3, P=0.7$)"]  # fmt: skip


def test_each_metric_shows_ours_the_papers_and_the_difference(report):
    seven = rows(report[1][1], "llava_ov_7b")
    dycoke = seven.loc["Ours ($K=0.7, L=3, P=0.7$)"]
    assert dycoke[("nextqa_mc", "ours")] == pytest.approx(75.0) and dycoke[("nextqa_mc", "paper")] == 78.2
    assert dycoke[("nextqa_mc", "diff")] == pytest.approx(75.0 - 78.2)
    assert dycoke[("tflops", "ours")] == pytest.approx(17.86, abs=0.01)
    assert dycoke[("retained_ratio", "ours")] == pytest.approx(0.1425)  # planned: no measured ratio recorded
    assert seven.loc["PruMerge", ("retained_ratio", "ours")] == pytest.approx(0.31)  # measured, not the planned 55%


def test_best_and_second_best_among_pruning_methods_are_marked_and_missing_values_are_dashes(report):
    text = render(report[1][1], "md")
    seven = text[text[("", "model")] == "llava_ov_7b"].set_index(("", "method"))
    assert seven.loc["Ours ($K=0.7, L=3, P=0.7$)", ("nextqa_mc", "ours")] == "**75.00**"
    assert seven.loc["FastV", ("nextqa_mc", "ours")] == "<u>70.00</u>"
    assert seven.loc["PruMerge", ("nextqa_mc", "ours")] == "60.00"
    assert seven.loc["Full Tokens", ("nextqa_mc", "ours")] == "78.00"  # full tokens is never ranked
    assert seven.loc["Ours ($K=0.5, L=3, P=0.7$)", ("nextqa_mc", "ours")] == "-"  # its cell never finished
    assert seven.loc["FastV", ("videodc", "ours")] == "-"


def test_markdown_latex_and_csv_are_written(report):
    results_dir, _ = report
    out = results_dir / "report"
    assert "| llava_ov_7b" in (out / "table1.md").read_text()
    assert r"\textbf{75.00}" in (out / "table1.tex").read_text()
    csv = (out / "table1.csv").read_text().splitlines()
    assert csv[0].startswith("model,method,retained_ratio ours,retained_ratio paper") and ",-," in csv[1]


def test_accuracy_against_tflops_is_plotted_per_model_with_its_data(report):
    results_dir, _ = report
    png = results_dir / "report" / "table1_llava_ov_7b_accuracy_vs_tflops.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = pd.read_csv(png.with_suffix(".csv"))
    ours = points[points.source == "ours"].set_index("method")
    assert set(ours.index) == {"Full Tokens", "FastV", "PruMerge", "Ours ($K=0.7, L=3, P=0.7$)"}
    assert ours.loc["FastV", "accuracy"] == pytest.approx((50.0 + 70.0 + 58.0) / 3)  # ActNet acc, NExT-QA, VideoMME
    assert len(points[points.source == "paper"]) == 6


def test_cells_that_differ_in_any_method_setting_never_share_a_row(tmp_path):
    nextqa = lambda v: {"nextqa_mc_test": {"exact_match,none": v}}  # noqa: E731
    seven = ["model=llava_ov_7b"]
    write_cell(tmp_path, "fastv_paper", [*seven, "method=fastv"], nextqa(0.70))
    write_cell(tmp_path, "fastv_other", [*seven, "method=fastv", "method.layer=2", "method.ratio=0.5"], nextqa(0.10))
    write_cell(tmp_path, "prumerge_base", [*seven, "method=prumerge"], nextqa(0.60))
    write_cell(tmp_path, "prumerge_plus", [*seven, "method=prumerge", "method.variant=plus"], nextqa(0.65))
    write_cell(tmp_path, "dycoke_paper", [*seven, "method=dycoke", "method.k=0.7"], nextqa(0.75))
    write_cell(tmp_path, "dycoke_official", [*seven, "method=dycoke", "method.k=0.7", "method.mode=official"], nextqa(0.77))
    table = rows(render_report(tmp_path, [1])[1], "llava_ov_7b")[("nextqa_mc", "ours")]
    assert table["FastV"] == pytest.approx(70.0)  # the paper's K=5, R=35%; the layer-2 cell matches no paper row
    assert 10.0 not in set(table.dropna())
    assert table["PruMerge [variant=base]"] == pytest.approx(60.0)
    assert table["PruMerge [variant=plus]"] == pytest.approx(65.0)
    assert table["Ours ($K=0.7, L=3, P=0.7$) [mode=official]"] == pytest.approx(77.0)
    assert table["Ours ($K=0.7, L=3, P=0.7$) [mode=paper]"] == pytest.approx(75.0)


def test_the_plan_recorded_at_run_time_is_used_without_the_methods_code(tmp_path):
    cell = write_cell(tmp_path, "fastv", ["model=llava_ov_7b", "method=fastv"], QA, format=lambda _: 2, plan=plan_row)
    run = json.loads((cell / "run.json").read_text())
    run["config"]["method"]["_target_"] = "dycoke_eval.methods.renamed.FastV"  # today's code could not rebuild it
    run["plan"]["tflops"] = 12.5
    (cell / "run.json").write_text(json.dumps(run))
    (row,) = cell_rows(tmp_path).to_dict("records")
    assert row["method"] == "fastv" and row["tflops"] == 12.5 and row["nextqa_mc"] == pytest.approx(78.0)


def test_a_cell_without_a_plan_is_skipped_naming_the_cell_and_the_fix(tmp_path, capsys):
    write_cell(tmp_path, "old_fastv", ["model=llava_ov_7b", "method=fastv"], QA, recorded_plan=False)
    assert cell_rows(tmp_path).empty
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "old_fastv" in line]
    assert line.startswith("report: skipped cell old_fastv: no plan") and "force=true" in line

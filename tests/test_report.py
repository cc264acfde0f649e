"""The report: the paper's layout, our values beside the paper's, marks and dashes, from hand-made cells."""

import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dycoke_eval.config import CONF_DIR
from dycoke_eval.plans import plan_row
from dycoke_eval.plots import accuracy_label, accuracy_points, draw_points, spread_x
from dycoke_eval.report import (
    MVBENCH_CODES,
    PAPER_DIR,
    build_table,
    cell_rows,
    compact,
    paper_tables,
    render,
    render_report,
    to_latex,
)
from dycoke_eval.store import CellStore

QA = {"activitynetqa_deferred": {"gpt_eval_accuracy,none": 50.0, "gpt_eval_score,none": 2.8},
      "nextqa_mc_test": {"exact_match,none": 0.78}, "videomme": {"videomme_perception_score,none": 58.0}}  # fmt: skip
MEASURED = {"memory_peak_gb": {"peak_reserved_gb": 10.0}, "seconds_mean": {}, "prefill_mean_s": 0.1, "kv_cache_bytes_mean": 2**20}


def write_cell(results_dir, name, overrides, metrics, recorded_plan=True, samples=None, measured=None, **run_fields):
    """A cell folder as the app writes it (format 2, its plan recorded); `recorded_plan=False` writes one from
    before run.json recorded plans, whose config has no accounting dimensions either. `samples`: the per-task
    summaries' sample count (none by default, as cells that recorded none); `measured`: efficiency figures added
    to every task's summary. `run_fields` add to run.json."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["tasks=table1", *overrides])
    cell = results_dir / "cells" / name
    cell.mkdir(parents=True)
    run = {"config": OmegaConf.to_container(cfg, resolve=True), "method": instantiate(cfg.method).describe(), "complete": True}
    if recorded_plan:
        run.update(format=2, plan=plan_row(cfg))
    (cell / "run.json").write_text(json.dumps({**run, **{key: value(cfg) for key, value in run_fields.items()}}))
    summaries = {task: {"samples": samples, "failed": 0, **(measured or {})} for task in metrics} if samples else {}
    (cell / "results.json").write_text(json.dumps({"results": metrics, **({"dycoke_eval": summaries} if summaries else {})}))
    return cell


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
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
    assert list(rows(table1, "llava_ov_7b").index) == ["Full Tokens", "FastV", "PruMerge", "DyCoke ($K=0.3, L=3, P=0.7$)",
                                                       "DyCoke ($K=0.5, L=3, P=0.7$)",
                                                       "DyCoke ($K=0.7, L=3, P=0.7$)"]  # fmt: skip


def test_each_metric_shows_ours_the_papers_and_the_difference(report):
    seven = rows(report[1][1], "llava_ov_7b")
    dycoke = seven.loc["DyCoke ($K=0.7, L=3, P=0.7$)"]
    assert dycoke[("nextqa_mc", "ours")] == pytest.approx(75.0) and dycoke[("nextqa_mc", "paper")] == 78.2
    assert dycoke[("nextqa_mc", "diff")] == pytest.approx(75.0 - 78.2)
    assert dycoke[("tflops", "ours")] == pytest.approx(17.86, abs=0.01)
    assert dycoke[("retained_ratio", "ours")] == pytest.approx(0.1425)  # planned: no measured ratio recorded
    assert seven.loc["PruMerge", ("retained_ratio", "ours")] == pytest.approx(0.31)  # measured, not the planned 55%


def test_best_and_second_best_among_pruning_methods_are_marked_and_missing_values_are_dashes(report):
    text = render(report[1][1], "md")
    seven = text[text[("", "model")] == "llava_ov_7b"].set_index(("", "method"))
    assert seven.loc["DyCoke ($K=0.7, L=3, P=0.7$)", ("nextqa_mc", "ours")] == "**75.00**"
    assert seven.loc["FastV", ("nextqa_mc", "ours")] == "<u>70.00</u>"
    assert seven.loc["PruMerge", ("nextqa_mc", "ours")] == "60.00"
    assert seven.loc["Full Tokens", ("nextqa_mc", "ours")] == "78.00"  # full tokens is never ranked
    assert seven.loc["DyCoke ($K=0.5, L=3, P=0.7$)", ("nextqa_mc", "ours")] == "-"  # its cell never finished
    assert seven.loc["FastV", ("videodc", "ours")] == "-"


def test_markdown_latex_and_csv_are_written(report):
    results_dir, _ = report
    out = results_dir / "report"
    assert "| llava_ov_7b" in (out / "table1.md").read_text()
    tex = (out / "table1.tex").read_text()
    assert r"\textbf{75.00}" in tex and r"llava\_ov\_7b" in tex and r"100.00\%" in tex and "retained\\_ratio &" in tex
    csv = (out / "table1.csv").read_text().splitlines()
    assert csv[0].startswith("model,method,retained_ratio ours,retained_ratio paper") and ",-," in csv[1]


def cells(markdown: str, **where: str) -> dict[str, str]:
    """{header: cell} of the first row of the markdown table with these cells (method="FastV")."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [name.strip() for name in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, [value.strip() for value in line.strip("|").split("|")], strict=True)) for line in lines[2:]]
    return next(row for row in rows if all(row[name] == value for name, value in where.items()))


def test_the_default_table_shows_ours_with_our_difference_from_the_paper_one_column_per_metric(report):
    out = report[0] / "report"
    settings = ("table", "model", "row", "method", "k", "l", "p", "layer", "ratio", "frames")
    metrics = [column for column in pd.read_csv(PAPER_DIR / "table1.csv").columns if column not in settings]
    dycoke = cells((out / "table1.md").read_text(), model="llava_ov_7b", method="DyCoke ($K=0.7, L=3, P=0.7$)")
    assert list(dycoke) == ["model", "method", *metrics]  # 12 columns, not 2 + 3 x 11
    assert dycoke["nextqa_mc"] == "**75.00** (-3.20)"  # ours, marked as ours ranks, and ours minus the paper's 78.2
    assert dycoke["retained_ratio"] == "14.25% (+0.00%)" and dycoke["videodc"] == "-"  # no VideoDC cell: a dash
    assert "ours (ours minus the paper's)" in (out / "table1.md").read_text()
    wide = cells((out / "table1_wide.md").read_text(), model="llava_ov_7b", method="DyCoke ($K=0.7, L=3, P=0.7$)")
    assert [wide[f"nextqa_mc {part}"] for part in ("ours", "paper", "diff")] == ["**75.00**", "78.20", "-3.20"]
    assert len(pd.read_csv(out / "table1.csv").columns) == 2 + 3 * len(metrics)  # the CSV keeps every figure


def tex_structure(tex: str) -> tuple[int, list[int]]:
    """The tabular's declared column count and each of its rows' cell counts; asserts that the document is well formed:
    braces balanced, every \\begin closed by its \\end in order, no command outside graphicx, booktabs and LaTeX itself."""
    body = re.sub(r"\\[{}$%_&#]", "", re.sub(r"(?m)(?<!\\)%.*$", "", tex))  # comments and escaped characters out
    depth = 0
    for character in body:
        depth += {"{": 1, "}": -1}.get(character, 0)
        assert depth >= 0
    assert depth == 0
    environments = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", body):
        if kind == "begin":
            environments.append(name)
        else:
            assert environments.pop() == name
    assert not environments
    commands = set(re.findall(r"\\([a-zA-Z]+)", body))
    assert commands <= {"resizebox", "ifdim", "width", "linewidth", "else", "fi", "begin", "end", "toprule", "midrule",
                        "bottomrule", "textbf", "underline"}, commands  # fmt: skip
    (columns,) = re.findall(r"\\begin\{tabular\}\{([lrc]+)\}", body)
    rows = body.split(r"\midrule")[1].split(r"\bottomrule")[0].split("\\\\")[:-1]
    header = body.split(r"\toprule")[1].split(r"\midrule")[0]
    return len(columns), [header.count("&") + 1, *(row.count("&") + 1 for row in rows)]


def test_the_latex_table_fits_the_page_and_is_well_formed(report):
    for path in sorted((report[0] / "report").glob("*.tex")):
        tex = path.read_text()
        assert tex.startswith("% Needs \\usepackage{graphicx}") and r"\resizebox{\ifdim\width>\linewidth" in tex, path.name
        columns, cells_per_row = tex_structure(tex)
        assert set(cells_per_row) == {columns}, path.name  # the header's cells, every row's and the declared columns agree


def every_row(table, paper_dir=PAPER_DIR, for_plot=False) -> pd.DataFrame:
    """The table with every paper row, and the rows of a model the paper lacks (one cell with every metric)."""
    stem = f"table{table}" if isinstance(table, int) else table
    metrics = set(pd.read_csv(paper_dir / f"{stem}.csv").columns) - {"table", "row", "R", "model", "method", "frames"}
    ours = pd.DataFrame([{
        "model": "tiny", "method": "full", "frames": 8, "settings": "{}", "run": "{}", "cell": "tiny_full", "limit": None,
        "counts": {}, "sources": {}, **dict.fromkeys(metrics, 1.0),
    }])  # fmt: skip
    return build_table(table, ours, paper_dir, for_plot=for_plot)


@pytest.mark.parametrize("table", paper_tables())
def test_no_row_is_labelled_with_the_papers_ours(table):
    """The paper's "Ours" is the paper's method; in our report it would read as our runs, so the method is named."""
    labels = every_row(table)[("", "method")]
    assert not [label for label in labels if re.search(r"\bours?\b", label, re.IGNORECASE)]


def test_the_papers_self_reference_becomes_the_methods_name(tmp_path):
    assert every_row(1)[("", "method")].iloc[3] == "DyCoke ($K=0.3, L=3, P=0.7$)"  # "Ours ($K=0.3, L=3, P=0.7$)"
    assert every_row(7)[("", "method")].iloc[3] == "DyCoke (K=0.5)"  # "Ours (K=0.5)"
    paper = pd.read_csv(PAPER_DIR / "fastvid_table2.csv")
    paper["row"] = paper["row"].replace({"Fixed-interval": "Fixed-interval (Ours)", "Cluster-based": "Ours (cluster-based)"})
    paper.to_csv(tmp_path / "fastvid_table2.csv", index=False)
    labels = every_row("fastvid_table2", tmp_path)[("", "method")].tolist()
    assert labels[:4] == ["Vanilla (Table 1)", "Fixed-interval", "FastVID (cluster-based)", "FastVID (DySeg)"]  # "Our DySeg"


@pytest.mark.parametrize("table", paper_tables())
def test_every_table_shows_a_dash_where_a_value_is_missing_never_nan(table):
    frame = every_row(table)  # the paper's rows have none of our values, and the tiny model's rows none of the paper's
    texts = [*compact(frame, "md").to_numpy().ravel(), *render(frame, "md").to_numpy().ravel(), to_latex(frame)]
    assert not [text for text in texts if re.search(r"\bnan\b", text, re.IGNORECASE)]
    assert "-" in texts


def test_nan_is_never_printed_a_missing_value_is_a_dash(tmp_path):
    """A measured cell without a full-tokens cell to compare with has no speed-up; rows without our cells have no values."""
    measured = {**MEASURED, "latency_total_s": 4.0}
    write_cell(tmp_path, "dycoke", ["model=llava_ov_7b", "frames=16", "method=dycoke", "method.k=0.7"],
               {"mvbench_action_antonym": {"mvbench_accuracy,none": 50.0}}, samples=2, measured=measured)  # fmt: skip
    render_report(tmp_path, [3])
    written = [path for suffix in ("md", "tex") for path in (tmp_path / "report").glob(f"*.{suffix}")]
    assert not [path.name for path in written if re.search(r"\bnan\b", path.read_text(), re.IGNORECASE)]
    assert cells((tmp_path / "report" / "efficiency.md").read_text(), method="dycoke")["speedup"] == "-"
    assert {"efficiency.md", "table3.md", "table3_wide.md", "table3.tex"} <= {path.name for path in written}


def test_accuracy_against_tflops_is_plotted_per_model_with_its_data(report):
    results_dir, _ = report
    png = results_dir / "report" / "table1_llava_ov_7b_accuracy_vs_tflops.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = pd.read_csv(png.with_suffix(".csv"))
    ours = points[points.source == "ours"].set_index("row")
    assert set(ours.index) == {"Full Tokens", "FastV", "PruMerge", "DyCoke ($K=0.7, L=3, P=0.7$)"}
    assert set(ours.series) == {"Full tokens", "FastV", "PruMerge", "DyCoke"}  # the legend's words (`series_name`)
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
    assert table["DyCoke ($K=0.7, L=3, P=0.7$) [mode=official]"] == pytest.approx(77.0)
    assert table["DyCoke ($K=0.7, L=3, P=0.7$) [mode=paper]"] == pytest.approx(75.0)


def test_the_plan_recorded_at_run_time_is_used_without_the_methods_code(tmp_path):
    cell = write_cell(tmp_path, "fastv", ["model=llava_ov_7b", "method=fastv"], QA, format=lambda _: 2, plan=plan_row)
    run = json.loads((cell / "run.json").read_text())
    run["config"]["method"]["_target_"] = "dycoke_eval.methods.renamed.FastV"  # today's code could not rebuild it
    run["plan"]["tflops"] = 12.5
    (cell / "run.json").write_text(json.dumps(run))
    (row,) = cell_rows(CellStore(tmp_path).cells()).to_dict("records")
    assert row["method"] == "fastv" and row["tflops"] == 12.5 and row["nextqa_mc"] == pytest.approx(78.0)


def test_a_cell_without_a_plan_is_skipped_naming_the_cell_and_the_fix(tmp_path, capsys):
    write_cell(tmp_path, "old_fastv", ["model=llava_ov_7b", "method=fastv"], QA, recorded_plan=False)
    assert cell_rows(CellStore(tmp_path).cells()).empty
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "old_fastv" in line]
    assert line.startswith("report: skipped cell old_fastv: no plan") and "force=true" in line


# Which cell fills a row, and what a row says about itself


def test_a_limited_cell_beside_a_full_one_is_skipped_with_a_warning_and_the_full_ones_numbers_are_shown(tmp_path, capsys):
    nextqa = lambda v: {**QA, "nextqa_mc_test": {"exact_match,none": v}}  # noqa: E731
    seven = ["model=llava_ov_7b"]
    write_cell(tmp_path, "a_full", [*seven, "method=full"], nextqa(1 / 3), samples=3)
    write_cell(tmp_path, "b_full_limit1", [*seven, "method=full", "limit=1"], nextqa(0.0), samples=1)  # sorts last
    write_cell(tmp_path, "fastv", [*seven, "method=fastv"], nextqa(0.30), samples=3)
    write_cell(tmp_path, "tiny", ["model=tiny", "method=full"], nextqa(0.5), samples=3)  # its rows without a cell: no frames
    table = rows(render_report(tmp_path, [1])[1], "llava_ov_7b")
    assert table.loc["Full Tokens", ("nextqa_mc", "ours")] == pytest.approx(100 / 3)
    assert ("", "samples") not in table.columns and ("", "frames") not in table.columns  # the same samples, 32 frames
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "b_full_limit1" in line]
    assert warning.startswith("report: table 1: llava_ov_7b 'Full Tokens': skipped cell b_full_limit1: it has 1 sample in each")
    assert "the table's rows have 3 samples in each of 3 tasks (activitynetqa_deferred, nextqa_mc_test, videomme)" in warning


def test_a_row_with_only_a_smaller_evaluation_shows_its_sample_count_and_says_so(tmp_path, capsys):
    nextqa = lambda v: {**QA, "nextqa_mc_test": {"exact_match,none": v}}  # noqa: E731
    seven = ["model=llava_ov_7b"]
    write_cell(tmp_path, "full", [*seven, "method=full"], nextqa(1 / 3), samples=3)
    write_cell(tmp_path, "fastv", [*seven, "method=fastv"], nextqa(0.30), samples=3)
    write_cell(tmp_path, "dycoke_limit1", [*seven, "method=dycoke", "method.k=0.7", "limit=1"], nextqa(1.0), samples=1)
    write_cell(tmp_path, "dycoke_limit2", [*seven, "method=dycoke", "method.k=0.7", "limit=2"], nextqa(0.5), samples=2)
    table = rows(render_report(tmp_path, [1])[1], "llava_ov_7b")
    assert table[("", "samples")].to_dict() == {
        "Full Tokens": "3 x 3 tasks", "FastV": "3 x 3 tasks", "PruMerge": "-", "DyCoke ($K=0.3, L=3, P=0.7$)": "-",
        "DyCoke ($K=0.5, L=3, P=0.7$)": "-", "DyCoke ($K=0.7, L=3, P=0.7$)": "2 x 3 tasks",
    }  # fmt: skip
    assert table.loc["DyCoke ($K=0.7, L=3, P=0.7$)", ("nextqa_mc", "ours")] == pytest.approx(50.0)  # the larger of the two
    out = capsys.readouterr().out
    assert "skipped cell dycoke_limit1: it has 1 sample in each of 3 tasks" in out
    assert "cell dycoke_limit2, which is shown, has 2 samples in each of 3 tasks" in out
    assert "'DyCoke ($K=0.7, L=3, P=0.7$)' comes from cell dycoke_limit2, which has 2 samples in each of 3 tasks" in out
    assert "| samples" in (tmp_path / "report" / "table1.md").read_text()


def test_speedup_is_against_full_tokens_that_evaluated_the_same_samples(tmp_path):
    mvbench = {"mvbench_action_antonym": {"mvbench_accuracy,none": 50.0}}
    measured = lambda seconds: {**MEASURED, "latency_total_s": seconds}  # noqa: E731
    seven = ["model=llava_ov_7b", "frames=16"]
    write_cell(tmp_path, "full", [*seven, "method=full"], mvbench, samples=4, measured=measured(8.0))
    write_cell(tmp_path, "full_limit1", [*seven, "method=full", "limit=1"], mvbench, samples=1, measured=measured(5.0))
    write_cell(tmp_path, "dycoke", [*seven, "method=dycoke", "method.k=0.7"], mvbench, samples=4, measured=measured(4.0))
    table = render_report(tmp_path, [3])[3]
    table = rows(table[table[("", "frames")] == "16"], "llava_ov_7b")
    assert table.loc["Full Tokens", ("latency_per_example_s", "ours")] == pytest.approx(2.0)  # 8 s over 4, not 5 s over 1
    assert table.loc["DyCoke ($K = 0.7$)", ("speedup", "ours")] == pytest.approx(2.0)
    summary = pd.read_csv(tmp_path / "report" / "efficiency.csv").set_index("samples")
    assert summary.loc[4].set_index("method").loc["dycoke", "speedup"] == pytest.approx(2.0)


def test_the_efficiency_summary_gives_the_models_speedup_beside_the_end_to_end_one(tmp_path):
    mvbench = {"mvbench_action_antonym": {"mvbench_accuracy,none": 50.0}}
    seven = ["model=llava_ov_7b", "frames=16"]
    cells_run = {  # name: (overrides, end-to-end seconds in all, the model's seconds per example)
        "full": (["method=full"], 8.0, 1.0),
        "dycoke": (["method=dycoke", "method.k=0.7"], 4.0, 0.25),
        "fastv": (["method=fastv"], 6.0, None),  # measured before samples recorded the model's seconds
    }
    for name, (overrides, end_to_end, model) in cells_run.items():
        measured = {**MEASURED, "latency_total_s": end_to_end, "seconds_mean": {"model_latency": model} if model else {}}
        write_cell(tmp_path, name, [*seven, *overrides], mvbench, samples=4, measured=measured)
    table = render_report(tmp_path, [3])[3]
    table = rows(table[table[("", "frames")] == "16"], "llava_ov_7b")
    assert table.loc["DyCoke ($K = 0.7$)", ("speedup", "ours")] == pytest.approx(2.0)  # end to end, beside the paper's
    summary = pd.read_csv(tmp_path / "report" / "efficiency.csv").set_index("method")
    assert summary.loc["dycoke", ["speedup", "model_speedup"]].tolist() == pytest.approx([2.0, 4.0])
    assert summary.loc["dycoke", "model_latency_per_example_s"] == pytest.approx(0.25)
    assert summary.loc["fastv", "speedup"] == pytest.approx(8.0 / 6.0) and np.isnan(summary.loc["fastv", "model_speedup"])
    efficiency = (tmp_path / "report" / "efficiency.md").read_text()
    assert cells(efficiency, method="fastv")["model_speedup"] == "-" and "model_speedup: the model alone" in efficiency


def test_rows_that_differ_in_frames_show_their_frames(tmp_path):
    mvbench = {"mvbench_action_antonym": {"mvbench_accuracy,none": 50.0}}
    for frames in (16, 32):
        write_cell(tmp_path, f"full{frames}", ["model=llava_ov_7b", "method=full", f"frames={frames}"], mvbench, samples=4,
                   measured={**MEASURED, "latency_total_s": frames / 4})  # fmt: skip
    table = render_report(tmp_path, [3])[3]
    seven = table[table[("", "model")] == "llava_ov_7b"].set_index([("", "frames"), ("", "method")])
    assert seven.loc[("16", "Full Tokens"), ("latency_per_example_s", "ours")] == pytest.approx(1.0)
    assert seven.loc[("32", "Full Tokens"), ("latency_per_example_s", "ours")] == pytest.approx(2.0)
    header = (tmp_path / "report" / "table3.md").read_text().splitlines()[2]
    assert [name.strip() for name in header.split("|")[1:4]] == ["model", "method", "frames"]


def test_ablation_rows_say_which_settings_they_ran(tmp_path):
    nextqa = lambda v: {"nextqa_mc_test": {"exact_match,none": v}}  # noqa: E731
    seven = ["model=llava_ov_7b", "method=dycoke", "method.k=0.7"]
    write_cell(tmp_path, "l3", seven, nextqa(0.75))
    write_cell(tmp_path, "l10", [*seven, "method.l=10"], nextqa(0.70))
    write_cell(tmp_path, "no_dp", ["model=llava_ov_7b", "method=dycoke_no_dp", "method.k=0.7"], nextqa(0.65))
    table = rows(render_report(tmp_path, [5])[5], "llava_ov_7b")[("nextqa_mc", "ours")]
    assert list(table.index) == [
        "Full Tokens", "w/o DP", "Random Pruning", "DyCoke (K=0.7, L=3, P=0.7)", "DyCoke (K=0.7, L=10, P=0.7)",
        "DyCoke (K=0.7, L=3, P=0.9)", "DyCoke (K=0.9, L=0, P=0.9)",
    ]  # fmt: skip
    assert table.dropna().to_dict() == pytest.approx(
        {"w/o DP": 65.0, "DyCoke (K=0.7, L=3, P=0.7)": 75.0, "DyCoke (K=0.7, L=10, P=0.7)": 70.0}
    )


@pytest.mark.parametrize("table", range(1, 8))
def test_no_table_has_two_rows_that_read_the_same(table):
    """Every paper row, and a model the paper lacks, rendered: no two rows with the same model, frames and label."""
    frame = every_row(table)
    shown = [column for column in (("", "model"), ("", "frames"), ("", "method")) if column in frame.columns]
    names = frame[shown].apply(tuple, axis=1)
    assert not names.duplicated().any(), names[names.duplicated(keep=False)].tolist()


# Plots


def test_every_point_of_a_plot_averages_the_same_metrics(tmp_path):
    seven = ["model=llava_ov_7b"]
    write_cell(tmp_path, "full", [*seven, "method=full"], QA)  # ActivityNet-QA, NExT-QA and VideoMME
    write_cell(tmp_path, "fastv", [*seven, "method=fastv"], {"nextqa_mc_test": {"exact_match,none": 0.70}})  # NExT-QA only
    render_report(tmp_path, [1])
    points = pd.read_csv(tmp_path / "report" / "table1_llava_ov_7b_accuracy_vs_tflops.csv")
    assert set(points.metrics) == {"nextqa_mc"}
    ours = points[points.source == "ours"].set_index("row").accuracy
    assert ours.to_dict() == pytest.approx({"Full Tokens": 78.0, "FastV": 70.0})  # not Full's mean of three
    paper = points[points.source == "paper"].set_index("row").accuracy
    assert paper["FastV"] == pytest.approx(78.2)


def test_a_point_sharing_no_metric_with_the_others_is_left_out_with_a_note(capsys):
    frame = pd.DataFrame(
        [["m", "Full Tokens", "Full tokens", 10.0, 50.0, 60.0, float("nan")],
         ["m", "FastV", "FastV", 5.0, float("nan"), 40.0, 45.0], ["m", "Odd", "Odd", 7.0, 30.0, float("nan"), float("nan")]],
        columns=pd.MultiIndex.from_tuples([("", "model"), ("", "method"), ("", "series"), ("tflops", "ours"), ("a", "ours"),
                                           ("b", "ours"), ("c", "ours")]),
    )  # fmt: skip
    for metric in ("tflops", "a", "b", "c"):
        frame[(metric, "paper")] = float("nan")
    points, notes = accuracy_points(frame)
    assert notes == ["m: left out Odd (ours): it has only a"]
    assert points.set_index("row").accuracy.to_dict() == {"Full Tokens": 60.0, "FastV": 40.0} and set(points.metrics) == {"b"}


def test_the_papers_point_is_drawn_above_ours_in_another_marker_so_coinciding_points_both_show():
    figure, axes = plt.subplots()
    points = pd.DataFrame({"series": ["DyCoke", "DyCoke"], "source": ["ours", "paper"], "tflops": [17.9, 17.9],
                           "accuracy": [58.0, 58.0]})  # fmt: skip
    draw_points(axes, points)
    ours, paper = axes.collections
    plt.close(figure)
    assert paper.get_zorder() > ours.get_zorder() and paper.get_sizes()[0] > ours.get_sizes()[0]
    assert paper.get_facecolor().size == 0 or paper.get_facecolor()[0][3] == 0  # an outline: ours shows through it
    assert not np.array_equal(paper.get_paths()[0].vertices, ours.get_paths()[0].vertices)  # a different marker
    assert (ours.get_offsets() == paper.get_offsets()).all()  # one row's two points: not spread apart


# FastVID's Table 1 as planned for LLaVA-OV-7B (TFLOPs, eq. 8): vanilla, DyCoke (TTM) at 32% and 25%, FastV at R = 25/20/15/10%
# and four pre-LLM methods at each R, which keep as many tokens as each other and so cost the same.
FASTVID_TFLOPS = [41.42, 12.0, 9.27, 11.56, 9.86, 8.2, 6.58] + [9.27, 7.4, 5.58, 3.8] * 4
PRE_LLM = ["VisionZip", "VisionZip (form=in_encoder)", "PruneVid", "FastVID"]


def tick_labels(tflops: list[float]) -> tuple[list[tuple[float, str]], bool, str]:
    """Draw points at these TFLOPs; (tick, label) of the labelled ticks in view, whether any two labels overlap, and
    the axis's offset text."""
    figure, axes = plt.subplots(figsize=(8, 4))
    draw_points(axes, pd.DataFrame({"series": [f"m{i}" for i in range(len(tflops))], "source": "ours", "tflops": tflops,
                                    "accuracy": 50.0}))  # fmt: skip
    figure.tight_layout()
    figure.canvas.draw()
    low, high = axes.get_xlim()
    ticks = [(tick, label) for tick, label in zip(axes.get_xticks(), axes.get_xticklabels(), strict=True)
             if low <= tick <= high and label.get_text()]  # fmt: skip
    boxes = [label.get_window_extent() for _, label in ticks]
    overlap = any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    offset = axes.xaxis.get_offset_text().get_text()
    plt.close(figure)
    return [(tick, label.get_text()) for tick, label in ticks], overlap, offset


@pytest.mark.parametrize("tflops, log", [(FASTVID_TFLOPS, True), ([17.9, 30.8, 24.1, 36.0], False), ([3.8, 3.8], False),
                                         ([1234.5, 1234.6], False)])  # fmt: skip
def test_tflops_ticks_are_a_few_plain_numbers_that_do_not_overlap(tflops, log):
    """FastVID's TFLOPs span a decade: a log axis. Each label is its tick's value as a plain number: no offset, no
    powers of ten, so '1234.5' reads as itself."""
    ticks, overlap, offset = tick_labels(tflops)
    assert 3 <= len(ticks) <= 7 and not overlap and offset == ""
    assert all(float(label) == pytest.approx(tick) for tick, label in ticks)
    figure, axes = plt.subplots()
    draw_points(axes, pd.DataFrame({"series": "m", "source": "ours", "tflops": tflops, "accuracy": 50.0}))
    assert axes.get_xscale() == ("log" if log else "linear")
    plt.close(figure)


def test_points_of_different_series_at_the_same_tflops_are_spread_apart_and_keep_their_tflops():
    series = ["Full tokens", *[name for name in PRE_LLM for _ in range(4)]]
    points = pd.DataFrame({"series": series, "source": "ours", "tflops": [41.42, *[9.27, 7.4, 5.58, 3.8] * 4], "accuracy": 55.0})
    points = pd.concat([points, points.assign(source="paper")], ignore_index=True)
    drawn = spread_x(points, log=True)
    at_r25 = drawn[points.tflops == 9.27]
    assert at_r25.nunique() == 4 and (at_r25.groupby(points.series).nunique() == 1).all()  # ours and the paper's together
    assert np.log10(at_r25).mean() == pytest.approx(np.log10(9.27)) and (abs(at_r25 / 9.27 - 1) < 0.1).all()  # still at R=25%
    assert drawn[points.series == "Full tokens"].eq(41.42).all()  # alone at its TFLOPs: where it is
    figure, axes = plt.subplots()
    draw_points(axes, points)
    drawn_x = sorted({round(x, 6) for collection in axes.collections for x, _ in collection.get_offsets()})
    plt.close(figure)
    assert len(drawn_x) == 1 + 4 * 4


def test_the_accuracy_axis_says_in_words_what_is_averaged(report):
    points = pd.read_csv(report[0] / "report" / "table1_llava_ov_7b_accuracy_vs_tflops.csv")
    label = accuracy_label(points.metrics.iloc[0].split()).replace("\n", " ")
    assert label == "Mean accuracy over ActivityNet-QA, NExT-QA and VideoMME without subtitles (%)"
    assert accuracy_label(["accuracy"]) == "MVBench accuracy (%)"


def test_legends_name_the_same_method_and_settings_alike_in_every_table():
    """The paper's labels for one thing vary ("Full Tokens", "Full Token", "Vanilla", "Ours ($K = 0.7$)", "DyCoke");
    a legend says the method, and the settings besides its budget that differ from its config's defaults."""
    names = {}
    for table in paper_tables():
        frame = every_row(table, for_plot=True)
        for label, series in frame[frame[("", "model")] != "tiny"][[("", "method"), ("", "series")]].itertuples(index=False):
            names.setdefault(series, set()).add((table, label))
    full = {(1, "Full Tokens"), (6, "Full Token"), ("fastvid_table1", "Vanilla"), ("fastvid_table2", "Vanilla (Table 1)")}
    assert full <= names["Full tokens"]
    assert {(1, "DyCoke ($K=0.7, L=3, P=0.7$)"), (2, "DyCoke ($K = 0.7$)"), (7, "DyCoke (K=0.7)"), (6, "DyCoke"),
            (5, "DyCoke (K=0.7, L=3, P=0.7)")} <= names["DyCoke"]  # fmt: skip
    assert names["DyCoke (L=10)"] == {(5, "DyCoke (K=0.7, L=10, P=0.7)")}
    assert (1, "FastV") in names["FastV"] and ("fastvid_table1", "FastV") in names["FastV (layer=2)"]  # layers 5 and 2
    assert names["FastVID (segmentation=fixed)"] == {("fastvid_table2", "Fixed-interval")}
    assert ("fastvid_table1", "VisionZip (in encoder)") in names["VisionZip (form=in_encoder)"]


# LaTeX


def test_latex_escapes_text_and_headers_keeps_paired_dollars_as_math_and_the_marks():
    columns = [("", "model"), ("", "method"), ("nextqa_mc", "ours"), ("nextqa_mc", "paper"), ("nextqa_mc", "diff"),
               ("retained_ratio", "ours"), ("retained_ratio", "paper"), ("retained_ratio", "diff")]  # fmt: skip
    nan = float("nan")
    frame = pd.DataFrame(
        [["llava_ov_7b", "Full Tokens", 80.0, 79.4, 0.6, 1.0, nan, nan],
         ["llava_ov_7b", "DyCoke ($K=0.7$)", 75.0, 78.2, -3.2, 0.14, nan, nan],
         ["llava_ov_7b", "50% a_b & c #1 costs $5", 70.0, 78.0, -8.0, 0.35, nan, nan]],
        columns=pd.MultiIndex.from_tuples(columns),
    )  # fmt: skip
    tex = to_latex(frame)
    assert r"llava\_ov\_7b & DyCoke ($K=0.7$) & \textbf{75.00} (-3.20) & 14.00\% \\" in tex  # ours, marked; our difference
    assert r"50\% a\_b \& c \#1 costs \$5 & \underline{70.00} (-8.00)" in tex
    assert r"model & method & nextqa\_mc & retained\_ratio \\" in tex
    assert r"\begin{tabular}{llrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    body = re.sub(r"(?m)(?<!\\)%.*$", "", tex)  # comments out
    body = re.sub(r"\\[$%_&#]", "", body)  # escaped characters out
    body = re.sub(r"\$[^$]*\$", "", body)  # math out
    assert not set("%_#$") & set(body) and body.count("&") == 3 * 4  # only column separators are left


def test_tables_sharing_settings_take_the_cells_run_for_them(tmp_path, capsys):
    """Table 3's measured, one-token cells and Table 2's cells have the same settings: each table takes its own."""
    mvbench = lambda v: {f"mvbench_{name}": {"mvbench_accuracy,none": v} for name in MVBENCH_CODES}  # noqa: E731
    measured = {**MEASURED, "latency_total_s": 4.0}
    sixteen = ["model=llava_ov_7b", "frames=16"]
    write_cell(tmp_path, "full", [*sixteen, "method=full"], mvbench(50.0), samples=2)
    write_cell(tmp_path, "full_measured", [*sixteen, "method=full", "measure=true", "max_new_tokens=1"], mvbench(40.0), samples=2,
               measured=measured)  # fmt: skip
    write_cell(tmp_path, "dycoke_measured", [*sixteen, "method=dycoke", "method.k=0.7", "measure=true", "max_new_tokens=1"],
               mvbench(45.0), samples=2, measured=measured)  # fmt: skip
    tables = render_report(tmp_path, [2, 3])
    table3 = tables[3][tables[3][("", "frames")] == "16"]
    table3 = rows(table3, "llava_ov_7b")
    assert table3.loc["Full Tokens", ("accuracy", "ours")] == pytest.approx(40.0)  # the measured cell's, with latency
    assert table3.loc["Full Tokens", ("latency_per_example_s", "ours")] == pytest.approx(80.0 / 40)
    table2 = rows(tables[2], "llava_ov_7b")[("AA", "ours")]
    assert table2["Full Tokens"] == pytest.approx(40.0)  # as the DyCoke row was run: one output token
    out = capsys.readouterr().out
    assert "report: table 3: llava_ov_7b 'Full Tokens': skipped cell full: it has max_new_tokens=None; 1 of the" in out
    assert "report: table 2: llava_ov_7b 'Full Tokens': skipped cell full: it has max_new_tokens=None; the table's rows" in out

    write_cell(tmp_path, "fastv", [*sixteen, "method=fastv"], mvbench(48.0), samples=2)  # now two rows each way
    table2 = rows(render_report(tmp_path, [2])[2], "llava_ov_7b")[("AA", "ours")]
    assert table2["Full Tokens [max_new_tokens=None]"] == pytest.approx(50.0)  # a tie: the tasks' own generation length
    assert table2["DyCoke ($K = 0.7$) [max_new_tokens=1]"] == pytest.approx(45.0)  # its only cell, labelled as it ran
    out = capsys.readouterr().out
    assert "report: table 2: llava_ov_7b 'Full Tokens': skipped cell full_measured: it has max_new_tokens=1;" in out
    assert "report: table 2: llava_ov_7b 'DyCoke ($K = 0.7$)' comes from cell dycoke_measured, which has max_new_tokens=1" in out


def test_best_and_second_best_are_marked_within_one_frame_count(tmp_path):
    for frames, seconds in ((16, 1.0), (32, 3.0)):
        for method, factor in (("fastv", 1.0), ("prumerge", 2.0)):
            write_cell(tmp_path, f"{method}{frames}", ["model=llava_ov_7b", f"method={method}", f"frames={frames}"],
                       {"mvbench_action_antonym": {"mvbench_accuracy,none": 50.0}}, samples=4,
                       measured={**MEASURED, "latency_total_s": seconds * factor})  # fmt: skip
    table = render_report(tmp_path, [3])[3]
    text = rows(render(table, "md"), "llava_ov_7b").set_index(("", "frames"), append=True)[("latency_per_example_s", "ours")]
    text.index = [(frames, method) for method, frames in text.index]
    assert text[("16", "FastV")] == "**0.25**" and text[("16", "PruMerge")] == "<u>0.50</u>"
    assert text[("32", "FastV")] == "**0.75**" and text[("32", "PruMerge")] == "<u>1.50</u>"  # not against 16 frames'


def test_rendering_prints_where_each_table_went_not_the_table(report, capsys):
    results, _ = report
    render_report(results, tables=[1])
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("table 1:")]
    assert str(results / "report" / "table1.md") in line and "rows have our values" in line
    assert max(len(line) for line in out.splitlines()) < 300  # no 900-character table rows
    render_report(results, tables=[1], show=True)
    assert "Full Tokens" in capsys.readouterr().out


@pytest.mark.parametrize("endpoint, stand_in", [("http://127.0.0.1:8765/v1", True), ("https://api.openai.com/v1", False)])
def test_judged_columns_from_a_stand_in_judge_say_so_under_the_table(tmp_path, capsys, endpoint, stand_in):
    cell = write_cell(tmp_path, "full", ["model=llava_ov_7b", "method=full"], QA)
    results = json.loads((cell / "results.json").read_text())
    results["dycoke_eval_judge"] = {"judges": [{"endpoint": endpoint, "model": "gpt-4o-mini", "verdicts": 3}]}
    (cell / "results.json").write_text(json.dumps(results))
    render_report(tmp_path, [1])
    note = f"come from a stand-in judge at {endpoint}, not OpenAI's API"
    assert (note in (tmp_path / "report" / "table1.md").read_text()) is stand_in
    assert (note in capsys.readouterr().out) is stand_in


def test_the_report_command_refuses_a_missing_folder_and_an_unknown_table_in_one_line(tmp_path, capsys):
    from dycoke_eval.report import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dycoke_eval.report: no cell folders under {tmp_path}/nowhere/cells: give the results_dir a run wrote "
        "(`results` by default)"
    )
    write_cell(tmp_path, "full", ["model=llava_ov_7b", "method=full"], QA)
    assert main([str(tmp_path), "--tables", "9"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "dycoke_eval.report: --tables 9: no such paper table; tables: 1 2 3 4 5 6 7 fastvid_qwen fastvid_table1"
    )

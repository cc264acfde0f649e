"""The nightly comparator on the tiny model, and the workflow that runs it."""

import json

import pytest
import yaml
from conftest import REPO_ROOT, run_app

from dycoke_eval.nightly import main as nightly

CELL = ["tasks.names=[fixture_videomme,fixture_mvbench_action_antonym]", "frames=4", "limit=2", "run_name=nightly"]


FULL, DYCOKE = (
    "tiny/full()",
    "tiny/dycoke(k=0.7,l=3,mode=paper,one_shot=False,p=0.7,seed=0,threshold=0.9,ttm_selection=similarity)",
)


def run_cells(results_dir, offline_dir):
    """Full tokens and DyCoke (its default k=0.7), as one multirun in this process: one checkpoint load."""
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    proc = run_app("-m", *CELL, "method=full,dycoke", f"results_dir={results_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results_dir


@pytest.fixture(scope="module")
def baseline(offline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    path = root / "nightly.json"
    run_cells(root / "baseline_run", offline_dir)
    assert nightly(["refresh", str(root / "baseline_run"), "--baseline", str(path)]) == 0
    data = json.loads(path.read_text())
    data["bands"]["generate_time_vs_full"] = 100.0  # the tiny model's millisecond timings are noise, not a signal
    path.write_text(json.dumps(data))
    return root, path


def test_the_baseline_records_where_it_came_from(baseline):
    data = json.loads(baseline[1].read_text())
    assert set(data["methods"]) == {FULL, DYCOKE} and "baseline_run" in data["source"]["results_dir"]
    assert {"commit", "dirty"} <= set(data["source"]["git"]) and data["source"]["versions"]["lmms-eval"] == "0.7.3"
    assert 0 < data["methods"][DYCOKE]["visual_token_share"] < 1 == data["methods"][FULL]["visual_token_share"]


def test_an_unchanged_run_passes(baseline, offline_dir, capsys):
    root, path = baseline
    rerun = run_cells(root / "rerun", offline_dir)
    code = nightly(["compare", str(rerun), "--baseline", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (line,) = out.splitlines()  # nothing moved: the summary alone
    assert line.startswith("nightly: ") and ", 0 moved beyond tolerance, " in line


def test_a_degraded_method_fails_naming_the_figure_and_the_size_of_the_change(baseline, tmp_path, capsys):
    root, path = baseline
    data = json.loads(path.read_text())
    data["methods"][DYCOKE]["visual_token_share"] += 0.3  # as if the code used to keep far more tokens than it does now
    degraded = tmp_path / "nightly.json"
    degraded.write_text(json.dumps(data))
    capsys.readouterr()
    assert nightly(["compare", str(root / "baseline_run"), "--baseline", str(degraded)]) == 1
    header, line, summary = capsys.readouterr().out.splitlines()  # only what moved, then the summary
    assert header.split() == ["method", "figure", "baseline", "now", "change", "band", "status"]
    assert line.split()[:2] == [DYCOKE, "visual_token_share"] and float(line.split()[4]) == pytest.approx(-0.3)
    assert ", 1 moved beyond tolerance, " in summary


def hand_made_cell(results_dir, name, method, results):
    cell = results_dir / "cells" / name
    cell.mkdir(parents=True)
    run = {"complete": True, "config": {"run_name": "nightly", "model": {"name": "tiny"}}, "method": method.describe()}
    (cell / "run.json").write_text(json.dumps(run))
    (cell / "results.json").write_text(json.dumps(results))


def test_two_settings_of_one_method_are_two_entries_never_compared_with_each_other(tmp_path):
    from dycoke_eval.methods.fastv import FastV
    from dycoke_eval.nightly import collect

    for ratio, score in ((0.35, 40.0), (0.5, 45.0)):
        results = {"results": {"videomme": {"videomme_perception_score,none": score}}}
        hand_made_cell(tmp_path, f"fastv_{ratio}", FastV(ratio=ratio), results)
    figures = collect(tmp_path, "nightly")
    assert figures == {
        "tiny/fastv(layer=5,ratio=0.35)": {"videomme/videomme_perception_score": 40.0},
        "tiny/fastv(layer=5,ratio=0.5)": {"videomme/videomme_perception_score": 45.0},
    }


def test_the_retained_ratio_is_the_standard_measured_one_else_the_visual_token_share(tmp_path):
    from dycoke_eval.methods.fastv import FastV
    from dycoke_eval.nightly import collect

    summary = {"visual_tokens_in_mean": 50, "visual_tokens_full_mean": 100, "seconds_mean": {"generate": 1.0}}
    measured = {"retained_ratio_mean": 0.2, "method_stats_mean": {"retained_ratio": 0.9}}
    for ratio, extra in ((0.35, measured), (0.5, {})):
        hand_made_cell(
            tmp_path, f"fastv_{ratio}", FastV(ratio=ratio), {"results": {}, "dycoke_eval": {"v": {**summary, **extra}}}
        )
    figures = collect(tmp_path, "nightly")
    assert figures["tiny/fastv(layer=5,ratio=0.35)"]["retained_ratio"] == 0.2  # the standard field, not method_stats
    unmeasured = figures["tiny/fastv(layer=5,ratio=0.5)"]
    assert unmeasured["retained_ratio"] == unmeasured["visual_token_share"] == 0.5


def write_baseline(path, methods):
    path.write_text(json.dumps({"methods": methods}))
    return str(path)


def test_compare_prints_only_what_moved_then_one_summary_line_and_everything_with_all(tmp_path, capsys):
    from dycoke_eval.methods.fastv import FastV

    scores = {"videomme": {"videomme_perception_score,none": 40.0}, "mvbench": {"mvbench_accuracy,none": 50.0},
              "activitynetqa": {"gpt_eval_score,none": 3.0}}  # fmt: skip
    hand_made_cell(tmp_path, "fastv", FastV(), {"results": scores})
    fastv = "tiny/fastv(layer=5,ratio=0.35)"
    figures = {"videomme/videomme_perception_score": 40.5, "mvbench/mvbench_accuracy": 55.0, "activitynetqa/gpt_eval_score": 3}
    baseline = write_baseline(tmp_path / "baseline.json", {fastv: figures})
    compare = ["compare", str(tmp_path), "--baseline", baseline, "--no-judged"]

    assert nightly(compare) == 1  # MVBench fell 5 points, beyond its 1-point band
    header, moved, summary = capsys.readouterr().out.splitlines()
    assert moved.split() == [fastv, "mvbench/mvbench_accuracy", "55", "50", "-5", "1", "moved"]
    assert summary == (
        "nightly: 2 figures compared, 1 moved beyond tolerance, 1 within; 1 GPT-judged figure not compared (no judge configured)"
    )

    assert nightly([*compare, "--all"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out[1:3]] == ["videomme/videomme_perception_score", "mvbench/mvbench_accuracy"]
    assert out[1].split()[-1] == "within" and out[3].startswith("note: ") and out[4] == summary

    write_baseline(tmp_path / "baseline.json", {fastv: {**figures, "mvbench/mvbench_accuracy": 50.2}})
    assert nightly(compare) == 0  # within every band
    assert capsys.readouterr().out.splitlines() == [
        summary.replace("1 moved beyond tolerance, 1 within", "0 moved beyond tolerance, 2 within")
    ]


def test_a_method_missing_from_the_run_moves_and_no_baseline_exits_2(tmp_path, capsys):
    baseline = write_baseline(tmp_path / "baseline.json", {"tiny/full()": {"videomme/videomme_perception_score": 40.0}})
    assert nightly(["compare", str(tmp_path), "--baseline", baseline]) == 1
    _, line, summary = capsys.readouterr().out.splitlines()
    assert line.split() == ["tiny/full()", "(all)", "-", "missing", "-", "-", "moved"]
    assert summary == "nightly: 1 figure compared, 1 moved beyond tolerance, 0 within"
    assert nightly(["compare", str(tmp_path), "--baseline", str(tmp_path / "none.json")]) == 2


def test_judged_metrics_are_compared_only_with_a_judge(baseline):
    from dycoke_eval.nightly import compare

    expected = {
        "methods": {"full": {"fixture_activitynetqa/gpt_eval_score": 3.0, "fixture_videomme/videomme_perception_score": 40.0}}
    }
    current = {"full": {"fixture_videomme/videomme_perception_score": 40.0}}
    table, notes = compare(current, expected, judged=False)
    assert list(table.figure) == ["fixture_videomme/videomme_perception_score"] and not table.regressed.any()
    assert notes == ["full fixture_activitynetqa/gpt_eval_score: not compared, no judge configured"]
    table, _ = compare(current, expected, judged=True)
    assert table.regressed.any()  # with a judge, a missing judged metric is a regression


def test_the_workflow_is_valid_and_uses_only_the_readmes_commands():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "nightly.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["schedule"][0]["cron"].count(" ") == 4
    (job,) = workflow["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    commands = [step["run"] for step in job["steps"] if "run" in step]
    assert commands == ["make install", "make nightly"]
    readme = (REPO_ROOT / "README.md").read_text()
    assert all(command in readme for command in commands)
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])

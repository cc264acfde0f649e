"""The nightly comparator on the tiny model, and the workflow that runs it."""

import json

import pytest
import yaml
from conftest import REPO_ROOT, run_module

CELL = ["tasks.names=[fixture_videomme,fixture_mvbench_action_antonym]", "frames=4", "limit=2", "run_name=nightly"]


def run_cells(results_dir, offline_dir, dycoke_k):
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    for method in (["method=full"], ["method=dycoke", f"method.k={dycoke_k}"]):
        proc = run_module("dycoke_eval", *CELL, *method, f"results_dir={results_dir}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return results_dir


@pytest.fixture(scope="module")
def baseline(offline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    path = root / "nightly.json"
    run_cells(root / "baseline_run", offline_dir, dycoke_k=0.7)
    proc = run_module("dycoke_eval.nightly", "refresh", str(root / "baseline_run"), "--baseline", str(path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(path.read_text())
    data["bands"]["generate_time_vs_full"] = 100.0  # the tiny model's millisecond timings are noise, not a signal
    path.write_text(json.dumps(data))
    return root, path


def test_the_baseline_records_where_it_came_from(baseline):
    data = json.loads(baseline[1].read_text())
    assert set(data["methods"]) == {"full", "dycoke"} and "baseline_run" in data["source"]["results_dir"]
    assert {"commit", "dirty"} <= set(data["source"]["git"]) and data["source"]["versions"]["lmms-eval"] == "0.7.3"
    assert 0 < data["methods"]["dycoke"]["visual_token_share"] < 1 == data["methods"]["full"]["visual_token_share"]


def test_an_unchanged_run_passes(baseline, offline_dir):
    root, path = baseline
    rerun = run_cells(root / "rerun", offline_dir, dycoke_k=0.7)
    proc = run_module("dycoke_eval.nightly", "compare", str(rerun), "--baseline", str(path))
    assert proc.returncode == 0, proc.stdout
    assert "no regression" in proc.stdout


def test_a_degraded_method_fails_naming_the_figure_and_the_size_of_the_change(baseline, offline_dir):
    root, path = baseline
    degraded = run_cells(root / "degraded", offline_dir, dycoke_k=0.95)  # prunes far more than the baseline's 0.7
    proc = run_module("dycoke_eval.nightly", "compare", str(degraded), "--baseline", str(path))
    assert proc.returncode == 1
    report = proc.stdout.split("REGRESSION:")[1]
    (line,) = [row for row in report.splitlines() if "visual_token_share" in row]
    assert line.split()[0] == "dycoke" and float(line.split()[4]) < -0.1  # the change column
    assert "full" not in [row.split()[0] for row in report.splitlines()[2:] if row.strip()]


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

"""FastVID's Table 1 benchmarks as tasks: the task set, the fixture copies, and the breakdowns lmms-eval only logs."""

import importlib
import itertools
import json

import pytest
import yaml
from conftest import run_app
from loguru import logger

from dycoke_eval.breakdowns import mlvu_dev_accuracies, videomme_durations
from dycoke_eval.config import CONF_DIR
from dycoke_eval.offline.fixtures import FIXTURE_TASKS
from dycoke_eval.store import read_cell

FASTVID_FIXTURES = ["fixture_mvbench_action_antonym", "fixture_longvideobench_val_v", "fixture_mlvu_dev", "fixture_videomme"]


def fixture(name):
    return next(task for task in FIXTURE_TASKS if task.name == name)


def test_the_fastvid_set_names_lmms_eval_tasks_the_quick_check_accepts(tmp_path):
    from dycoke_eval.task_index import check_task_names, declared_task_names

    names = yaml.safe_load((CONF_DIR / "tasks" / "fastvid.yaml").read_text())["names"]
    assert names == ["mvbench", "longvideobench_val_v", "mlvu_dev", "videomme"]
    assert set(names) <= declared_task_names()  # found by the YAML scan, without building lmms-eval's index
    check_task_names(names, tmp_path)
    assert not list(tmp_path.iterdir())  # no index was needed


def test_fixture_documents_have_the_hub_datasets_fields():
    lvb_fields = {"video_id", "id", "video_path", "subtitle_path", "correct_choice", "question", "duration", "duration_group",
                  "question_category", "topic_category", "starting_timestamp_for_subtitles"}  # fmt: skip
    lvb_fields |= {f"option{i}" for i in range(5)}
    mlvu_fields = {"video_name", "duration", "question", "candidates", "answer", "task_type", "question_id"}
    assert all(set(doc) == lvb_fields for doc in fixture("fixture_longvideobench_val_v").docs)
    assert all(set(doc) == mlvu_fields for doc in fixture("fixture_mlvu_dev").docs)
    assert {doc["duration"] for doc in fixture("fixture_videomme").docs} == {"short", "medium", "long"}


def test_longvideobench_and_mlvu_videos_keep_the_real_mp4_paths(world):
    lvb, mlvu = fixture("fixture_longvideobench_val_v"), fixture("fixture_mlvu_dev")
    for doc in lvb.docs:
        assert world.video_path(lvb, doc) == world.hf_home / "datasets/longvideobench/videos" / f"{doc['video_id']}.mp4"
    for doc in mlvu.docs:
        assert world.video_path(mlvu, doc) == world.hf_home / "mlvu" / doc["video_name"] and doc["video_name"].endswith(".mp4")


def lmms_eval_task_utils(task):
    return importlib.import_module(f"lmms_eval.tasks.{task}.utils")


def logged_lines(function, *args):
    """What `function(*args)` logs through loguru, and its result."""
    lines = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    try:
        result = function(*args)
    finally:
        logger.remove(sink)
    return result, lines


def test_videomme_durations_match_lmms_eval_aggregation_on_the_same_rows(world):
    utils = lmms_eval_task_utils("videomme")
    predictions = itertools.cycle(["A", "B", "The answer is C", "", "D."])
    groups = itertools.product(("short", "medium", "long"), ("Counting Problem", "OCR Problems"))
    docs = [
        {"question_id": f"{i}-{j}", "duration": duration, "domain": "Sports Competition", "sub_category": "Football",
         "task_type": task_type, "answer": "ABCD"[(i + j) % 4], "videoID": f"v{i}"}
        for i, (duration, task_type) in enumerate(groups)
        for j in range(i + 1)  # a different number of questions per group
    ]  # fmt: skip
    rows = [utils.videomme_process_results(doc, [next(predictions)]) for doc in docs]
    values = [row["videomme_perception_score"] for row in rows]

    breakdown = videomme_durations(rows)
    overall, lines = logged_lines(utils.videomme_aggregate_results, values)
    assert breakdown["overall"] == pytest.approx(overall)
    for duration in ("short", "medium", "long"):
        subset = [value for value in values if value["duration"] == duration]
        assert breakdown[duration] == pytest.approx(utils.videomme_aggregate_results(subset))
        assert f"Evaluation on video Type: {duration}: {breakdown[duration]: .1f}%" in lines  # the figure lmms-eval logs
    assert len({breakdown[d] for d in ("short", "medium", "long")}) == 3  # the rows tell the durations apart


def test_videomme_duration_without_samples_is_none_not_zero(world):
    utils = lmms_eval_task_utils("videomme")
    doc = {"question_id": "1", "duration": "long", "domain": "Knowledge", "sub_category": "Astronomy",
           "task_type": "OCR Problems", "answer": "B", "videoID": "v"}  # fmt: skip
    rows = [utils.videomme_process_results(doc, ["B"])]
    assert videomme_durations(rows) == {"short": None, "medium": None, "long": 100.0, "overall": 100.0}


def test_mlvu_overall_counts_questions_and_the_type_mean_is_lmms_eval_metric(world):
    utils = lmms_eval_task_utils("mlvu")
    types = ["anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning"]  # mlvu_dev's 7 task types
    predictions = itertools.cycle(["A", "(B)", "C", "nothing", "B) because", "D"])
    docs = [{"question": f"q{t}{j}", "task_type": t, "answer": "AB"[j % 2]} for i, t in enumerate(types) for j in range(i + 1)]
    rows = [utils.mlvu_process_results(doc, [next(predictions)]) for doc in docs]
    values = [row["mlvu_percetion_score"] for row in rows]
    correct = [value["pred_answer"] == value["answer"] for value in values]

    accuracies = mlvu_dev_accuracies(rows)
    assert accuracies["overall"] == pytest.approx(100 * sum(correct) / len(correct))  # FastVID's lmms-eval: over questions
    per_type = [accuracies[t] for t in types]
    assert sum(per_type) / len(types) == pytest.approx(utils.mlvu_aggregate_results_dev(values))  # 0.7.3: over types
    assert accuracies["overall"] != pytest.approx(utils.mlvu_aggregate_results_dev(values))  # the two differ here


@pytest.fixture(scope="module")
def fastvid_cell(offline_dir, tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("fastvid")
    names = ",".join(FASTVID_FIXTURES)
    proc = run_app(f"results_dir={results_dir}", f"tasks.names=[{names}]", "frames=4", "limit=3",
                   env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell_dir,) = (results_dir / "cells").iterdir()
    return read_cell(cell_dir)


def test_the_offline_app_scores_every_fastvid_fixture_task(fastvid_cell):
    results = fastvid_cell.results["results"]
    metrics = {
        "fixture_mvbench_action_antonym": "mvbench_accuracy,none",
        "fixture_longvideobench_val_v": "lvb_acc,none",
        "fixture_mlvu_dev": "mlvu_percetion_score,none",
        "fixture_videomme": "videomme_perception_score,none",
    }
    for task, metric in metrics.items():
        assert isinstance(results[task][metric], (int, float)), (task, json.dumps(results[task]))
        assert len(fastvid_cell.samples(task)) == 3


def test_breakdowns_of_a_logged_cell_agree_with_its_lmms_eval_metrics(fastvid_cell):
    results = fastvid_cell.results["results"]
    durations = videomme_durations(fastvid_cell.samples("fixture_videomme"))
    assert None not in durations.values()  # one question of each duration
    assert durations["overall"] == pytest.approx(results["fixture_videomme"]["videomme_perception_score,none"])
    assert durations["overall"] == pytest.approx(sum(durations[d] for d in ("short", "medium", "long")) / 3)  # one each
    mlvu = mlvu_dev_accuracies(fastvid_cell.samples("fixture_mlvu_dev"))
    per_type = [value for key, value in mlvu.items() if key != "overall"]
    assert sorted(key for key in mlvu if key != "overall") == ["count", "order", "plotQA"]
    assert sum(per_type) / 7 == pytest.approx(results["fixture_mlvu_dev"]["mlvu_percetion_score,none"])  # 4 types unanswered

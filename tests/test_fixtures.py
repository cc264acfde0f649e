"""The fixture world: local task data in the real schemas, read by lmms-eval's built-in task code."""

from pathlib import Path

import lmms_eval.tasks
import numpy as np
import pytest
import yaml
from lmms_eval.models.model_utils.load_video import read_video
from lmms_eval.tasks import TaskManager, get_task_dict

from dycoke_eval.offline.fixtures import FIXTURE_TASK_NAMES, FIXTURE_TASKS
from dycoke_eval.offline.videos import FRAME_COUNT, synthetic_frames, write_video

BUILTIN_TASKS = Path(lmms_eval.tasks.__file__).resolve().parent


@pytest.fixture(scope="module")
def task_dict(world):
    return get_task_dict(list(FIXTURE_TASK_NAMES), TaskManager(include_path=str(world.task_dir)))


def test_covers_the_papers_tasks_and_two_mvbench_subtasks():
    builtin = {task.builtin_yaml.split("/")[0] for task in FIXTURE_TASKS}
    dycoke = {"activitynetqa", "videomme", "nextqa", "perceptiontest", "video_detail_description", "mvbench"}
    fastvid = {"mvbench", "longvideobench", "mlvu", "videomme"}
    assert builtin == dycoke | fastvid
    assert sum(task.name.startswith("fixture_mvbench_") for task in FIXTURE_TASKS) >= 2


def test_each_task_yaml_includes_the_builtin_yaml_rather_than_copying_it(world):
    for task in FIXTURE_TASKS:
        config = yaml.safe_load((world.task_dir / f"{task.name}.yaml").read_text().replace("!function", ""))
        assert Path(config["include"]) == BUILTIN_TASKS / task.builtin_yaml
        assert config["dataset_path"] == "json"


@pytest.mark.parametrize("task", FIXTURE_TASKS, ids=lambda t: t.name)
def test_builtin_task_code_reads_every_document_and_finds_its_video(task_dict, task):
    lmms_task = task_dict[task.name]
    docs = list(lmms_task.test_docs())
    assert len(docs) == len(task.docs)
    for doc in docs:
        assert lmms_task.doc_to_text(doc)  # the built-in prompt builder accepts the schema
        (video_path,) = lmms_task.doc_to_visual(doc)
        assert Path(video_path).is_file(), video_path
    # the built-in scorer accepts the schema too
    assert lmms_task.process_results(docs[0], ["A"])


@pytest.mark.parametrize("name", ["fixture_activitynetqa", "fixture_video_dc499"])
def test_judged_tasks_record_predictions_instead_of_calling_a_judge(task_dict, name):
    lmms_task = task_dict[name]
    doc = next(iter(lmms_task.test_docs()))
    results = lmms_task.process_results(doc, ["a prediction"])
    assert all(item["pred"] == "a prediction" and item["judged"] is False for item in results.values())
    assert all(agg([item]) == "not judged" for agg, item in zip(lmms_task.aggregation().values(), results.values(), strict=True))


def test_synthetic_video_decodes_to_the_requested_frame_count_and_moves(tmp_path):
    path = write_video(tmp_path / "clip.mp4")
    frames = read_video(str(path), num_frm=8)
    assert frames.shape == (8, 48, 64, 3)
    assert not np.array_equal(frames[0], frames[-1])
    assert np.array_equal(synthetic_frames("clip"), synthetic_frames("clip"))
    assert len(read_video(str(path), num_frm=1000)) == FRAME_COUNT


def test_every_task_set_names_tasks_lmms_eval_knows(world, tmp_path):
    from dycoke_eval.config import CONF_DIR, group_options
    from dycoke_eval.task_configs import write_deferred_judge_tasks
    from dycoke_eval.task_index import TaskIndex

    task_dirs = [write_deferred_judge_tasks(tmp_path / "tasks"), world.task_dir]
    names = [
        name
        for option in group_options("tasks")
        for name in yaml.safe_load((CONF_DIR / "tasks" / f"{option}.yaml").read_text())["names"]
    ]
    assert "activitynetqa_deferred" in names and "mvbench" in names
    TaskIndex().resolve(names, task_dirs)  # raises ConfigError naming any unknown task


def test_deferred_tasks_keep_the_builtin_task_and_only_defer_judging(tmp_path):
    from dycoke_eval.task_configs import write_deferred_judge_tasks

    text = (write_deferred_judge_tasks(tmp_path) / "activitynetqa_deferred.yaml").read_text()
    config = yaml.safe_load(text.replace("!function", ""))
    assert Path(config["include"]) == BUILTIN_TASKS / "activitynetqa/activitynetqa_generation.yaml"
    assert "dataset_path" not in config  # the real dataset, as lmms-eval downloads it
    assert config["process_results"].strip() == "dycoke_eval.judging.record_unjudged_qa"
    assert [m["metric"] for m in config["metric_list"]] == ["gpt_eval_score", "gpt_eval_accuracy"]


def test_two_environments_sharing_an_offline_dir_keep_their_own_task_yamls_and_share_the_videos(tmp_path, monkeypatch):
    import dycoke_eval.offline.fixtures as fixtures
    import dycoke_eval.task_configs as task_configs

    first = fixtures.ensure_offline_world(tmp_path / "world")
    video = first.video_path(fixtures.FIXTURE_TASKS[0], fixtures.FIXTURE_TASKS[0].docs[0])
    built, first_tasks = video.stat().st_mtime_ns, first.task_dir
    other_lmms_eval = tmp_path / "other-env" / "lmms_eval" / "tasks"
    monkeypatch.setattr(task_configs, "lmms_eval_tasks_dir", lambda: other_lmms_eval)
    monkeypatch.setattr(fixtures, "lmms_eval_tasks_dir", lambda: other_lmms_eval)
    second = fixtures.ensure_offline_world(tmp_path / "world")
    assert second.task_dir != first_tasks and first_tasks.is_dir() and second.task_dir.is_dir()
    assert str(other_lmms_eval) in next(second.task_dir.glob("fixture_*.yaml")).read_text()
    assert str(other_lmms_eval) not in next(first_tasks.glob("fixture_*.yaml")).read_text()
    assert video.stat().st_mtime_ns == built  # the shared videos were not written again
    assert not list((tmp_path / "world").rglob("*.tmp*"))  # every file was written whole, then renamed

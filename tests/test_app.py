"""End to end: the Hydra app and lmms-eval's own CLI on the offline world, and bad names at start.

The app runs in this process (`run_app`: the command line's path, with the process state a fresh
interpreter would not share set aside); lmms-eval's CLI runs as a command. The offline default as a
command from a shell, from an installed wheel, is tests/test_install.py.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_app

from dycoke_eval.offline.fixtures import FIXTURE_TASK_NAMES, FIXTURE_TASKS, OfflineWorld

ANET = next(t for t in FIXTURE_TASKS if t.name == "fixture_activitynetqa")
SHUFFLE = next(t for t in FIXTURE_TASKS if t.name == "fixture_mvbench_object_shuffle")


def private_world(offline_dir, root):
    """A copy of the offline world that a test may damage."""
    shutil.copytree(offline_dir, root, dirs_exist_ok=True, symlinks=True)
    world = OfflineWorld(root / "world")
    # The fixture YAMLs name their data files by absolute path: point them at this copy.
    for yaml_file in world.task_dir.glob("*.yaml"):
        yaml_file.write_text(yaml_file.read_text().replace(str(offline_dir), str(root)))
    return world


@pytest.fixture(scope="module")
def damaged_run(offline_dir, tmp_path_factory):
    """The offline default with one video deleted and one corrupted, in a private copy of the world."""
    root = tmp_path_factory.mktemp("damaged")
    world = private_world(offline_dir, root)
    world.video_path(ANET, ANET.docs[0]).unlink()
    world.video_path(SHUFFLE, SHUFFLE.docs[1]).write_bytes(b"\x00" * 64)
    results = root / "results"
    proc = run_app(f"results_dir={results}", "frames=8", env={"DYCOKE_OFFLINE_DIR": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = (results / "cells").iterdir()
    return cell, proc


def test_every_fixture_task_gets_a_metric(damaged_run):
    cell, _ = damaged_run
    results = json.loads((cell / "results.json").read_text())["results"]
    assert set(results) == set(FIXTURE_TASK_NAMES)
    for task, metrics in results.items():
        # LongVideoBench's process_results also returns a `submission` entry (for its test split's upload): no metric
        values = [v for k, v in metrics.items() if k not in ("alias", "submission,none") and "_stderr" not in k]
        assert values, task
        if task in ("fixture_activitynetqa", "fixture_video_dc499"):
            assert set(values) == {"not judged"}  # never a silent 0
        else:
            assert all(isinstance(v, (int, float)) for v in values), (task, values)


def test_failed_samples_are_counted_with_path_and_reason_and_the_run_goes_on(damaged_run):
    cell, proc = damaged_run
    summary = json.loads((cell / "results.json").read_text())["dycoke_eval"]
    assert summary["fixture_activitynetqa"]["failed"] == 1
    assert "does not exist" in summary["fixture_activitynetqa"]["failures"][0]["error"]
    (corrupt,) = summary["fixture_mvbench_object_shuffle"]["failures"]
    assert corrupt["video_path"].endswith("fix_object_shuffle_1.mp4") and "cannot open as a video container" in corrupt["error"]
    assert sum(s["failed"] for s in summary.values()) == 2
    assert "1 of 3 samples FAILED" in proc.stdout
    run = json.loads((cell / "run.json").read_text())
    assert run["complete"] is False and run["failed_samples"] == 2  # a failed sample is not a result


def test_a_rerun_after_a_transient_failure_retries_exactly_the_failed_samples(damaged_run, offline_dir):
    cell, _ = damaged_run
    root = cell.parents[2]
    original = OfflineWorld(offline_dir / "world")
    world = OfflineWorld(root / "world")
    for task, doc in ((ANET, ANET.docs[0]), (SHUFFLE, SHUFFLE.docs[1])):  # the videos are back
        shutil.copyfile(original.video_path(task, doc), world.video_path(task, doc))
    before = {json.loads(line)["key"] for line in (cell / "journal.jsonl").read_text().splitlines()}
    proc = run_app(f"results_dir={root / 'results'}", "frames=8", env={"DYCOKE_OFFLINE_DIR": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 samples generated, {len(before)} resumed from its journal" in proc.stdout
    run = json.loads((cell / "run.json").read_text())
    assert run["complete"] is True and run["failed_samples"] == 0


def test_a_cell_where_every_sample_failed_exits_non_zero_with_the_reasons(offline_dir, tmp_path):
    world = private_world(offline_dir, tmp_path / "offline")
    for doc in ANET.docs:
        world.video_path(ANET, doc).unlink()
    results = tmp_path / "results"
    proc = run_app(
        "tasks.names=[fixture_activitynetqa]", f"results_dir={results}", "frames=4",
        env={"DYCOKE_OFFLINE_DIR": str(tmp_path / "offline")},
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"all {len(ANET.docs)} samples failed" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "None:" not in proc.stderr
    for doc in range(len(ANET.docs)):  # each reason names the sample and its video
        assert f"fixture_activitynetqa doc {doc} (" in proc.stderr
    assert f"fixture_activitynetqa: no metric: all {len(ANET.docs)} samples FAILED" in proc.stdout
    assert "gpt_eval" not in proc.stdout
    (run_file,) = results.rglob("run.json")
    assert json.loads(run_file.read_text())["complete"] is False


def test_the_cell_folder_records_how_it_was_made(damaged_run):
    cell, _ = damaged_run
    run = json.loads((cell / "run.json").read_text())
    assert run["cell"]["frames"] == 8 and run["method"] == {"name": "full"}
    assert run["versions"]["lmms-eval"] == "0.7.3" and run["versions"]["transformers"].startswith("5.")
    assert {"numpy", "pandas", "filelock", "torch"} <= set(run["versions"]["installed"])
    assert run["versions"]["lock_sha256"] == hashlib.sha256((REPO_ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert {"commit", "dirty"} <= set(run["git"]) and "cpu_count" in run["hardware"]
    assert run["runtime"] == {"device": "cpu", "dtype": "torch.float32", "attn_implementation": "sdpa",
                              "attention_kernels": ["sdpa"], "prompt": "paper", "max_new_tokens": 16,
                              "random_weights": False, "measured": False, "processes": 1,
                              "hardware_by_rank": [run["hardware"]],
                              "seeded_scorers": ["fixture_longvideobench_val_v", "fixture_nextqa_mc_test"]}  # fmt: skip
    for task in FIXTURE_TASK_NAMES:
        assert (cell / f"samples_{task}.jsonl").stat().st_size > 0
    records = [json.loads(line) for line in (cell / "sample_records.jsonl").read_text().splitlines()]
    assert {r["visual_tokens_in"] for r in records if r["status"] == "ok"} == {8 * 16 + 1}
    # lmms-eval's own efficiency summary counts what the model read and wrote, failed samples left out
    overall = json.loads((cell / "results.json").read_text())["efficiency"]["overall"]
    ok = [r for r in records if r["status"] == "ok"]
    assert overall["docs_with_token_counts"] == len(ok) and overall["total_output_tokens"] == sum(r["output_tokens"] for r in ok)
    assert overall["total_input_tokens"] == sum(r["input_tokens"] for r in ok) > sum(r["visual_tokens_in"] for r in ok)


@pytest.mark.slow
def test_the_readmes_offline_lmms_eval_command_runs_as_written(offline_dir, tmp_path):
    """The README's block, run by bash as written (the offline dir comes from $DYCOKE_OFFLINE_DIR, output in tmp)."""
    readme = (REPO_ROOT / "README.md").read_text()
    (block,) = [b for b in readme.split("```bash\n")[1:] if "--include_path" in b.split("```")[0]]
    command = block.split("```")[0].replace("results/lmms-eval/", f"{tmp_path}/")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` is this environment's, as in an activated venv
    env = {**os.environ, "PATH": path, "DYCOKE_OFFLINE_DIR": str(offline_dir)}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = tmp_path.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert "accuracy,none" in results["results"]["fixture_perceptiontest_val_mc"]
    assert results["n-samples"]["fixture_perceptiontest_val_mc"]["effective"] == 2
    assert "nltk" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=llava_ov_13b", ["llava_ov_0.5b", "llava_ov_7b", "llava_ov_72b", "tiny"]),
        ("method=dycokee", ["dycoke", "dycoke_no_dp", "dycoke_random", "fastv", "full", "prumerge", "prumerge_official"]),
        ("tasks=table9", ["fixtures", "mvbench", "table1"]),
    ],
)
def test_an_unknown_config_name_fails_at_start_in_one_line_listing_the_valid_ones(offline_dir, override, expected):
    proc = run_app(override, env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    (line,) = proc.stderr.splitlines()
    group, name = override.split("=")
    assert proc.returncode == 2 and line.startswith(f"dycoke_eval: {group}={name!r} is not a {group} config")
    assert all(name in line for name in expected), line


def test_an_unknown_task_fails_before_loading_the_model_listing_valid_names(offline_dir, tmp_path):
    proc = run_app("tasks.names=[videomem]", f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode != 0
    assert "unknown task 'videomme'" not in proc.stderr and "unknown task 'videomem'" in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "did you mean videomme" in line and "task sets: tasks=egoschema4,fastvid,fixtures,framefusion," in line
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("run.json"))


def test_dycoke_runs_the_offline_default_and_reports_its_token_figures(offline_dir, tmp_path):
    proc = run_app(
        "method=dycoke", "method.k=0.7", "limit=1", "frames=8", f"results_dir={tmp_path}",
        env={"DYCOKE_OFFLINE_DIR": str(offline_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results.json")
    assert "__dycoke__f8__" in str(results_file)
    summary = json.loads(results_file.read_text())["dycoke_eval"]
    assert set(summary) == set(FIXTURE_TASK_NAMES)
    for task in summary.values():
        assert task["visual_tokens_in_mean"] < task["visual_tokens_full_mean"] == 8 * 16 + 1
        assert 0 < task["retained_ratio_mean"] < 1
        assert task["method_stats_mean"]["ttm_tokens_out"] + 1 == task["visual_tokens_in_mean"]
        assert task["visual_tokens_by_stage_mean"]["ttm"] == task["method_stats_mean"]["ttm_tokens_out"]


def test_the_task_index_is_built_once_per_process_for_the_same_task_folders(world, tmp_path):
    from dycoke_eval.task_index import TaskIndex

    tasks, index = tmp_path / "tasks", TaskIndex()
    shutil.copytree(world.task_dir, tasks)
    first = index.manager([tasks], builtins=False)
    assert index.resolve(["fixture_nextqa_mc_test"], [tasks]) is first  # every cell of a sweep asks for it again
    assert "videomme" not in first.all_tasks  # our own tasks alone: lmms-eval's ~2,000 YAMLs are not indexed for them
    nextqa = (tasks / "fixture_nextqa_mc_test.yaml").read_text()
    (tasks / "fixture_copy.yaml").write_text(nextqa.replace("task: fixture_nextqa_mc_test", "task: fixture_copy"))
    again = index.manager([tasks], builtins=False)  # a task written into the folder later is found
    assert again is not first and "fixture_copy" in again.all_tasks and "fixture_copy" not in first.all_tasks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=dycoke", "method.k=1.5"], "k=1.5: DyCoke's TTM pruning rate must be in [0, 1]"),
        (["frames=0"], "frames=0: sample an integer number of frames >= 1"),
        (["method=dycoke", "method.l=99"], "l=99: the language model has 8 layers (0..7); choose l < 8"),
        (["method=fastv", "method.layer=99"], "layer=99: the language model has 8 layers; choose 1 <= layer < 8"),
        (["prompt=chat"], "prompt='chat'; use one of paper, checkpoint"),
        (["limit=-1"], "limit=-1: give a number of documents per task (an integer >= 1), a fraction in (0, 1)"),
        (["limit=1.5", "dry_run=true"], "limit=1.5: give a number of documents per task"),
        (["method=dycoke", "static_decoding=true"], "static_decoding=true: method 'dycoke' prunes the KV cache while decoding"),
    ],
)
def test_bad_settings_are_refused_before_the_environment_tasks_or_model_are_touched(offline_dir, monkeypatch, overrides, message):
    """`scripts/bench_config_errors.py` times these from a shell (under 5 s each)."""
    import dycoke_eval.cells as cells

    def slow_path(cfg):
        raise AssertionError("the run went past its checks into the slow part")

    monkeypatch.setattr(cells, "prepare_environment", slow_path)
    proc = run_app(*overrides, env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 2 and line.startswith(f"dycoke_eval: {message}")
    assert "slow part" not in proc.stderr


def test_ctrl_c_before_generation_is_one_line_and_status_130(offline_dir, tmp_path, monkeypatch):
    from dycoke_eval.task_index import TaskIndex

    def indexing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TaskIndex, "resolve", indexing)  # Ctrl-C while lmms-eval indexes its tasks
    proc = run_app(f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode == 130
    assert proc.stderr.strip() == (
        "dycoke_eval: interrupted; finished samples and cells are kept: run the same command again to resume"
    )


def test_a_results_dir_that_is_a_file_is_refused_in_one_line_before_hydra_writes_there(offline_dir, tmp_path):
    (tmp_path / "taken").write_text("")
    proc = run_app(f"results_dir={tmp_path / 'taken' / 'results'}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"dycoke_eval: results_dir='{tmp_path}/taken/results': '{tmp_path}/taken' is a file; choose a folder"
    )


@pytest.mark.parametrize("pretrained", ["foo/bar-model", "./no/such/folder"])
def test_a_checkpoint_neither_local_nor_on_the_hub_is_refused_in_one_line_and_no_random_model_is_built(
    offline_dir, tmp_path, monkeypatch, pretrained
):
    from dycoke_eval.task_index import TaskIndex

    def slow_path(*args, **kwargs):
        raise AssertionError("the run went past the checkpoint check into the task index")

    monkeypatch.setattr(TaskIndex, "resolve", slow_path)
    proc = run_app(f"model.pretrained={pretrained}", f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)},
                   cwd=tmp_path)  # fmt: skip
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 2 and line.startswith(f"dycoke_eval: model.pretrained={pretrained!r}: ")
    assert "use model=NAME" in line and "model.pretrained=/path/to/a/checkpoint/folder" in line
    assert not (tmp_path / pretrained).exists() and not list(tmp_path.rglob("config.json"))  # nothing built in its place


def test_the_hub_check_reads_the_offline_switch_and_cache_when_it_runs(tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, when imported; the run sets them later."""
    from dycoke_eval.checkpoints import locate_checkpoint
    from dycoke_eval.config import ConfigError

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=rf"not in the Hugging Face cache \({tmp_path}/hub\), and the hub is offline; fetch"):
        locate_checkpoint("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-onevision-qwen2-7b-ov-hf" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    locate_checkpoint("llava-hf/llava-onevision-qwen2-7b-ov-hf")  # cached: accepted without the hub


def test_a_finished_cell_is_answered_from_its_folder_with_its_metrics_without_checks_or_model(offline_dir, tmp_path, monkeypatch):
    import dycoke_eval.cells as cells

    overrides = ("tasks.names=[fixture_nextqa_mc_test]", "frames=4", "limit=1", f"results_dir={tmp_path}")
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    assert run_app(*overrides, env=env).returncode == 0

    def slow_path(*args, **kwargs):
        raise AssertionError("a finished cell was checked or prepared again")

    monkeypatch.setattr(cells, "check_cell", slow_path)
    monkeypatch.setattr(cells, "prepare_environment", slow_path)
    again = run_app(*overrides, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "complete, skipped (force=true reruns it)" in again.stdout and "fixture_nextqa_mc_test: exact_match=" in again.stdout


def test_an_unknown_task_is_refused_from_the_task_yamls_and_a_kept_index_without_rebuilding_it(offline_dir, monkeypatch):
    from dycoke_eval.task_index import TaskIndex, declared_task_names, indexed_task_names

    indexed_task_names(offline_dir)  # built once per lmms-eval version and kept in the offline dir

    def rebuilt(self, task_dirs):
        raise AssertionError("the task index was rebuilt")

    monkeypatch.setattr(TaskIndex, "manager", rebuilt)
    proc = run_app("tasks.names=[videomem]", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode != 0 and "unknown task 'videomem' (did you mean videomme" in proc.stderr
    assert "rebuilt" not in proc.stderr
    assert declared_task_names() >= {"videomme", "mvbench", "activitynetqa", "nextqa_mc_test"}  # quick scan: no index


def test_ctrl_c_says_in_one_line_what_is_saved_and_a_rerun_resumes_counting_the_saved_samples(offline_dir, tmp_path, monkeypatch):
    from dycoke_eval.wrapper import CompressedVideoLM

    answer, calls = CompressedVideoLM._answer, []

    def interrupted_at_the_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answer(self, *args)

    overrides = ("tasks.names=[fixture_nextqa_mc_test]", "frames=4", f"results_dir={tmp_path}")
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    monkeypatch.setattr(CompressedVideoLM, "_answer", interrupted_at_the_third)
    proc = run_app(*overrides, env=env)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "interrupted" in line]
    assert "interrupted: 2 finished samples of cell tiny__full__f4__" in line and "run the same command again" in line
    monkeypatch.setattr(CompressedVideoLM, "_answer", answer)
    again = run_app(*overrides, env=env)
    assert again.returncode == 0 and "1 samples generated, 2 resumed from its journal" in again.stdout
    assert "2 resumed from the journal" in again.stderr  # the progress bar starts at the saved samples


def test_only_a_tasks_dataset_loading_becomes_the_missing_data_line():
    from types import SimpleNamespace

    from lmms_eval.api.task import Task

    from dycoke_eval.cells import task_data_errors
    from dycoke_eval.config import ConfigError

    class Loading(Task):
        def download(self):
            raise FileNotFoundError("no parquet here")

        def process_results(self):
            raise KeyError("a scorer's bug")

    Loading.__abstractmethods__ = frozenset()  # only the two methods above are called
    task = object.__new__(Loading)
    task._config = SimpleNamespace(task="videomme", dataset_path="lmms-lab/Video-MME")
    with pytest.raises(ConfigError, match="task 'videomme': its data 'lmms-lab/Video-MME' could not be loaded"):
        with task_data_errors():
            task.download()
    with pytest.raises(KeyError, match="a scorer's bug"):  # a bug in task code is not a missing download
        with task_data_errors():
            task.process_results()

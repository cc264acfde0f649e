"""lmms-eval task YAMLs written at run time: each `include:`s a built-in task and changes as little as possible.

Two changes are made, alone or together:
* the GPT-judged tasks record predictions for `dycoke_eval.judge` instead of calling lmms-eval's
  inline judge (`<task>_deferred`, used by the paper's task sets);
* the fixture tasks read a local JSON file instead of the hub dataset.
The built-in YAMLs' location depends on where lmms-eval is installed, so none of this is committed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from dycoke_eval.config import lmms_eval_tasks_dir


@dataclass(frozen=True)
class DeferredJudge:
    process_results: str  # function in dycoke_eval.judging that records the prediction
    metrics: tuple[str, ...]  # the judged metrics, "not judged" until the judge step


DEFERRED_JUDGES = {  # built-in YAML (relative to lmms_eval/tasks) -> how its judging is deferred
    "activitynetqa/activitynetqa_generation.yaml": DeferredJudge("record_unjudged_qa", ("gpt_eval_score", "gpt_eval_accuracy")),
    "video_detail_description/video_detail_description.yaml": DeferredJudge("record_unjudged_description", ("gpt_eval_score",)),
}
DEFERRED_TASKS = {  # our task name -> built-in YAML
    "activitynetqa_deferred": "activitynetqa/activitynetqa_generation.yaml",
    "video_dc499_deferred": "video_detail_description/video_detail_description.yaml",
}

# `!function` tags cannot be produced by yaml.safe_dump, so the judge override is text.
_PROCESS_RESULTS = "process_results: !function dycoke_eval.judging.{function}\nmetric_list:\n"
_METRIC = "  - metric: {metric}\n    aggregation: !function dycoke_eval.judging.not_judged\n    higher_is_better: true\n"


def task_yaml(name: str, builtin_yaml: str, data_files: dict[str, str] | None = None) -> str:
    """A task named `name` that includes `builtin_yaml`, optionally reading local `data_files` ({split: path})."""
    config: dict = {"include": str(lmms_eval_tasks_dir().resolve() / builtin_yaml), "task": name}
    if data_files:
        config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files})
    text = yaml.safe_dump(config, sort_keys=False)
    if judge := DEFERRED_JUDGES.get(builtin_yaml):
        text += _PROCESS_RESULTS.format(function=judge.process_results) + "".join(_METRIC.format(metric=m) for m in judge.metrics)
    return text


def environment_id() -> str:
    """A short name for this environment's lmms-eval installation: task YAMLs that include its files live apart."""
    return hashlib.sha256(str(lmms_eval_tasks_dir().resolve()).encode()).hexdigest()[:10]


def write_deferred_judge_tasks(tasks_root: Path) -> Path:
    """Write the `<task>_deferred` YAMLs into `tasks_root/<environment>` (for TaskManager's include_path); returns it.

    They name this environment's lmms-eval files, so two environments sharing a home directory each
    keep their own folder instead of rewriting one back and forth; each file is written atomically.
    """
    from dycoke_eval.store import write_text_atomic

    task_dir = tasks_root / environment_id()
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, builtin_yaml in DEFERRED_TASKS.items():
        write_text_atomic(task_dir / f"{name}.yaml", task_yaml(name, builtin_yaml))
    return task_dir

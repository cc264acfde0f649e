"""Task scorers that draw from Python's global random state, made to draw the same numbers for a document every time.

Some lmms-eval scorers fall back on a random draw when an answer does not parse: NExT-QA's
`nextqa_process_results` picks `random.choice` of the options, LongVideoBench's parser does the same. lmms-eval
seeds `random` once per run and scores documents in threads, each rank its own shard, so which number a
document draws depended on the order of scoring and on the number of processes: one process and two gave
different metrics for the same answers. Here each such scorer draws from `random` reseeded for its document (the
run's seed, the task and the document's content) and put back afterwards, one document at a time, so a
document's score depends on its answer alone.

A scorer is seeded when its module imports `random`; the cell's run.json lists those tasks under
`runtime.seeded_scorers`. Scorers that never draw are left as they are.
"""

from __future__ import annotations

import functools
import json
import random
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from lmms_eval.api.task import Task
from lmms_eval.tasks import TaskManager

from dycoke_eval.compression.stages import per_sample_seed

_DRAWING = threading.Lock()  # lmms-eval scores documents in threads; one seeded draw at a time


def draws_from_random(scorer: Callable) -> bool:
    """Whether the scorer's module has Python's `random` module at hand (NExT-QA's and LongVideoBench's do)."""
    return isinstance(getattr(scorer, "__globals__", {}).get("random"), ModuleType)


def seeded_scorer(scorer: Callable, task: str, seed: int) -> Callable:
    """`scorer(doc, results)` with `random` seeded for the document while it runs, and restored after."""

    @functools.wraps(scorer)
    def score(doc: dict[str, Any], results: list, **kwargs: Any) -> Any:
        document = json.dumps(doc, sort_keys=True, default=str)
        with _DRAWING:
            state = random.getstate()
            random.seed(per_sample_seed(seed, f"{task}/{document}"))
            try:
                return scorer(doc, results, **kwargs)
            finally:
                random.setstate(state)

    score.seeded = True
    return score


class SeededScoringTaskManager(TaskManager):
    """lmms-eval's TaskManager, whose loaded tasks score with `seeded_scorer` where their scorer draws from `random`.

    `seed` and `seeded` (the names of the tasks seeded by the last load) are set per run by the app.
    """

    seed: int = 0
    seeded: set[str]

    def load_task_or_group(self, task_list=None, task_type="simple") -> dict:
        loaded = super().load_task_or_group(task_list, task_type)
        for task in _leaf_tasks(loaded):
            scorer = task.config.process_results
            if callable(scorer) and draws_from_random(scorer) and not getattr(scorer, "seeded", False):
                task.config.process_results = seeded_scorer(scorer, task.config.task, self.seed)
                self.seeded.add(task.config.task)
        return loaded


def _leaf_tasks(loaded: Any) -> list[Task]:
    """Every Task in lmms-eval's nested {name or group: Task, dict or (group, Task)} structure."""
    if isinstance(loaded, Task):
        return [loaded]
    if isinstance(loaded, dict):
        return [task for value in loaded.values() for task in _leaf_tasks(value)]
    if isinstance(loaded, tuple):
        return [task for value in loaded for task in _leaf_tasks(value)]
    return []

"""Task names: refused at once when unknown, and lmms-eval's index of them (its TaskManager), built once per process.

A quick scan of the task YAMLs answers most checks in a fraction of a second; lmms-eval's full index
(about 8 s of CPU) is built only for names the scan does not find, and kept on disk per lmms-eval version.
A run's TaskManager comes from a `TaskIndex`, which the process keeps from one cell to the next.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from dycoke_eval.config import ConfigError, group_options


def check_task_names(names: list[str], offline_dir: Path) -> None:
    """Refuse unknown task names at once: a quick scan of the task YAMLs, then lmms-eval's full index, kept on disk."""
    ours = own_task_names()
    if all(name in ours for name in names) or not (set(names) - ours - declared_task_names()):
        return
    known = ours | indexed_task_names(offline_dir)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(_unknown_tasks_message(unknown, sorted(known)))


def own_task_names() -> set[str]:
    """The tasks whose YAMLs this project writes: the fixture copies and the deferred-judge variants."""
    from dycoke_eval.offline.fixtures import FIXTURE_TASK_NAMES
    from dycoke_eval.task_configs import DEFERRED_TASKS

    return {*FIXTURE_TASK_NAMES, *DEFERRED_TASKS}


def declared_task_names() -> set[str]:
    """Names declared by a `task:`, `group:` or `tag:` line of lmms-eval's task YAMLs (a fraction of a second).

    Some tasks are generated from templates and appear only in lmms-eval's full index.
    """
    from dycoke_eval.config import lmms_eval_tasks_dir

    names = set()
    for path in lmms_eval_tasks_dir().rglob("*.yaml"):
        for line in path.read_text(errors="ignore").splitlines():
            key, _, value = line.partition(":")
            if key in ("task", "group", "tag") and value.strip() and not value.strip().startswith(("!", "[")):
                names.add(value.strip().strip("'\""))
    return names


def indexed_task_names(offline_dir: Path) -> set[str]:
    """Every name lmms-eval's TaskManager knows, built once per lmms-eval version and kept in `offline_dir`."""
    import json
    from importlib import metadata

    from dycoke_eval.store import write_json_atomic

    path = offline_dir / f"lmms-eval-{metadata.version('lmms-eval')}-task-names.json"
    if path.exists():
        return set(json.loads(path.read_text()))
    names = sorted(TaskIndex().manager([]).all_tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, names)
    return set(names)


def _unknown_tasks_message(unknown: list[str], known: list[str]) -> str:
    hints = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
    names = "; ".join(f"unknown task {name!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for name, h in hints.items())
    return (
        f"{names}; task sets: tasks={','.join(group_options('tasks'))}, and any of lmms-eval's {len(known)} tasks "
        "(`python -m lmms_eval tasks` lists them)"
    )


class TaskIndex:
    """lmms-eval's TaskManagers by the task folders they index, kept for every cell of a process that asks again.

    With `builtins` a manager also indexes all of lmms-eval's ~2,000 task YAMLs (about 8 s of CPU), and every
    cell of a sweep asks for the same one; our own tasks (fixtures, deferred judging) include their built-in
    YAMLs by path, so a run of only those indexes its folders alone. The key holds the folders and their
    YAMLs' names and text, so a task written or renamed in them later is still found. The index is all a
    reused manager carries over; the tasks themselves are loaded afresh from their YAMLs by each evaluation.
    """

    def __init__(self) -> None:
        self._managers: dict[tuple, Any] = {}

    def manager(self, task_dirs: list[Path], seed: int = 0, builtins: bool = True):
        """lmms-eval's TaskManager for `task_dirs`, seeding the scorers that draw from `random` (`scoring.py`)."""
        import collections

        from dycoke_eval.scoring import SeededScoringTaskManager

        include = [str(path) for path in task_dirs]
        key = (builtins, *((path, _yaml_texts(Path(path))) for path in include))
        if (manager := self._managers.get(key)) is None:
            manager = self._managers[key] = SeededScoringTaskManager(include_path=include, include_defaults=builtins)
        manager.task_group_map = collections.defaultdict(list)  # per-load bookkeeping (duplicate subtasks), fresh as a new one's
        manager.seed, manager.seeded = seed, set()  # this run's
        return manager

    def resolve(self, names: list[str], task_dirs: list[Path], seed: int = 0):
        """The manager that knows our task YAMLs, after checking every requested name exists; `seed` seeds the scorers
        that draw from `random`. For our own tasks alone, lmms-eval's built-in ones are not indexed."""
        manager = self.manager(task_dirs, seed, builtins=not set(names) <= own_task_names())
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            raise ConfigError(_unknown_tasks_message(unknown, sorted(manager.all_tasks)))
        return manager


def _yaml_texts(folder: Path) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(path), path.read_text()) for path in folder.rglob("*.yaml") if path.is_file()))

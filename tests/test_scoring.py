"""Scorers that draw from `random` (NExT-QA's fallback for an unparsable answer) give a document the same score always."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from dycoke_eval.scoring import _leaf_tasks
from dycoke_eval.task_index import TaskIndex

UNPARSABLE = ["zzz"]  # no option letter, too short to match an option's text: NExT-QA's parser draws random.choice


@pytest.fixture(scope="module")
def loaded(world):
    manager = TaskIndex().manager([world.task_dir], seed=0, builtins=False)
    loaded = manager.load_task_or_group(["fixture_nextqa_mc_test", "fixture_videomme"])
    tasks = {task.config.task: task for task in _leaf_tasks(loaded)}
    return manager, tasks


def test_only_the_scorers_that_draw_from_random_are_seeded_and_the_run_names_them(loaded):
    manager, tasks = loaded
    assert manager.seeded == {"fixture_nextqa_mc_test"}  # VideoMME's scorer never draws
    assert getattr(tasks["fixture_nextqa_mc_test"].config.process_results, "seeded", False)
    assert not getattr(tasks["fixture_videomme"].config.process_results, "seeded", False)


def test_nextqa_draws_for_an_unparsable_answer_and_the_draw_depends_only_on_the_document(loaded):
    nextqa = loaded[1]["fixture_nextqa_mc_test"]
    docs = list(nextqa.test_docs())
    lmms_evals_own = nextqa.config.process_results.__wrapped__
    draws = set()
    for state in range(20):  # lmms-eval's own scorer: the score follows the global random state
        random.seed(state)
        draws.add(lmms_evals_own(docs[0], UNPARSABLE)["exact_match"])
    assert draws == {True, False}

    def score(doc):
        return nextqa.process_results(doc, UNPARSABLE)["exact_match"]

    random.seed(0)
    in_order = [score(doc) for doc in docs]
    random.seed(99)
    state = random.getstate()
    with ThreadPoolExecutor(4) as pool:  # another state, reversed order, in threads as lmms-eval scores
        reversed_in_threads = list(pool.map(score, docs[::-1]))[::-1]
    assert reversed_in_threads == in_order
    assert random.getstate() == state  # the global state is left as it was
    assert [score(doc) for doc in docs[1:]] == in_order[1:]  # a shard of the documents scores them alike

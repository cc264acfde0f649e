"""Scaling out: two real processes under `accelerate launch`, and jobs under Hydra's submitit launcher, give what one
process gives, and a run killed under one resumes under another.

The two processes run on this CPU machine through accelerate's multi-process launcher (`--multi_gpu` starts
`--num_processes` processes over torch.distributed; `--cpu` would start one). The sweep is a sample-major group
of two cells, plain (`full`) and DyCoke, over three fixture tasks of three documents each: the second rank gets
one document of each task, so lmms-eval pads it with a copy of a request, which must never be computed or
recorded. NExT-QA's scorer draws from `random` for an unparsable answer, and the tiny model's answers are that.
The submitit launcher runs real submitit with its local executor: each job in a process of its own, as on SLURM.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from conftest import run_app, run_module

from dycoke_eval.store import SampleJournal

TASKS = "tasks.names=[fixture_videomme,fixture_nextqa_mc_test,fixture_mvbench_action_antonym]"
SWEEP = ("+sweep=smoke", "model=tiny", "method=full,dycoke", TASKS, "frames=4")
UNREPORTED = "hydra.sweeper.report=false"  # rendering the paper tables is tested once, under two processes
SAMPLES = 9  # three tasks, three documents each
TWO_PROCESSES = ("accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "-m", "dycoke_eval")  # fmt: skip
RUN_HISTORY = {"seconds", "decode_step_seconds", "from_journal", "encoder_cache_hit", "encoder_shared"}  # not what was computed


def two_processes(*overrides: str, offline_dir: Path, env: dict[str, str] | None = None):
    return run_module(*TWO_PROCESSES, *overrides, env={"DYCOKE_OFFLINE_DIR": str(offline_dir), **(env or {})})


def one_process(*overrides: str, offline_dir: Path):
    return run_app(*overrides, env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})


def computed(results_dir: Path) -> dict[str, dict]:
    """Per cell, everything the run computed: metrics, logged samples, records and journaled answers (times aside)."""
    cells = {}
    for cell in sorted((results_dir / "cells").iterdir()):
        journal = SampleJournal(cell / "journal.jsonl")
        cells[cell.name] = {
            "metrics": json.loads((cell / "results.json").read_text())["results"],
            "samples": {path.name: path.read_text() for path in sorted(cell.glob("samples_*.jsonl"))},
            "records": [
                {key: value for key, value in json.loads(line).items() if key not in RUN_HISTORY}
                for line in (cell / "sample_records.jsonl").read_text().splitlines()
            ],
            "journal": journal.answers(),
        }
    return cells


@pytest.fixture(scope="module")
def one(offline_dir, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("one-process")
    proc = one_process(*SWEEP, UNREPORTED, f"results_dir={results}", offline_dir=offline_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.mark.slow  # two launched processes, 35 s: in `make test-slow` with the other multi-process runs
def test_two_processes_compute_the_metrics_answers_records_and_journal_of_one(one, offline_dir, tmp_path):
    proc = two_processes(*SWEEP, f"results_dir={tmp_path}", offline_dir=offline_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert computed(tmp_path) == computed(one)
    for cell in (tmp_path / "cells").iterdir():  # two processes ran, each its shard, each its own journal
        run = json.loads((cell / "run.json").read_text())
        assert run["runtime"]["processes"] == 2 and len(run["runtime"]["hardware_by_rank"]) == 2
        assert {path.name for path in cell.glob("journal*")} == {"journal.jsonl", "journal.rank1.jsonl"}
        assert len((cell / "journal.rank1.jsonl").read_text().splitlines()) == 3  # one document of each task
        assert run["runtime"]["seeded_scorers"] == ["fixture_nextqa_mc_test"]  # NExT-QA's draws are seeded per document
    status = [line for line in proc.stdout.splitlines() if line.startswith(("cell ", "group "))]
    assert len(status) == 3, proc.stdout  # printed once, by rank 0, with counts summed over both processes
    assert f"{SAMPLES} samples generated, 0 resumed from its journal, {SAMPLES} encoder passes" in status[0]
    assert status[0].endswith("over 2 processes; checkpoint loads in this process: 1")
    assert f"encoder passes: {SAMPLES} done, {SAMPLES} saved" in status[2]
    rendered = [line for line in proc.stdout.splitlines() if "rows have our values" in line]
    assert rendered and len(rendered) == len(set(rendered))  # the sweep's tables are rendered, once


KILLER = """
    import os, signal
    from dycoke_eval import store

    _add, _appended = store.SampleJournal.add, []

    def add(self, *args):
        _add(self, *args)
        _appended.append(1)
        if os.environ.get("RANK", "0") == "0" and len(_appended) == int(os.environ["KILL_AFTER_APPENDS"]):
            os.kill(os.getpid(), signal.SIGKILL)

    store.SampleJournal.add = add
"""


def killing(tmp_path: Path, appends: int) -> dict[str, str]:
    """The environment of processes whose rank 0 (or only process) is SIGKILLed after its `appends`-th journaled answer."""
    killer = tmp_path / "killer"
    killer.mkdir(exist_ok=True)
    (killer / "sitecustomize.py").write_text(textwrap.dedent(KILLER))
    return {"PYTHONPATH": os.pathsep.join([str(killer), os.environ.get("PYTHONPATH", "")]), "KILL_AFTER_APPENDS": str(appends)}


def resumed_counts(results_dir: Path) -> dict[str, int]:
    """Per cell, the samples answered from its journal, by the records of its last run."""
    counts = {}
    for cell in (results_dir / "cells").iterdir():
        records = [json.loads(line) for line in (cell / "sample_records.jsonl").read_text().splitlines()]
        counts[cell.name.split("__")[1]] = sum(record["from_journal"] for record in records)
    return counts


@pytest.mark.slow
def test_a_sweep_killed_under_two_processes_resumes_under_one_with_nothing_lost_or_recomputed(one, offline_dir, tmp_path):
    """Cell by cell: rank 0 is SIGKILLed after its first answer of the second cell (the first cell is complete)."""
    cell_by_cell = (*SWEEP, UNREPORTED, "hydra.sweeper.sample_major=false", f"results_dir={tmp_path}")
    killed = two_processes(*cell_by_cell, offline_dir=offline_dir, env=killing(tmp_path, appends=6 + 1))
    assert killed.returncode != 0
    (unfinished,) = {cell for cell in (tmp_path / "cells").iterdir() if not (cell / "run.json").exists()}
    saved = len(SampleJournal(unfinished / "journal.jsonl"))
    assert "__dycoke__" in unfinished.name and saved >= 1

    resumed = one_process(*cell_by_cell, offline_dir=offline_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "complete, skipped" in resumed.stdout
    assert f"{SAMPLES - saved} samples generated, {saved} resumed from its journal" in resumed.stdout
    assert computed(tmp_path) == computed(one)


@pytest.mark.slow
def test_a_group_killed_under_one_process_resumes_under_two_with_nothing_lost_or_recomputed(
    one, offline_dir, tmp_path, monkeypatch
):
    add, appended = SampleJournal.add, []

    def killed_before_the_fifth_answer(self, *args):
        if len(appended) == 4:  # two documents answered by both cells of the group
            raise KeyboardInterrupt
        appended.append(1)
        return add(self, *args)

    monkeypatch.setattr(SampleJournal, "add", killed_before_the_fifth_answer)
    killed = one_process(*SWEEP, UNREPORTED, f"results_dir={tmp_path}", offline_dir=offline_dir)
    assert killed.returncode == 130 and re.search(r"interrupted: 2 finished samples of cell tiny__full__f4", killed.stderr)
    monkeypatch.setattr(SampleJournal, "add", add)

    resumed = two_processes(*SWEEP, UNREPORTED, f"results_dir={tmp_path}", offline_dir=offline_dir)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"{SAMPLES - 2} samples generated, 2 resumed from its journal, {SAMPLES - 2} encoder passes" in resumed.stdout
    assert f"encoder passes: {SAMPLES - 2} done, {SAMPLES - 2} saved" in resumed.stdout
    assert computed(tmp_path) == computed(one)


@pytest.mark.slow  # 42 s: two submitit jobs end to end
def test_a_sweep_under_submitit_runs_one_job_per_group_and_a_killed_job_resumes_when_submitted_again(one, offline_dir, tmp_path):
    """The sweep runs in this process; each submitit job is a process of its own, SIGKILLed the first time mid-group."""
    submitit = (*SWEEP, UNREPORTED, "hydra/launcher=submitit_local", f"results_dir={tmp_path}")
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    killed = run_app(*submitit, env={**env, **killing(tmp_path, appends=3)})  # 2 samples of full's, 1 of dycoke's journaled
    assert killed.returncode != 0 and "Traceback" not in killed.stderr
    assert "sweep: a job stopped before finishing (" in killed.stderr and "run the same command again to resume" in killed.stderr
    jobs = [line for line in (killed.stdout + killed.stderr).splitlines() if re.match(r".*\[HYDRA\]\s+#\d+ : ", line)]
    assert len(jobs) == 1 and "+group_cells=" in jobs[0]  # both cells in one job

    again = run_app(*submitit, env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert resumed_counts(tmp_path) == {"full": 2, "dycoke": 9}  # dycoke's cell finds all its answers, written by full's run
    assert computed(tmp_path) == computed(one)
    logs = list((tmp_path / "smoke" / ".hydra").glob("*/.submitit/*/*_log.out"))
    assert len(logs) == 2 and any("encoder passes: 8 done, 7 saved" in log.read_text() for log in logs)  # a process per job


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_runs_them_as_two_ranks_of_one_data_parallel_run(one, offline_dir, tmp_path):
    """`tasks_per_node=2`, as a SLURM node of several GPUs would run a job: each task one rank, as under accelerate."""
    proc = run_app(
        *SWEEP, UNREPORTED, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", f"results_dir={tmp_path}",
        env={"DYCOKE_OFFLINE_DIR": str(offline_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert computed(tmp_path) == computed(one)
    for cell in (tmp_path / "cells").iterdir():
        assert json.loads((cell / "run.json").read_text())["runtime"]["processes"] == 2
        assert (cell / "journal.rank1.jsonl").exists()

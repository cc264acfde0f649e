"""Sweeps: every paper table expands to the paper's rows; a killed sweep resumes without redoing work."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_app
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dycoke_eval import report
from dycoke_eval.config import CONF_DIR
from hydra_plugins.dycoke_eval_sweeper.grids_sweeper import expand_grids


def expand(sweep: str, arguments: list[str] = ()) -> list[dict[str, str]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper)
    cells = expand_grids(OverridesParser.create(), sweeper.get("params"), sweeper["grids"], list(arguments))
    return [{"frames": str(cfg.frames), **dict(a.split("=", 1) for a in cell)} for cell in cells]


def rows(cells):
    """(model, method, frames, settings) with the method settings the paper's rows name."""
    settings = ("method.k", "method.l", "method.p", "method.ratio")
    return sorted(
        (c["model"].removeprefix("llava_ov_"), c["method"], int(c["frames"]), tuple(c.get(s) for s in settings)) for c in cells
    )


def paper(model, method, frames=32, k=None, l=None, p=None, ratio=None):  # noqa: E741
    return (model, method, frames, (k, l, p, ratio))


def dycoke(model, k, frames=32, l="3", p="0.7"):  # noqa: E741
    return paper(model, "dycoke", frames, k, l, p)


def ablation(model, method):
    return paper(model, method, 32, "0.7", "3", "0.7")


def baselines(model, frames=32, ratio="0.35"):
    return [paper(model, "full", frames), paper(model, "prumerge", frames), paper(model, "fastv", frames, ratio=ratio)]


TABLE_ROWS = {
    "table1": [*baselines("0.5b"), *[dycoke("0.5b", k) for k in ("0.3", "0.5", "0.7")],
               *baselines("7b"), *[dycoke("7b", k) for k in ("0.3", "0.5", "0.7")],
               *baselines("72b", ratio="0.45"), dycoke("72b", "0.5"), dycoke("72b", "0.7")],
    "table2": [row for m in ("0.5b", "7b") for row in (*baselines(m, 16), dycoke(m, "0.5", 16), dycoke(m, "0.7", 16))],
    "table3": [row for m in ("0.5b", "7b") for f in (16, 32)
               for row in (*baselines(m, f), dycoke(m, "0.5", f), dycoke(m, "0.7", f))],
    "table4": [paper("7b", "full"), dycoke("7b", "0.5"), dycoke("7b", "0.7")],
    "table5": [paper("7b", "full"), ablation("7b", "dycoke_no_dp"), ablation("7b", "dycoke_random"), dycoke("7b", "0.7"),
               dycoke("7b", "0.7", l="10"), dycoke("7b", "0.7", p="0.9"), dycoke("7b", "0.9", l="0", p="0.9"),
               paper("0.5b", "full"), ablation("0.5b", "dycoke_no_dp"), ablation("0.5b", "dycoke_random"),
               dycoke("0.5b", "0.7"), dycoke("0.5b", "0.9", l="0", p="0.9")],
    "table6": [paper("7b", "full", 16), dycoke("7b", "0.7"), paper("7b", "full", 32)],
    "table7": [row for m in ("0.5b", "7b") for row in (*baselines(m, 32), dycoke(m, "0.5", 32), dycoke(m, "0.7", 32))],
}  # fmt: skip


@pytest.mark.parametrize("table", sorted(TABLE_ROWS))
def test_every_table_sweep_expands_to_the_rows_of_the_paper(table):
    assert rows(expand(table)) == sorted(TABLE_ROWS[table])


def test_overrides_narrow_a_sweep_to_the_matching_cells():
    only_small = expand("table1", ["model=llava_ov_0.5b"])
    assert len(only_small) == 6 and {c["model"] for c in only_small} == {"llava_ov_0.5b"}
    limited = expand("table1", ["limit=50"])
    assert len(limited) == 17 and {c["limit"] for c in limited} == {"50"}
    assert expand("table1", ["model=llava_ov_13b"]) == []


def test_cells_that_share_a_model_and_frame_count_run_next_to_each_other():
    order = [(c["model"], c["frames"]) for c in expand("table3")]
    assert order == sorted(order) and len(set(order)) == 4


# Cell by cell (no sample-major groups): each cell resumes from its own journal (tests/test_groups.py covers groups).
SMOKE = ["+sweep=smoke", "model=tiny", "method=full,dycoke", "frames=4", "limit=2", "hydra.sweeper.sample_major=false"]
SAMPLES_PER_CELL = 10 * 2  # ten fixture tasks, two documents each


@pytest.mark.slow  # every table method through the app on both layouts, 12 s and 25 s: in `make test-slow`
@pytest.mark.parametrize(
    "methods",
    [("fastvid", "visionzip", "prunevid"), ("holitom", "vidcom2", "flashvid", "framefusion", "tome")],
    ids=["fastvid_table", "field"],
)
def test_the_table_methods_run_end_to_end_on_both_layouts(offline_dir, tmp_path, monkeypatch, methods):
    """FastVID's table's methods, and the field's newer ones, through the app on the tiny LLaVA-OneVision and the
    LLaVA-Video adapter, no sample failed."""
    monkeypatch.setattr(report, "render_report", lambda *args: None)  # the tables are not what is tested here
    narrow = [f"method={','.join(methods)}", "tasks.names=[fixture_mvbench_action_antonym]", "limit=1", "frames=8"]
    proc = run_app("+sweep=smoke", *narrow, f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = expand("smoke", narrow)
    expected = {(model, method) for model in ("tiny", "tiny_video") for method in methods}
    assert {(c["model"], c["method"]) for c in cells} == expected
    runs = [json.loads(path.read_text()) for path in (tmp_path / "cells").glob("*/run.json")]
    assert len(runs) == len(cells) and all(run["complete"] for run in runs)
    for path in (tmp_path / "cells").glob("*/sample_records.jsonl"):
        (record,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert record["status"] == "ok" and 0 < record["retained_ratio"] <= 1, path


@pytest.mark.slow  # twenty cells on two tiny Qwen-VL models through the app, 60 s: in `make test-slow`
def test_every_method_runs_end_to_end_on_both_tiny_qwen_models_or_is_refused_naming_the_family(offline_dir, tmp_path):
    """The smoke sweep's Qwen-VL cells run through the app with no sample failed; every method it leaves out of a
    model is one that model's family refuses in one line before anything loads."""
    from dycoke_eval.config import ConfigError, group_options, instantiate_method
    from dycoke_eval.models import adapter_class
    from dycoke_eval.offline.architectures import architecture_config

    models = ("tiny_qwen2_5_vl", "tiny_qwen3_vl")
    narrow = [f"model={','.join(models)}", "tasks.names=[fixture_videomme]", "limit=1"]
    proc = run_app("+sweep=smoke", *narrow, "hydra.sweeper.report=false", f"results_dir={tmp_path}",
                   env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = expand("smoke", narrow)
    runs = [json.loads(path.read_text()) for path in (tmp_path / "cells").glob("*/run.json")]
    assert len(runs) == len(cells) and all(run["complete"] for run in runs)
    for path in (tmp_path / "cells").glob("*/sample_records.jsonl"):
        (record,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert record["status"] == "ok" and 0 < record["retained_ratio"] <= 1 and record["token_grid"][0] == 8, path
    for model in models:
        config = architecture_config(model)
        info = adapter_class(config).model_info(config)
        run = {c["method"] for c in cells if c["model"] == model}
        for name in sorted(set(group_options("method")) - run):
            with pytest.raises(ConfigError, match=info.family):
                instantiate_method(name).validate_for(info)


def test_overrides_that_leave_a_sweep_no_cell_end_it_in_one_line_naming_what_it_has(tmp_path):
    proc = run_app("+sweep=smoke", "model=llava_ov_7b", "method=full", f"results_dir={tmp_path}")
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 2 and line.startswith("dycoke_eval: model=llava_ov_7b method=full: sweep smoke has no cell")
    assert "its cells have model in tiny, tiny_qwen2_5_vl, tiny_qwen3_vl, tiny_video; method in dycoke," in line


def sweep(results_dir: Path, offline_dir: Path) -> subprocess.CompletedProcess:
    """The smoke sweep run to its end, in this process."""
    return run_app(*SMOKE, f"results_dir={results_dir}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})


def sweep_process(results_dir: Path, offline_dir: Path) -> subprocess.Popen:
    """The smoke sweep as a command, in a process of its own (a test kills it)."""
    env = {**os.environ, "OPENAI_API_KEY": "", "DYCOKE_OFFLINE_DIR": str(offline_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "dycoke_eval", *SMOKE, f"results_dir={results_dir}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def cell_metrics(results_dir: Path) -> dict[str, dict]:
    return {cell.parent.name: json.loads(cell.read_text())["results"] for cell in (results_dir / "cells").glob("*/results.json")}


def status_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("cell ")]


@pytest.mark.slow
def test_a_killed_sweep_resumes_where_it_stopped_and_matches_an_uninterrupted_run(offline_dir, tmp_path):
    whole = sweep(tmp_path / "whole", offline_dir)
    assert whole.returncode == 0, whole.stderr[-3000:]
    lines = status_lines(whole.stdout)
    assert len(lines) == 2 and all(line.endswith("checkpoint loads in this process: 1") for line in lines)
    assert not re.search(r"\b0 encoder-cache hits", lines[1])  # the second method reuses the first one's encoded videos
    for table in (1, 2):  # the sweep ends by rendering the paper tables it has data for
        assert "| tiny" in (tmp_path / "whole" / "report" / f"table{table}.md").read_text()

    interrupted = sweep_process(tmp_path / "resumed", offline_dir)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the first cell is complete and the second has started
        complete = list((tmp_path / "resumed" / "cells").glob("*/run.json"))
        started = [j for j in (tmp_path / "resumed" / "cells").glob("*/journal.jsonl") if not (j.parent / "run.json").exists()]
        if complete and started and started[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    os.killpg(interrupted.pid, signal.SIGKILL)
    interrupted.wait()

    resumed = sweep(tmp_path / "resumed", offline_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = status_lines(resumed.stdout)
    skipped = [line for line in lines if "complete, skipped" in line]
    (rerun,) = [re.search(r"(\d+) samples generated, (\d+) resumed", line).groups() for line in lines if line not in skipped]
    generated, resumed = map(int, rerun)
    assert len(skipped) == 1  # the cell finished before the kill is not recomputed
    assert resumed >= 2 and generated + resumed == SAMPLES_PER_CELL  # the killed cell redoes only what is missing
    assert cell_metrics(tmp_path / "resumed") == cell_metrics(tmp_path / "whole")

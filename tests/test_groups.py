"""Sample-major groups: a sweep's cells that differ only in method decode and encode each video once, and give
exactly the results of the same cells run one by one, resumed after a kill or not."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_app
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from dycoke_eval import report
from dycoke_eval.config import CONF_DIR
from dycoke_eval.groups import GROUP_KEY, group_override, sample_major_groups
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.store import SampleJournal, SampleRecord
from dycoke_eval.wrapper import CompressedVideoLM

METHODS = ("full", "dycoke", "prumerge", "fastvid")  # prumerge needs the encoder's attention, fastvid SigLIP's head
TASKS = ("fixture_mvbench_action_antonym", "fixture_nextqa_mc_test")
LIMIT = 2
CELLS = ("+sweep=smoke", "model=tiny", f"method={','.join(METHODS)}", "frames=8", f"tasks.names=[{','.join(TASKS)}]")
SWEEP = (*CELLS, f"limit={LIMIT}", "max_new_tokens=2", "encoder_cache_mb=0")  # the cache off: only the group saves passes
VIDEOS = len(TASKS) * LIMIT  # one video per sample


@pytest.fixture(autouse=True, scope="module")
def no_report():
    """The sweeps here render no paper tables (seconds each, and not what is tested)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(report, "render_report", lambda *args: None)
        yield


def configs(*cells: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return [compose(config_name="config", overrides=list(cell)) for cell in cells]


def test_cells_differing_only_in_method_form_one_group_and_measured_cells_none():
    cells = configs(["method=full"], ["method=dycoke", "method.k=0.5"], ["method=fastv", "limit=3"], ["method=full", "frames=8"],
                    ["method=prumerge"], ["method=full", "measure=true"], ["method=dycoke", "measure=true"])  # fmt: skip
    assert sample_major_groups(cells) == [[0, 1, 4], [2], [3], [5], [6]]


def test_a_group_override_gives_hydra_back_each_cells_overrides_unchanged():
    others = [["method=dycoke", "method.k=0.5", "tasks.names=[a,b]"], ["run_name=it's", "results_dir=C:\\out\\", "x='q'"]]
    parsed = OverridesParser.create().parse_override(group_override(others))
    assert parsed.key_or_group == GROUP_KEY and parsed.value() == others


def test_extra_encoder_signals_leave_the_video_tokens_and_each_signal_unchanged(tiny_checkpoint, tiny_siglip_head):
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", siglip_head=str(tiny_siglip_head))
    frames = synthetic_frames("signals")[:8]
    every = lm.adapter.capturable_signals()
    alone = {name: lm.encode_video(frames, SampleRecord("t", 0), frozenset({name})) for name in every}
    together = lm.encode_video(frames, SampleRecord("t", 0), every)
    bare = lm.encode_video(frames, SampleRecord("t", 0), frozenset())
    assert torch.equal(together.grid, bare.grid)
    for name, encoded in alone.items():
        assert torch.equal(encoded.grid, bare.grid) and torch.equal(encoded.signals[name], together.signals[name]), name


def counting_encodes(monkeypatch) -> list[int]:
    """Counts the vision encoder's passes (the tiny model's adapter), apart from the app's own count."""
    encode, passes = LlavaOneVisionAdapter.encode, []

    def counted(self, *args, **kwargs):
        passes.append(1)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(LlavaOneVisionAdapter, "encode", counted)
    return passes


def cell_results(results_dir: Path) -> dict[str, dict]:
    """Per cell folder: lmms-eval's metrics and, per task, every logged sample's answer."""
    cells = {}
    for folder in sorted((results_dir / "cells").iterdir()):
        answers = {
            path.stem: [
                (row["doc_id"], row["resps"], row["filtered_resps"]) for row in map(json.loads, path.read_text().splitlines())
            ]
            for path in sorted(folder.glob("samples_*.jsonl"))
        }
        cells[folder.name] = {"metrics": json.loads((folder / "results.json").read_text())["results"], "answers": answers}
    return cells


@pytest.fixture(scope="module")
def grouped(offline_dir, tmp_path_factory):
    """The 4-method sweep run as one sample-major group: its folder, its output and the encoder passes counted."""
    results_dir = tmp_path_factory.mktemp("grouped")
    with pytest.MonkeyPatch.context() as monkeypatch:
        passes = counting_encodes(monkeypatch)
        proc = run_app(*SWEEP, f"results_dir={results_dir}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results_dir, proc.stdout, len(passes)


def test_a_group_encodes_each_video_once_and_gives_the_results_of_its_cells_run_one_by_one(
    grouped, offline_dir, tmp_path, monkeypatch
):
    results_dir, stdout, passes = grouped
    assert passes == VIDEOS
    group = f"group of 4 cells (tiny, 8 frames, fixtures: {', '.join(METHODS)})"
    assert f"{group}: encoder passes: {VIDEOS} done, {3 * VIDEOS} saved" in stdout
    one_by_one = counting_encodes(monkeypatch)
    proc = run_app(
        *SWEEP, "hydra.sweeper.sample_major=false", f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(one_by_one) == len(METHODS) * VIDEOS and "group of" not in proc.stdout
    expected = cell_results(tmp_path)
    assert len(expected) == len(METHODS) and cell_results(results_dir) == expected
    (fastvid,) = (results_dir / "cells").glob("*__fastvid__*")
    records = [json.loads(line) for line in (fastvid / "sample_records.jsonl").read_text().splitlines()]
    assert len(records) == VIDEOS and all(record["encoder_shared"] for record in records)  # answered from full's passes


@pytest.mark.slow  # the submitit test in test_scale_out.py kills and resumes a group in make test
def test_a_group_killed_mid_sample_resumes_encoding_only_the_samples_some_cell_lacks(grouped, offline_dir, tmp_path, monkeypatch):
    """Killed after the leader and one more cell journaled the second video's answers: only that video is encoded again."""
    add, appended = SampleJournal.add, []

    def killed_before_the_seventh_answer(self, *args):
        if len(appended) == len(METHODS) + 2:  # sample 1 in every journal, sample 2 in two: full's and dycoke's
            raise KeyboardInterrupt
        appended.append(1)
        return add(self, *args)

    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    monkeypatch.setattr(SampleJournal, "add", killed_before_the_seventh_answer)
    killed = run_app(*SWEEP, f"results_dir={tmp_path}", env=env)
    assert killed.returncode == 130 and re.search(r"interrupted: 2 finished samples of cell tiny__full__f8", killed.stderr)
    monkeypatch.setattr(SampleJournal, "add", add)
    passes = counting_encodes(monkeypatch)
    resumed = run_app(*SWEEP, f"results_dir={tmp_path}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(passes) == VIDEOS - 1  # the first video is in every journal; every later one some cell lacks
    assert "encoder passes: 3 done, 7 saved" in resumed.stdout  # 2 + 4 + 4 answers from 3 passes
    assert cell_results(tmp_path) == cell_results(grouped[0])
    again = run_app(*SWEEP, f"results_dir={tmp_path}", env=env)  # every cell complete: nothing runs
    assert again.stdout.count("complete, skipped") == len(METHODS) and "encoder passes: 0 done, 0 saved" in again.stdout


@pytest.mark.slow  # a second full group run, 9 s: in `make test-slow`
def test_force_recomputes_every_cell_of_a_group(grouped, offline_dir, tmp_path, monkeypatch):
    shutil.copytree(grouped[0] / "cells", tmp_path / "cells")
    for journal in (tmp_path / "cells").glob("*/journal.jsonl"):  # stale answers that only a recomputation replaces
        entries = [{**json.loads(line), "answer": "stale"} for line in journal.read_text().splitlines()]
        journal.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    passes = counting_encodes(monkeypatch)
    proc = run_app(*SWEEP, "force=true", f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
    assert proc.returncode == 0 and len(passes) == VIDEOS and "complete, skipped" not in proc.stdout
    assert cell_results(tmp_path) == cell_results(grouped[0])
